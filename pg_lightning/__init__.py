"""pg_lightning: policy-gradient reinforcement learning as a PyTorch Lightning plug-in.

The analysis API (``collect``, ``estimate_gradient``, estimators, policies, ``mdps``) needs only torch and
gymnasium. The names that need Lightning (the module and the callbacks) are imported on first use, so
``import pg_lightning`` does not pay Lightning's import (measured in ``benchmarks/startup.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pg_lightning.batch import RolloutBatch
from pg_lightning.envs import VectorEnvFactory
from pg_lightning.estimators import Estimator
from pg_lightning.evaluation import evaluate_policy, record_episode
from pg_lightning.analysis import collect, estimate_gradient
from pg_lightning.gradient import policy_loss
from pg_lightning.off_policy import OffPolicy
from pg_lightning.policies import CategoricalMLP, GaussianMLP, mlp_policy
from pg_lightning.recurrent import RecurrentPolicy, recurrent_policy
from pg_lightning.rollout import RolloutCollector, RolloutDataset
from pg_lightning.value import ValueFunction, ValueFunctionConfig

if TYPE_CHECKING:
    from pg_lightning.callbacks import Evaluation, RunSummary
    from pg_lightning.console import EnvStepProgressBar
    from pg_lightning.module import PolicyGradientModule
    from pg_lightning.natural_gradient import NaturalGradient

# Name -> the module that defines it, for the names that import Lightning.
_NEEDS_LIGHTNING = {
    "EnvStepProgressBar": "pg_lightning.console",
    "Evaluation": "pg_lightning.callbacks",
    "NaturalGradient": "pg_lightning.natural_gradient",
    "PolicyGradientModule": "pg_lightning.module",
    "RunSummary": "pg_lightning.callbacks",
}

__all__ = [
    "CategoricalMLP",
    "EnvStepProgressBar",
    "Estimator",
    "Evaluation",
    "GaussianMLP",
    "NaturalGradient",
    "OffPolicy",
    "PolicyGradientModule",
    "RecurrentPolicy",
    "RolloutBatch",
    "RolloutCollector",
    "RolloutDataset",
    "RunSummary",
    "ValueFunction",
    "ValueFunctionConfig",
    "VectorEnvFactory",
    "collect",
    "estimate_gradient",
    "evaluate_policy",
    "mlp_policy",
    "policy_loss",
    "record_episode",
    "recurrent_policy",
]


def __getattr__(name: str) -> Any:
    """Import a name that needs Lightning on first use (PEP 562)."""
    if name not in _NEEDS_LIGHTNING:
        raise AttributeError(f"module 'pg_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NEEDS_LIGHTNING[name]), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
