"""Gradient estimators: hyperparameters that turn a rollout batch into per-step weights Ψ_t.

The pseudo-loss (``gradient.policy_loss``) is the same for every estimator; they differ only in Ψ. The
presets, their Ψ_t, their lecture sections and the function of ``functional.py`` behind each are the README's
estimator table (section "Configuration"), the one copy of it.

``normalize=True`` standardises Ψ: minus the other envs' mean, over the batch's std (any preset).

Which batches each preset gets
------------------------------
Q_t and R(τ) need the rest of the episode. Training therefore gives each preset one of two kinds of
batch (``RolloutCollector``, chosen by ``PolicyGradientModule(whole_episodes=...)``):

- Presets without a value function get **whole episodes**: each env collects episodes until it has T
  steps of them and finishes the one it is in; an episode is in the batch iff it started before its env
  had T steps. Inclusion is decided before an episode starts, so Σ over the batch's episodes of the
  per-episode estimate has mean E[N] ∇J (Wald's identity): unbiased, up to the positive 1/N. Keeping
  only the steps whose episode happens to end inside a fixed window of T steps would not be: that
  selects on the future (short episodes, and the actions that end them, are over-represented).
- Presets with a value function get **T steps of every env** by default, episodes running on across
  batches: Ψ bootstraps γ V_φ(obs[T]) at the cut, exactly as after a time-limit truncation
  (γ V_φ(final obs)); after a termination the value is 0. Every step is used. Whole episodes are
  available to them too (``whole_episodes=true``).

A time-limit truncation is the end of the finite-horizon episode (the lecture's sum runs to T) and is
used like a termination by the presets without a value function. Given a batch with an episode still
running at its end (``collect(..., whole_episodes=False)``), those presets leave that episode's steps out
(``mask`` False): they have no weight to give them.

``N`` in the pseudo-loss is the number of trajectory segments (episodes, or their parts inside the
batch) that have a used step; for a batch of whole episodes it is the number of episodes.

Batch statistics (the ``average`` and ``optimal`` baselines, ``normalize``) for env b's steps come from
the *other* envs only, so they are independent of env b's actions and the estimate stays unbiased. Not
merely the other trajectories: in a whole-episode batch the number of episodes that follow an episode in
its env depends on that episode's length. Every statistic is a sum over envs, which a multi-process run
all-reduces (``distributed.Reduction``); so they need at least two envs over all processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from pg_lightning import functional as F
from pg_lightning.segments import segment_ids
from pg_lightning.batch import RolloutBatch
from pg_lightning.distributed import LOCAL, Reduction
from pg_lightning.validation import require, unit_interval
from pg_lightning.value import ValueFunctionConfig

BaselineKind = Literal["none", "average", "optimal", "value"]
BASELINES = ("none", "average", "optimal", "value")


@dataclass(frozen=True)
class EstimatorOutput:
    """What an estimator gives the pseudo-loss; every tensor is ``[T, B]``.

    Attributes:
        weights: Ψ_t (0 where ``mask`` is False).
        mask: the steps that enter the loss.
        segments: trajectory-segment id of each step (-1 on reset steps), see ``functional.segment_ids``.
        num_segments: N, the number of segments with a used step.
        value_targets: regression targets for V_φ (bootstrapped reward-to-go), or None.
    """

    weights: torch.Tensor
    mask: torch.Tensor
    segments: torch.Tensor
    num_segments: torch.Tensor
    value_targets: torch.Tensor | None = None


@dataclass(frozen=True)
class Estimator:
    """A policy-gradient estimator, configurable field by field.

    Args:
        name: the preset's name, as reported in ``summary.json``.
        gamma: discount γ in [0, 1].
        reward_to_go: weight step t by its reward-to-go Q_t (causality, §5.1) instead of R(τ).
        baseline: ``none``; ``average`` (the other envs' mean of the weights); ``optimal``
            (per-parameter b*, trajectory form: needs ``reward_to_go=False``; costs one batched backward
            pass per batch giving an ``[N, P]`` matrix of per-trajectory score vectors); ``value``
            (learned V_φ: needs ``value`` and ``reward_to_go=True``).
        gae_lambda: λ of GAE for ``baseline=value``; 1 is the plain value baseline Q̂_t - V(s_t).
        normalize: (Ψ - the other envs' mean) / the batch's std of Ψ (``functional.standardize``).
        value: the value function's settings, for ``baseline=value`` only.
    """

    name: str = "baseline"
    gamma: float = 0.99
    reward_to_go: bool = True
    baseline: BaselineKind = "average"
    gae_lambda: float = 1.0
    normalize: bool = False
    value: ValueFunctionConfig | None = field(default=None)

    def __post_init__(self) -> None:
        require("estimator.gamma", self.gamma, unit_interval, "in [0, 1]")
        if self.baseline not in BASELINES:
            raise ValueError(f"estimator.baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        require("estimator.gae_lambda", self.gae_lambda, unit_interval, "in [0, 1]")
        if self.baseline == "value":
            if self.value is None:
                raise ValueError("estimator.value is required for estimator.baseline=value (a learned V needs its settings)")
            if not self.reward_to_go:
                raise ValueError("estimator.reward_to_go=false cannot be combined with estimator.baseline=value")
        else:
            if self.value is not None:
                raise ValueError(f"estimator.value is only used with estimator.baseline=value, got baseline={self.baseline!r}")
            if self.gae_lambda != 1.0:
                raise ValueError(f"estimator.gae_lambda={self.gae_lambda} needs estimator.baseline=value")
        if self.baseline == "optimal" and self.reward_to_go:
            raise ValueError("estimator.baseline=optimal is the trajectory form of §5.2: set estimator.reward_to_go=false")

    @property
    def needs_value(self) -> bool:
        return self.baseline == "value"

    @property
    def needs_other_envs(self) -> bool:
        """Its weights use statistics of the other envs (a batch baseline or ``normalize``)."""
        return self.baseline in ("average", "optimal") or self.normalize

    def __call__(
        self, batch: RolloutBatch, values: torch.Tensor | None = None, reduction: Reduction = LOCAL
    ) -> EstimatorOutput:
        """Weights Ψ, mask, segments and N for ``batch``; ``values`` is V_φ(obs) ``[T + 1, B]`` if needed.

        With several processes, ``reduction`` makes the batch statistics (baseline totals, normalisation,
        N) those of the whole batch over all ranks.
        """
        done = batch.done
        segments = segment_ids(batch.valid, done)
        value_targets = None
        if self.needs_value:
            if values is None:
                raise ValueError(f"estimator {self.name!r} needs the values V(obs) of the batch")
            mask = batch.valid
            weights = F.generalized_advantages(batch.rew, values, batch.terminated, done, self.gamma, self.gae_lambda)
            lambda_targets = self.value is not None and self.value.targets == "lambda_returns"
            returns = weights if self.gae_lambda == 1.0 or lambda_targets else F.generalized_advantages(
                batch.rew, values, batch.terminated, done, self.gamma, 1.0
            )
            value_targets = returns + values[:-1]  # Q̂_t (λ = 1) or the λ-return A_t^λ + V(s_t)
        else:
            mask = batch.valid & F.ends_in_batch(done)
            if self.reward_to_go:
                weights = F.reward_to_go(batch.rew, done, self.gamma)
            else:
                weights = F.episode_returns(
                    batch.rew, done, batch.valid, self.gamma, batch.return_before, batch.length_before
                )
            if self.baseline == "average":
                weights = weights - F.other_envs_mean(weights, mask, reduction)
        if self.normalize:
            weights = F.standardize(weights, mask, reduction=reduction)
        num_segments = reduction.sum(torch.tensor(torch.unique(segments[mask]).numel(), device=weights.device))
        return EstimatorOutput(
            weights=weights * mask,
            mask=mask,
            segments=segments,
            num_segments=num_segments,
            value_targets=value_targets,
        )


def reinforce(gamma: float = 0.99) -> Estimator:
    """REINFORCE: Ψ_t = R(τ) (lecture §2)."""
    return Estimator(name="reinforce", gamma=gamma, reward_to_go=False, baseline="none")


def reward_to_go(gamma: float = 0.99) -> Estimator:
    """Reward-to-go: Ψ_t = Q_t (lecture §5.1)."""
    return Estimator(name="reward_to_go", gamma=gamma, reward_to_go=True, baseline="none")


def baseline(gamma: float = 0.99) -> Estimator:
    """Reward-to-go minus the other envs' average (lecture §5.2)."""
    return Estimator(name="baseline", gamma=gamma, reward_to_go=True, baseline="average")


def reinforce_baseline(gamma: float = 0.99) -> Estimator:
    """R(τ) minus the other envs' average return (lecture §5.2 as written)."""
    return Estimator(name="reinforce_baseline", gamma=gamma, reward_to_go=False, baseline="average")


def optimal_baseline(gamma: float = 0.99) -> Estimator:
    """R(τ) minus the per-parameter optimal baseline b*_k (lecture §5.2)."""
    return Estimator(name="optimal_baseline", gamma=gamma, reward_to_go=False, baseline="optimal")


def value_baseline(gamma: float = 0.99, value: ValueFunctionConfig = ValueFunctionConfig()) -> Estimator:
    """Bootstrapped reward-to-go minus a learned V_φ(s_t)."""
    return Estimator(name="value_baseline", gamma=gamma, baseline="value", value=value)


def gae(gamma: float = 0.99, gae_lambda: float = 0.95, value: ValueFunctionConfig = ValueFunctionConfig()) -> Estimator:
    """Generalised advantage estimation with a learned V_φ."""
    return Estimator(name="gae", gamma=gamma, baseline="value", gae_lambda=gae_lambda, value=value)
