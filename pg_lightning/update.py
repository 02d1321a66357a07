"""One loop for every first-order policy update: kept batches × passes × minibatches (of envs or of steps).

On-policy training (lecture §2, §7.2) is the 1 × 1 × 1 case: the batch just collected, one pass, one step on
the pseudo-loss -(1/N) Σ_i Σ_t log π_θ(a_it|s_it) Ψ_it. Importance-sampled reuse (lecture §6) keeps the
``reuse_batches`` batches before it too, takes ``updates_per_batch`` passes over all of them, and splits each
batch into ``minibatches`` groups of envs (or, for the per-step kinds, sets of steps), one optimizer step on
the importance-weighted loss per part.

Ψ of each kept batch is computed once, before any step (with the current V_φ for value presets), so it is a
constant of the loss; the ratios ρ_t move with θ from step to step.

``GuardedStep`` is the one place an optimizer steps: it skips a step whose loss or gradient is not finite,
and scales the policy's loss for DDP. ``SkipCounter`` counts skipped steps and stops a run that keeps
skipping. With ``estimator.value.shared_step_coef`` = c the policy and V_φ share each step: the loss is the
policy's plus c times V_φ's regression loss on the minibatch's steps, and one optimizer holds both models'
parameters (``PolicyGradientModule.configure_optimizers``), as PPO's and A2C's reference implementations train
an actor and a critic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from pg_lightning.batch import RolloutBatch
from pg_lightning.distributed import Reduction
from pg_lightning.estimators import Estimator, EstimatorOutput
from pg_lightning.segments import masked_mean
from pg_lightning.gradient import PolicyLoss, on_policy_loss
from pg_lightning.off_policy import OffPolicy, importance_loss, normalize_minibatch, select_estimate, select_steps
from pg_lightning.recurrent import action_distribution


class NonFiniteUpdatesError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class SkipCounter:
    """Optimizer steps skipped for a non-finite loss or gradient: in all, and in a row.

    Args:
        max_in_a_row: this many skipped steps in a row raise ``NonFiniteUpdatesError``.
        where: describes the run's position for that error (e.g. "iteration 12, env step 40960").
    """

    def __init__(self, max_in_a_row: int, where: Callable[[], str] = lambda: ""):
        self.max_in_a_row = max_in_a_row
        self.where = where
        self.total = 0
        self.in_a_row = 0

    def skip(self) -> None:
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteUpdatesError(
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient ({self.where()}); stopping. "
                "Lower the learning rate, check the env's rewards and observations for NaN/inf, or set "
                "estimator.normalize=true"
            )


@dataclass
class GuardedStep:
    """One optimizer step of one model on a loss, skipped when the loss or any gradient is not finite.

    With W processes the policy's loss is this rank's share of the whole batch's pseudo-loss (global N) and
    DDP averages gradients, so the policy's ``loss_scale`` is W (V_φ's loss is a per-rank mean: 1). Whether to
    step is decided by all ranks together: a backward is a collective, one rank skipping it alone would hang
    the others.

    Args:
        optimizer: the model's optimizer.
        model: the parameters whose gradients are checked.
        backward: ``loss -> None`` (Lightning's ``manual_backward``: DDP's gradient all-reduce).
        reduction: the run's ``distributed.Reduction``.
        skips: the run's counter of skipped steps.
        loss_scale: the factor on the loss before the backward pass.
        ends_streak: a step taken ends a streak of skipped ones (policy steps do; V_φ's do not).
        max_grad_norm: if set, the model's gradient is rescaled to at most this global L2 norm before the
            step (Lightning's ``gradient_clip_val`` does not apply to manual optimization, so it is done here).
    """

    optimizer: torch.optim.Optimizer
    model: nn.Module
    backward: Callable[[torch.Tensor], None]
    reduction: Reduction
    skips: SkipCounter
    loss_scale: float = 1.0
    ends_streak: bool = False
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())  # walked once, not at every step

    def __call__(self, loss: torch.Tensor, before_step: Callable[[], None] | None = None) -> bool:
        """Backward and step; ``before_step`` may rewrite the gradients first (the natural gradient). True if stepped.

        One global gradient norm serves both checks: it is finite iff every gradient entry is (short of an
        overflow of the norm itself, which skips too), and it is the norm that ``max_grad_norm`` bounds.
        """
        self.optimizer.zero_grad()
        finite = not self.reduction.any(not bool(torch.isfinite(loss)), loss.device)
        if finite:
            self.backward(loss * self.loss_scale if self.loss_scale != 1.0 else loss)
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
            finite = norm is None or bool(norm.isfinite())
        if finite:
            if self.max_grad_norm is not None and norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
            if before_step is not None:
                before_step()
            self.optimizer.step()
            if self.ends_streak:
                self.skips.in_a_row = 0
            return True
        self.optimizer.zero_grad()
        self.skips.skip()
        return False


def check_gradient_clipping(clip: float | None, natural_gradient: bool) -> None:
    """Refuse ``trainer.gradient_clip_val``: the updates here step their optimizers themselves (manual
    optimization), where Lightning does not clip; and clipping a natural-gradient step would rescale it after
    it was sized to the KL radius. The one copy of this rule (configs: ``validate_config``; Python: ``setup``)."""
    if not clip:
        return
    if natural_gradient:
        raise ValueError(
            f"trainer.gradient_clip_val={clip} cannot be combined with optimizer=natural_gradient: clipping would "
            "rescale the natural-gradient step after it was sized to the KL radius; bound the step with "
            "optimizer.max_kl instead and leave gradient_clip_val unset"
        )
    raise ValueError(
        f"trainer.gradient_clip_val={clip} is not supported: PolicyGradientModule steps its optimizers itself "
        "(manual optimization), where Lightning does not clip; leave it unset"
    )


# The natural gradient's hook: (batch, its on-policy loss) -> its statistics; it rewrites the policy's .grad.
Precondition = Callable[[RolloutBatch, PolicyLoss], dict[str, float]]


@dataclass
class UpdateResult:
    """What one policy update did.

    Attributes:
        estimate: the current batch's estimator output (its ``value_targets`` fit V_φ).
        loss: the mean policy loss of the steps taken (on-policy: the batch's pseudo-loss).
        entropy: the policy's mean entropy on the current batch, before the update.
        metrics: ``diag/ess``, ``diag/approx_kl``, ``diag/clip_fraction`` (importance-sampled kinds), the
            precondition's statistics (``npg/*``) and, when V_φ shares the steps, ``loss/value`` (its mean).
    """

    estimate: EstimatorOutput
    loss: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


def update_policy(
    policy: nn.Module,
    kept: list[tuple[RolloutBatch, torch.Tensor | None]],
    estimator: Estimator,
    off_policy: OffPolicy,
    step: GuardedStep,
    reduction: Reduction,
    precondition: Precondition | None = None,
    entropy_coef: float = 0.0,
    value_loss: Callable[[RolloutBatch, EstimatorOutput], torch.Tensor] | None = None,
    value_coef: float = 0.0,
) -> UpdateResult:
    """Every optimizer step of one iteration on the kept batches; the current batch is ``kept[-1]``.

    Args:
        kept: ``(batch, V_φ(batch.obs) [T + 1, B] or None)``, oldest first; on-policy exactly one.
        step: the policy's guarded optimizer step.
        precondition: rewrites the policy's gradient before the step (on-policy only: the natural gradient).
        entropy_coef: c of the entropy bonus: each step minimises loss - c · H̄, H̄ the mean entropy of π over
            the minibatch's steps (``loss/policy`` is logged without it).
        value_loss: ``(minibatch, its estimate) -> L_V``, V_φ's regression loss on the minibatch's steps, when
            V_φ shares the policy's steps (``step`` then steps both optimizers): each step's loss gets
            ``value_coef`` · L_V, divided here by the step's ``loss_scale`` so that after the DDP scaling it
            is c · L_V, a per-rank mean like V_φ's own fit.
    """
    current = kept[-1][0]
    with torch.no_grad():
        entropy = masked_mean(action_distribution(policy, current).entropy(), current.valid)
    estimates = [(batch, estimator(batch, values, reduction)) for batch, values in kept]
    losses: list[torch.Tensor] = []
    diagnostics: dict[str, list[torch.Tensor]] = {}
    metrics: dict[str, torch.Tensor | float] = {}

    def with_value(loss: torch.Tensor, data: RolloutBatch, part: EstimatorOutput) -> torch.Tensor:
        if value_loss is None:
            return loss
        value = value_loss(data, part)
        diagnostics.setdefault("loss/value", []).append(value.detach())
        return loss + value_coef * value / step.loss_scale

    for _ in range(off_policy.updates_per_batch):
        for batch, estimate in estimates:
            for data, part in minibatches(batch, estimate, off_policy, reduction):
                if not reduction.any(bool(part.mask.any()), part.mask.device):
                    continue  # no step has a known weight (no episode ended, no value to bootstrap)
                if off_policy.reuses_data:
                    if off_policy.normalize_minibatch:
                        part = normalize_minibatch(part, reduction)
                    result = importance_loss(policy, data, part, off_policy, reduction)
                    step(with_value(with_entropy_bonus(result.loss, result.dist, data, entropy_coef), data, part))
                    for key, value in (("ess", result.ess), ("approx_kl", result.approx_kl),
                                       ("clip_fraction", result.clip_fraction)):
                        diagnostics.setdefault(f"diag/{key}", []).append(value)
                    losses.append(result.loss.detach())
                else:
                    loss = on_policy_loss(policy, data, part, estimator, reduction)
                    hook = None if precondition is None else lambda: metrics.update(precondition(data, loss))
                    step(with_value(with_entropy_bonus(loss.loss, loss.dist, data, entropy_coef), data, part),
                         before_step=hook)
                    losses.append(loss.loss.detach())
    # Means over this iteration's steps: how far each step's policy was from the data's.
    metrics.update({key: torch.stack(values).mean() for key, values in diagnostics.items()})
    loss = torch.stack(losses).mean() if losses else torch.zeros(())
    return UpdateResult(estimate=estimates[-1][1], loss=loss, entropy=entropy, metrics=metrics)


def with_entropy_bonus(
    loss: torch.Tensor, dist: torch.distributions.Distribution, batch: RolloutBatch, coef: float
) -> torch.Tensor:
    """``loss - coef · H̄``, H̄ the mean entropy of π(·|s_t) over the batch's valid steps (``loss`` when coef is 0)."""
    if coef == 0.0:
        return loss
    return loss - coef * masked_mean(dist.entropy(), batch.valid)


def minibatches(
    batch: RolloutBatch, estimate: EstimatorOutput, off_policy: OffPolicy, reduction: Reduction
) -> Iterator[tuple[RolloutBatch, EstimatorOutput]]:
    """The batch split into ``off_policy.minibatches`` parts: groups of envs, whole trajectories together, or
    (``minibatch_unit=steps``) sets of the used steps, each a ``[1, k]`` batch (``off_policy.select_steps``).

    Importance-sampled kinds draw the parts from a random permutation of the envs or of the used steps
    (torch's stream, so a resumed run draws the same ones); on-policy training uses the whole batch as it is.
    """
    if not off_policy.reuses_data:
        yield batch, estimate
        return
    if off_policy.minibatch_unit == "steps":
        used = estimate.mask.reshape(-1).nonzero().squeeze(1)  # flat indices t · B + b of the used steps
        order = used[torch.randperm(len(used), device=used.device)]
        # All used steps as one-step columns in the drawn order, gathered once; each part is a slice (a view).
        data, columns = select_steps(batch, estimate, order, 0.0)
        counts = [len(index) for index in order.tensor_split(off_policy.minibatches)]
        # Part j over all ranks holds K_j steps: its loss is the mean over them.
        sizes = reduction.sum(torch.tensor(counts, dtype=torch.float32, device=used.device)).tolist()
        start = 0
        for count, size in zip(counts, sizes):
            part = slice(start, start + count)
            start += count
            yield data.select_envs(part), select_estimate(columns, part, num_segments=size)
        return
    for envs in torch.randperm(batch.num_envs).tensor_split(off_policy.minibatches):
        yield batch.select_envs(envs), select_estimate(estimate, envs, reduction)
