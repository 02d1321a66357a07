"""Gradient estimators: hyperparameters that turn a rollout batch into per-step weights Ψ_t.

The pseudo-loss (``functional.pseudo_loss``) is the same for every estimator; they differ only in Ψ:

    reinforce      Ψ_t = R(τ)             full discounted return of the step's episode   (lecture §2)
    reward_to_go   Ψ_t = Q_t              Σ_{t'≥t} γ^{t'-t} r_t'                          (§5.1)
    baseline       Ψ_t = Q_t - b          b = the batch average of Q_t over the used steps  (§5.2)

Episodes cut by the end of a batch
----------------------------------
A batch is ``T`` steps of each env, and episodes run on across batches (they are not reset when an
iteration ends). For a step whose episode is still running at the batch's last step, neither Q_t nor
R(τ) is known: the rewards that decide them have not happened yet. None of these presets can bootstrap
them (they have no value function), so such steps are left out of the loss (``mask`` False); they still
count as env steps. The episode continues in the next batch, where its remaining steps are used
with their exact Q_t, and REINFORCE's R(τ) includes what the episode earned before that batch
(``RolloutBatch.return_before``). A time-limit truncation is the end of the finite-horizon episode
(lecture §1: the sum runs to T) and is used like a termination. ``N`` in the pseudo-loss is the number
of episodes that end in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pg_lightning import functional as F
from pg_lightning.batch import RolloutBatch

BaselineKind = Literal["none", "average"]


@dataclass(frozen=True)
class EstimatorOutput:
    """What an estimator gives the pseudo-loss.

    ``weights`` and ``mask`` are ``[T, B]``; ``num_episodes`` is N of lecture §7.2.
    """

    weights: torch.Tensor
    mask: torch.Tensor
    num_episodes: torch.Tensor


@dataclass(frozen=True)
class Estimator:
    """A policy-gradient estimator, configurable field by field.

    Args:
        name: the preset's name, as reported in ``summary.json``.
        gamma: discount γ in [0, 1].
        reward_to_go: weight step t by its reward-to-go Q_t (causality, §5.1) instead of R(τ).
        baseline: ``"none"``, or ``"average"``: subtract b = mean of the (unbaselined) weights over the
            batch's used steps (§5.2). A constant b leaves the gradient's expectation unchanged
            (E[∇ log π] = 0) and centres the weights, which lowers the variance.
    """

    name: str = "baseline"
    gamma: float = 0.99
    reward_to_go: bool = True
    baseline: BaselineKind = "average"

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"estimator.gamma must be in [0, 1], got {self.gamma}")
        if self.baseline not in ("none", "average"):
            raise ValueError(f"estimator.baseline must be 'none' or 'average', got {self.baseline!r}")

    def __call__(self, batch: RolloutBatch) -> EstimatorOutput:
        """Weights Ψ ``[T, B]``, the mask of steps that enter the loss, and N (see the module doc)."""
        done = batch.done
        mask = batch.valid & F.ends_in_batch(done)
        if self.reward_to_go:
            weights = F.reward_to_go(batch.rew, done, self.gamma)
        else:
            weights = F.episode_returns(
                batch.rew, done, batch.valid, self.gamma, batch.return_before, batch.length_before
            )
        if self.baseline == "average":
            weights = weights - F.masked_mean(weights, mask)
        num_episodes = (done & batch.valid).sum()
        return EstimatorOutput(weights=weights * mask, mask=mask, num_episodes=num_episodes)


def reinforce(gamma: float = 0.99) -> Estimator:
    """REINFORCE: Ψ_t = R(τ) (lecture §2)."""
    return Estimator(name="reinforce", gamma=gamma, reward_to_go=False, baseline="none")


def reward_to_go(gamma: float = 0.99) -> Estimator:
    """Reward-to-go: Ψ_t = Q_t (lecture §5.1)."""
    return Estimator(name="reward_to_go", gamma=gamma, reward_to_go=True, baseline="none")


def baseline(gamma: float = 0.99) -> Estimator:
    """Reward-to-go minus the batch-average: Ψ_t = Q_t - mean(Q) (lecture §5.2)."""
    return Estimator(name="baseline", gamma=gamma, reward_to_go=True, baseline="average")
