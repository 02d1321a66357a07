"""Gradient-estimator diagnostics: variance, signal-to-noise ratio and agreement with a reference.

An estimator's variance is what the lecture's variance-reduction tricks (§4–§5) lower; these functions
measure it on real batches, from independent sub-batches of the same data.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pg_lightning.batch import RolloutBatch
from pg_lightning.estimators import Estimator
from pg_lightning.linalg import flatten
from pg_lightning.analysis import estimate_gradient


def flat_gradient(
    policy: nn.Module, batch: RolloutBatch, estimator: Estimator, value_fn: nn.Module | None = None
) -> torch.Tensor:
    """``[P]``: ``estimate_gradient`` flattened into one vector."""
    return flatten(estimate_gradient(policy, batch, estimator, value_fn, torch_threads=None))  # as the caller set them


def sub_batch_gradients(
    policy: nn.Module, batch: RolloutBatch, estimator: Estimator, value_fn: nn.Module | None, groups: int
) -> torch.Tensor:
    """``[K, P]``: one gradient estimate per group of envs (columns), K = min(groups, B)."""
    column_groups = torch.arange(batch.num_envs).tensor_split(min(groups, batch.num_envs))
    return torch.stack([flat_gradient(policy, batch.select_envs(cols), estimator, value_fn) for cols in column_groups])


def gradient_statistics(estimates: torch.Tensor) -> dict[str, float]:
    """Variance and SNR of the mean of K independent estimates ``[K, P]``.

        grad_var = tr Cov[ĝ_mean] = Σ_p Var_k(ĝ_kp) / K,      grad_snr = ||mean_k ĝ_k||² / grad_var
    """
    num = estimates.shape[0]
    if num < 2:
        return {"grad_var": math.nan, "grad_snr": math.nan}
    variance = float(estimates.var(0).sum()) / num
    signal = float(estimates.mean(0).pow(2).sum())
    return {"grad_var": variance, "grad_snr": signal / variance if variance > 0 else math.inf}


def cosine_similarity(estimates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[K]``: cos(ĝ_k, reference) of each estimate with a reference gradient ``[P]``."""
    return torch.nn.functional.cosine_similarity(estimates, reference[None, :], dim=1)
