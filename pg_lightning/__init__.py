"""pg_lightning: policy-gradient reinforcement learning as a PyTorch Lightning plug-in."""

from pg_lightning.batch import RolloutBatch
from pg_lightning.callbacks import Evaluation, RunSummary
from pg_lightning.envs import VectorEnvFactory
from pg_lightning.estimators import Estimator, ValueFunctionConfig
from pg_lightning.evaluation import evaluate
from pg_lightning.gradient import estimate_gradient, policy_loss
from pg_lightning.module import PolicyGradientModule
from pg_lightning.natural_gradient import NaturalGradient
from pg_lightning.off_policy import OffPolicy
from pg_lightning.policies import CategoricalMLP, GaussianMLP, mlp_policy
from pg_lightning.rollout import RolloutCollector, RolloutDataset, collect
from pg_lightning.value import ValueFunction

__all__ = [
    "CategoricalMLP",
    "Estimator",
    "Evaluation",
    "GaussianMLP",
    "NaturalGradient",
    "OffPolicy",
    "PolicyGradientModule",
    "RolloutBatch",
    "RolloutCollector",
    "RolloutDataset",
    "RunSummary",
    "ValueFunction",
    "ValueFunctionConfig",
    "VectorEnvFactory",
    "collect",
    "estimate_gradient",
    "evaluate",
    "mlp_policy",
    "policy_loss",
]
