"""Off-policy reuse with importance sampling (lecture §6): learn from batches that older policies collected.

Every batch stores log π_b(a_t|s_t) of the policy that collected it (``RolloutBatch.logp_behavior``);
the ratio ρ_t = π_θ(a_t|s_t) / π_b(a_t|s_t) is formed in one place, ``functional.log_ratio``. With Ψ_t the
estimator's weights (computed from the stored rewards, exactly as on-policy) and N the number of
trajectories, the kinds differ only in how ρ enters the loss: the README's off-policy table (section
"Off-policy reuse") gives each kind's formula, lecture section and function in ``functional.py``.

Gradients: ∇[w_i Σ_t log π Ψ] with w_i constant is w_i Σ_t ∇log π Ψ, the §6.2 estimator, unbiased for
whole trajectories; ∇ρ_t = ρ_t ∇log π_θ(a_t|s_t), so ``per_step`` is Σ_t ρ_t ∇log π Ψ_t, which ignores the
change of the state distribution (biased unless θ = θ_b, lower variance). At θ = θ_b every ρ is 1 and each
kind's gradient is the on-policy one. ``kl_coef`` β adds β · KL(π_b ‖ π_θ), estimated per step as
(ρ - 1) - log ρ (non-negative, unbiased under π_b, zero gradient at θ = θ_b).

A "trajectory" is a segment of the batch (``functional.segment_ids``): with value presets an episode cut by
the batch end is weighted by the ratios of its steps inside the batch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pg_lightning import functional as F
from pg_lightning.segments import masked_mean, segment_sum
from pg_lightning.batch import RolloutBatch
from pg_lightning.distributed import LOCAL, Reduction
from pg_lightning.estimators import EstimatorOutput
from pg_lightning.recurrent import action_distribution
from pg_lightning.validation import boolean, non_negative, non_negative_int, positive_int, positive_number, require

OffPolicyKind = Literal["none", "trajectory", "per_step", "clipped"]
KINDS = ("none", "trajectory", "per_step", "clipped")
MINIBATCH_UNITS = ("envs", "steps")


@dataclass(frozen=True)
class OffPolicy:
    """How past data is reused: the importance-sampling kind and the replay schedule.

    Each iteration collects one batch, keeps it with the ``reuse_batches`` batches before it, and takes
    ``updates_per_batch`` passes over all of them; each pass splits every batch into ``minibatches``
    parts and takes one optimizer step per part: groups of envs (whole trajectories stay together), or, for
    the per-step kinds, sets of steps drawn without replacement (as PPO's implementations do).

    Args:
        kind: ``none`` (on-policy), ``trajectory``, ``per_step`` or ``clipped`` (see the module docstring).
        clip_ratio: ε of ``clipped``.
        truncate: ``trajectory`` only: cap each trajectory weight at this value.
        self_normalize: ``trajectory`` only: divide by Σ_i w_i instead of N (weighted importance sampling).
        kl_coef: β of the KL(π_b ‖ π_θ) penalty, any importance-sampled kind.
        reuse_batches: how many past batches are kept and replayed next to the new one.
        updates_per_batch: passes over the kept batches per collected batch.
        minibatches: optimizer steps per batch and pass (the batch split into this many parts).
        minibatch_unit: what a part is made of: ``envs`` (a group of env columns, any kind) or ``steps``
            (``per_step`` and ``clipped`` only: a random set of the batch's used steps whose loss is the mean
            over its steps, see ``select_steps``).
        normalize_minibatch: standardise Ψ over each minibatch's steps, (Ψ - mean) / std, before its loss
            (PPO's per-minibatch advantage normalisation; over all ranks' parts of the minibatch).
    """

    kind: OffPolicyKind = "none"
    clip_ratio: float = 0.2
    truncate: float | None = None
    self_normalize: bool = False
    kl_coef: float = 0.0
    reuse_batches: int = 0
    updates_per_batch: int = 1
    minibatches: int = 1
    minibatch_unit: str = "envs"
    normalize_minibatch: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"off_policy.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        require("off_policy.clip_ratio", self.clip_ratio, positive_number, "a positive number")
        require("off_policy.kl_coef", self.kl_coef, non_negative, "a non-negative number")
        require("off_policy.reuse_batches", self.reuse_batches, non_negative_int, "a non-negative integer")
        require("off_policy.updates_per_batch", self.updates_per_batch, positive_int, "a positive integer")
        require("off_policy.minibatches", self.minibatches, positive_int, "a positive integer")
        if self.minibatch_unit not in MINIBATCH_UNITS:
            raise ValueError(f"off_policy.minibatch_unit must be envs or steps, got {self.minibatch_unit!r}")
        if self.minibatch_unit == "steps" and self.kind not in ("per_step", "clipped"):
            raise ValueError(
                f"off_policy.minibatch_unit=steps needs a per-step kind (per_step or clipped), got kind={self.kind!r}: "
                "the trajectory kind weights whole trajectories, which a set of steps splits"
            )
        require("off_policy.normalize_minibatch", self.normalize_minibatch, boolean, "true or false")
        if self.truncate is not None:
            require("off_policy.truncate", self.truncate, positive_number, "a positive number or null")
        if self.kind != "trajectory" and (self.truncate is not None or self.self_normalize):
            key = "truncate" if self.truncate is not None else "self_normalize"
            raise ValueError(f"off_policy.{key} is only used with off_policy.kind=trajectory, got kind={self.kind!r}")
        if self.kind == "none":
            for key, default in (("reuse_batches", 0), ("updates_per_batch", 1), ("minibatches", 1), ("kl_coef", 0.0),
                                 ("normalize_minibatch", False)):
                if getattr(self, key) != default:
                    raise ValueError(
                        f"off_policy.{key}={getattr(self, key)} needs an importance-sampled off_policy.kind "
                        "(trajectory, per_step or clipped): the on-policy loss is only right on data of the current policy"
                    )

    @property
    def reuses_data(self) -> bool:
        """True when any step is taken on data that an older policy collected."""
        return self.kind != "none"


@dataclass
class ImportanceLoss:
    """``loss`` to differentiate, plus what is logged: ``ess`` (fraction), ``approx_kl``, ``clip_fraction``;
    ``dist``: π_θ(·|s_t) of the batch's steps (for an entropy bonus)."""

    loss: torch.Tensor
    ess: torch.Tensor
    approx_kl: torch.Tensor
    clip_fraction: torch.Tensor
    dist: torch.distributions.Distribution | None = None


def importance_loss(
    policy: nn.Module, batch: RolloutBatch, estimate: EstimatorOutput, off_policy: OffPolicy, reduction: Reduction = LOCAL
) -> ImportanceLoss:
    """The importance-weighted pseudo-loss of ``off_policy.kind`` (one that reuses data) on ``batch`` (``[T, B]``).

    ``estimate`` holds Ψ, the mask of used steps, the segment ids and N for this batch (from the estimator).
    ``reduction`` makes Σ w of self-normalised weights, the ESS and the KL estimate global over processes.
    """
    dist = action_distribution(policy, batch)
    logp = dist.log_prob(batch.act)  # [T, B]
    log_rho = F.log_ratio(logp, batch.logp_behavior)
    mask, weights = estimate.mask, estimate.weights.detach()
    used = mask.to(logp.dtype)
    count = F.positive_count(estimate.num_segments)
    rho = log_rho.exp()
    clip_fraction = logp.new_zeros(())
    if off_policy.kind == "trajectory":
        segments = torch.where(mask, estimate.segments, torch.full_like(estimate.segments, -1))
        num_segments = int(estimate.segments.max()) + 1 if estimate.segments.numel() else 0
        log_w = segment_sum(log_rho.detach() * used, segments, num_segments)
        present = segment_sum(used, segments, num_segments) > 0
        # Self-normalised weights serve the ESS (scale-free) and, with self_normalize, the loss itself.
        normalized = F.trajectory_weights(log_w[present], off_policy.truncate, self_normalize=True, reduction=reduction)
        w = normalized if off_policy.self_normalize else F.trajectory_weights(log_w[present], off_policy.truncate)
        step_w = torch.zeros(num_segments, dtype=torch.float64, device=logp.device)
        step_w[present] = w
        step_w = step_w[segments.clamp(min=0)].to(logp.dtype) * used  # [T, B]
        total = (logp * weights * step_w).sum()
        loss = -total if off_policy.self_normalize else -total / count
        ess = F.effective_sample_size(normalized, reduction)
    else:
        if off_policy.kind == "clipped":
            eps = off_policy.clip_ratio
            loss = -F.clipped_surrogate(rho, weights, mask, count, eps)
            clip_fraction = masked_mean(((rho.detach() - 1).abs() > eps).to(logp.dtype), mask)
        else:  # per_step
            loss = -F.per_step_surrogate(rho, weights, mask, count)
        ess = F.effective_sample_size(rho.detach()[mask], reduction)
    # KL(π_b ‖ π_θ) estimate, ≥ 0 per step; differentiated only when it is penalised (else a diagnostic, no graph)
    penalized = off_policy.kl_coef > 0
    kl_terms = F.kl_estimate(rho if penalized else rho.detach(), log_rho if penalized else log_rho.detach(), batch.valid)
    kl = kl_terms.sum() / reduction.sum(batch.valid.sum().to(logp.dtype)).clamp(min=1)  # this rank's share
    if off_policy.kl_coef > 0:
        loss = loss + off_policy.kl_coef * kl
    return ImportanceLoss(loss, ess.to(logp.dtype), reduction.sum(kl.detach()), clip_fraction, dist)


def select_estimate(
    estimate: EstimatorOutput, envs: torch.Tensor | slice, reduction: Reduction = LOCAL, num_segments: float | None = None
) -> EstimatorOutput:
    """``estimate`` restricted to the columns ``envs``, with N recounted for those columns (over all ranks), or
    set to ``num_segments`` when given (a minibatch of steps divides by its step count)."""
    mask = estimate.mask[:, envs]
    segments = estimate.segments[:, envs]
    if num_segments is None:
        count = reduction.sum(torch.tensor(torch.unique(segments[mask]).numel(), device=mask.device))
    else:
        count = torch.tensor(num_segments, device=mask.device)
    return EstimatorOutput(
        weights=estimate.weights[:, envs],
        mask=mask,
        segments=segments,
        num_segments=count,
        value_targets=None if estimate.value_targets is None else estimate.value_targets[:, envs],
    )


def select_steps(
    batch: RolloutBatch, estimate: EstimatorOutput, index: torch.Tensor, minibatch_steps: float
) -> tuple[RolloutBatch, EstimatorOutput]:
    """The steps ``index`` (flat indices into ``[T, B]``) as a batch of k one-step columns, ``[1, k]``.

    Column j holds step (t, b): ``obs[t, b]`` and ``obs[t + 1, b]``, its action, reward, ends, behaviour
    log-prob, Ψ and V_φ target. The per-step kinds' loss needs nothing else (no trajectory is rebuilt).

    The divisor N becomes K = ``minibatch_steps``, the minibatch's steps over all ranks: its loss is the mean
    (1/K) Σ_j ℓ_j, as in PPO's reference implementations. Drawn uniformly without replacement from the
    batch's M used steps, that is (N/M) times an unbiased estimate of the batch's (1/N) Σ_t ℓ_t: a positive
    factor per batch, so the direction is the lecture's, and a shared V_φ loss weight and a gradient-norm
    bound mean what they mean there (per-step means on both sides).
    """
    steps, envs = index // batch.num_envs, index % batch.num_envs
    k = len(index)
    data = RolloutBatch(
        obs=torch.stack([batch.obs[steps, envs], batch.obs[steps + 1, envs]]),
        act=batch.act[steps, envs].unsqueeze(0),
        rew=batch.rew[steps, envs].unsqueeze(0),
        terminated=batch.terminated[steps, envs].unsqueeze(0),
        truncated=batch.truncated[steps, envs].unsqueeze(0),
        valid=batch.valid[steps, envs].unsqueeze(0),
        logp_behavior=batch.logp_behavior[steps, envs].unsqueeze(0),
        # No episode runs on from before a one-step column.
        return_before=torch.zeros(k, dtype=batch.return_before.dtype, device=index.device),
        length_before=torch.zeros(k, dtype=batch.length_before.dtype, device=index.device),
        action_mask=None if batch.action_mask is None else batch.action_mask[steps, envs].unsqueeze(0),
    )
    part = EstimatorOutput(
        weights=estimate.weights[steps, envs].unsqueeze(0),
        mask=estimate.mask[steps, envs].unsqueeze(0),
        segments=estimate.segments[steps, envs].unsqueeze(0),
        num_segments=torch.tensor(minibatch_steps, device=index.device),
        value_targets=None if estimate.value_targets is None else estimate.value_targets[steps, envs].unsqueeze(0),
    )
    return data, part


def normalize_minibatch(estimate: EstimatorOutput, reduction: Reduction = LOCAL, eps: float = 1e-8) -> EstimatorOutput:
    """Ψ standardised over the minibatch's used steps, (Ψ - mean) / (std + eps), mean and std over all ranks.

    PPO's per-minibatch advantage normalisation (Huang et al. 2022, detail 7). Its own mean makes it biased
    for small minibatches, unlike ``functional.standardize`` of the whole batch; it is an implementation
    detail the MuJoCo presets reproduce, not an estimator.
    """
    used = estimate.mask.to(torch.float64)
    x = estimate.weights.double()
    count, total, squares = reduction.sum(torch.stack([used.sum(), (x * used).sum(), (x * x * used).sum()]))
    mean = total / count.clamp(min=1)
    std = (squares / count.clamp(min=1) - mean**2).clamp(min=0).sqrt()
    # Bessel's correction, as torch.std in the reference implementations.
    std = std * (count / (count - 1).clamp(min=1)).sqrt()
    weights = ((x - mean) / (std + eps) * used).to(estimate.weights.dtype)
    return EstimatorOutput(weights, estimate.mask, estimate.segments, estimate.num_segments, estimate.value_targets)
