"""Your own env: the README's registered env, by gymnasium's module:EnvId syntax or env.imports, from train.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import REPO

from pg_lightning import VectorEnvFactory


@pytest.fixture
def own_package(tmp_path, monkeypatch) -> Path:
    """``mypkg/corridor.py`` in a temp dir, with the README's env code as written; the dir is on sys.path."""
    code = re.search(r"<!-- own-env-example -->\s*```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert code, "README has the own-env example"
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "corridor.py").write_text(code.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def train_py(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, str(REPO / "train.py"), "logger=none", *overrides],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_module_colon_id_and_imports_both_register_the_env(own_package):
    by_colon = VectorEnvFactory("mypkg.corridor:Corridor-v0", num_envs=2)
    assert (by_colon.id, by_colon.imports, by_colon.reward_threshold, by_colon.time_limit) == (
        "Corridor-v0", ["mypkg.corridor"], 0.85, 200)
    by_imports = VectorEnvFactory("Corridor-v0", num_envs=2, imports=["mypkg.corridor"])
    assert by_imports.spaces()[1].n == 2


@pytest.mark.slow
def test_train_py_solves_the_readme_env_named_with_module_colon_id(own_package):
    run_dir = own_package / "run"
    result = train_py(own_package, "env.id=mypkg.corridor:Corridor-v0", "total_env_steps=200000", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_id"] == "Corridor-v0" and summary["solved"], summary


def test_an_unregistered_id_points_to_env_imports_and_a_bad_module_is_one_line(own_package):
    unknown = train_py(own_package, "env.id=Corridor-v0", f"hydra.run.dir={own_package / 'a'}")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "env.imports=[mypkg.envs]" in unknown.stderr.strip().splitlines()[-1]
    assert not (own_package / "a").exists(), "a refused config leaves no run dir behind"
    missing = train_py(own_package, "env.id=Corridor-v0", "env.imports=[mypkg.nothere]", f"hydra.run.dir={own_package / 'b'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == ("error: env.imports: cannot import 'mypkg.nothere' "
                                      "(ModuleNotFoundError: No module named 'mypkg.nothere')")
