"""From weights to a gradient: the pseudo-loss of lecture §7.2, and the gradient estimate it defines.

``policy_loss`` is what training differentiates; ``estimate_gradient`` differentiates the same loss
with ``torch.autograd.grad`` and returns the ascent direction, for tests and analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution
from torch.func import functional_call, grad, vmap

from pg_lightning import functional as F
from pg_lightning.distributions import mask_actions
from pg_lightning.linalg import unflatten_like
from pg_lightning.segments import segment_sum
from pg_lightning.batch import RolloutBatch
from pg_lightning.distributed import LOCAL, Reduction
from pg_lightning.estimators import Estimator, EstimatorOutput
from pg_lightning.recurrent import action_distribution


# Steps per vmap call when computing per-step score vectors (bounds the memory to SCORE_CHUNK x P).
SCORE_CHUNK = 4096


@dataclass
class PolicyLoss:
    """``loss``: differentiable, ``-∇_θ loss`` is the estimate of ∇J; the rest is for logging."""

    loss: torch.Tensor
    dist: Distribution
    logp: torch.Tensor
    estimate: EstimatorOutput


def policy_loss(
    policy: nn.Module,
    batch: RolloutBatch,
    estimator: Estimator,
    values: torch.Tensor | None = None,
    reduction: Reduction = LOCAL,
) -> PolicyLoss:
    """The pseudo-loss -(1/N) Σ_i Σ_t log π_θ(a_it|s_it) Ψ_it of ``estimator`` on ``batch``.

    Args:
        policy: ``obs -> Distribution``.
        batch: a rollout batch (``[T, B]``).
        estimator: gives Ψ, the mask of used steps and N.
        values: V_φ(obs) ``[T + 1, B]`` for estimators with a value baseline.
        reduction: with several processes, makes the estimator's batch statistics and N global; each
            rank's loss is then its share -(1/N) Σ_{its steps} of the whole batch's pseudo-loss.

    With the per-parameter optimal baseline the gradient is not that of any scalar-weighted
    pseudo-loss, so the loss is the linear surrogate -Σ_k θ_k ĝ_k (ĝ a constant), whose gradient is -ĝ.
    """
    return on_policy_loss(policy, batch, estimator(batch, values, reduction), estimator, reduction)


def on_policy_loss(
    policy: nn.Module, batch: RolloutBatch, estimate: EstimatorOutput, estimator: Estimator, reduction: Reduction = LOCAL
) -> PolicyLoss:
    """The pseudo-loss of ``policy_loss`` for weights the estimator already gave (``update.update_policy``)."""
    dist = action_distribution(policy, batch)
    logp = dist.log_prob(batch.act)  # [T, B]
    if estimator.baseline == "optimal":
        loss = _optimal_baseline_surrogate(policy, batch, logp, estimate, reduction)
    else:
        loss = F.pseudo_loss(logp, estimate.weights, estimate.mask, estimate.num_segments)
    return PolicyLoss(loss=loss, dist=dist, logp=logp, estimate=estimate)


def _optimal_baseline_surrogate(
    policy: nn.Module, batch: RolloutBatch, logp: torch.Tensor, estimate: EstimatorOutput, reduction: Reduction
) -> torch.Tensor:
    """ĝ_k = (1/N) Σ_i g_ik (R_i - b*_ik) with g_i = Σ_t ∇ log π of trajectory i (lecture §5.2).

    The trajectory score vectors g_i are sums of per-step scores ∇ log π(a_t|s_t), computed with
    ``torch.func`` (``vmap`` of ``grad``) in chunks of ``SCORE_CHUNK`` steps: time O(steps · P),
    memory O(SCORE_CHUNK · P + N · P) for N trajectories and P parameters. The policy's ``forward``
    must therefore be ``torch.func``-compatible (no data-dependent Python control flow).
    """
    names = [name for name, p in policy.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in policy.named_parameters() if p.requires_grad}
    segments = torch.where(estimate.mask, estimate.segments, torch.full_like(estimate.segments, -1))
    num_segments = int(estimate.segments.max()) + 1
    used = segments >= 0
    obs, act, seg = batch.obs[:-1][used], batch.act[used], segments[used]
    # With action masks each step's score is that of π restricted to its allowed actions (all allowed: none).
    allowed = batch.action_mask[used] if batch.action_mask is not None else torch.ones_like(seg, dtype=torch.bool)

    def step_logp(params: dict, obs_t: torch.Tensor, act_t: torch.Tensor, allowed_t: torch.Tensor) -> torch.Tensor:
        dist = functional_call(policy, params, (obs_t.unsqueeze(0),))
        if batch.action_mask is not None:
            dist = mask_actions(dist, allowed_t.unsqueeze(0))
        return dist.log_prob(act_t.unsqueeze(0)).squeeze(0)

    step_scores = vmap(grad(step_logp), in_dims=(None, 0, 0, 0))
    num_params = sum(p.numel() for p in params.values())
    scores = logp.new_zeros(num_segments, num_params)  # [S, P]
    for start in range(0, obs.shape[0], SCORE_CHUNK):
        window = slice(start, start + SCORE_CHUNK)
        chunk = step_scores(params, obs[window], act[window], allowed[window])
        flat = torch.cat([chunk[name].reshape(chunk[name].shape[0], -1) for name in names], dim=1)
        scores.index_add_(0, seg[start : start + SCORE_CHUNK], flat)
    steps = segment_sum(estimate.mask.to(logp.dtype), segments, num_segments)
    # R(τ) is the same at every step of a trajectory: its segment mean recovers it.
    returns = segment_sum(estimate.weights, segments, num_segments) / steps.clamp(min=1)
    columns = torch.arange(batch.num_envs, device=segments.device).expand_as(segments)
    envs = torch.zeros(num_segments, dtype=torch.long, device=segments.device)
    envs[segments[used]] = columns[used]  # the env of each trajectory
    baseline = F.optimal_baseline(scores, returns, envs, batch.num_envs, reduction)
    ascent = (scores * (returns[:, None] - baseline)).sum(0) / estimate.num_segments.clamp(min=1)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # same order as ``names``
    return -sum((p * g).sum() for p, g in zip(trainable, unflatten_like(ascent, trainable)))
