"""The package: the analysis API imports without Lightning, Hydra or W&B; the Lightning names load on use."""

from __future__ import annotations

import subprocess
import sys

import pg_lightning

HEAVY = ("lightning", "hydra", "omegaconf", "wandb")


def modules_loaded_by(code: str) -> set[str]:
    """Top-level modules that ``code`` (run in a fresh interpreter) leaves in ``sys.modules``, among ``HEAVY``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    return set(filter(None, out.strip().split(",")))


def test_the_analysis_api_does_not_import_lightning_hydra_or_wandb():
    code = (
        "import pg_lightning as pg\n"
        "from pg_lightning import mdps, estimators, policies, functional\n"
        "policy = pg.mlp_policy(*pg.VectorEnvFactory('CartPole-v1').spaces())\n"
        "batch = pg.collect(policy, 'CartPole-v1', num_steps=64, seed=0)\n"
        "pg.estimate_gradient(policy, batch, pg.Estimator())\n"
    )
    assert modules_loaded_by(code) == set()


def test_the_check_can_fail_the_module_imports_lightning():
    assert "lightning" in modules_loaded_by("import pg_lightning; pg_lightning.PolicyGradientModule")


def test_every_documented_name_is_importable_from_the_package():
    for name in pg_lightning.__all__:
        assert getattr(pg_lightning, name) is not None, name
    from pg_lightning import Evaluation, NaturalGradient, PolicyGradientModule, RunSummary  # noqa: F401
