"""Refactors keep training identical: the metrics of a few short runs are compared with recorded ones.

Each command below is a user's ``python train.py ...``, cut to three iterations (run through ``run.train``, what
train.py calls, except the multi-process one, which needs train.py itself). Its ``metrics.csv`` (every
column except the timings ``perf/*``) must equal ``tests/golden/<name>.csv`` exactly: the same batches, the
same losses, the same evaluation returns. A change that is meant to change training records new files:

    PG_LIGHTNING_RECORD_GOLDEN=1 python -m pytest tests/test_identical_behaviour.py

and says so in its commit message. The recorded files were made by the code before the architecture refactor;
a command renamed since then is listed under its new name with the old name's file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from test_configs import compose_with
from test_train import run_train_py

from pg_lightning.run import train

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("PG_LIGHTNING_RECORD_GOLDEN") == "1"

# name -> the command's overrides (the file name is the command's name before the refactor)
COMMANDS = {
    "default": [],
    "gae": ["estimator=gae"],
    "per_step": ["off_policy=per_step"],
    "clipped": ["+experiment=ppo"],  # `off_policy=clipped` before the refactor
    "natural_gradient": ["optimizer=natural_gradient"],
    "optimal_baseline": ["estimator=optimal_baseline"],
    "ddp": ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"],
}
SHORT = ["logger=csv", "max_iterations=3", "eval.num_episodes=8"]
IN_PROCESS = set(COMMANDS) - {"ddp"}


def training_metrics(metrics_csv: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv without the timing columns, as the strings Lightning wrote."""
    with metrics_csv.open() as f:
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in csv.DictReader(f)]


def differences(recorded: list[dict[str, str]], now: list[dict[str, str]]) -> list[str]:
    """Where two metric tables differ, as 'row N: key recorded -> now' lines (empty when they are equal)."""
    found = [f"{len(recorded)} rows recorded, {len(now)} now"] if len(recorded) != len(now) else []
    for i, (old, new) in enumerate(zip(recorded, now)):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                found.append(f"row {i}: {key} {old.get(key)!r} -> {new.get(key)!r}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_training_metrics_equal_the_recorded_ones(name, tmp_path):
    run_dir = tmp_path / name
    if name in IN_PROCESS:  # what train.py calls, without starting a Python per command
        train(compose_with(*COMMANDS[name], *SHORT), run_dir)
    else:  # several processes: Lightning's launcher re-runs the command line, so it must be train.py's
        result = run_train_py(*COMMANDS[name], *SHORT, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    now = training_metrics(run_dir / "metrics.csv")
    golden = GOLDEN / f"{name}.csv"
    if RECORD:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text((run_dir / "metrics.csv").read_text())
    assert differences(training_metrics(golden), now) == []


def test_the_comparison_sees_a_change_in_the_last_digit():
    recorded = training_metrics(GOLDEN / "default.csv")
    nudged = [dict(row) for row in recorded]
    value = nudged[0]["loss/policy"]
    nudged[0]["loss/policy"] = value[:-1] + ("1" if value[-1] != "1" else "2")
    assert differences(recorded, nudged) == [f"row 0: loss/policy {value!r} -> {nudged[0]['loss/policy']!r}"]
    assert differences(recorded, recorded[:-1]) == [f"{len(recorded)} rows recorded, {len(recorded) - 1} now"]
