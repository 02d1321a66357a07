"""Pure tensor math of the lecture: returns, reward-to-go, masks and the pseudo-loss.

Every function takes time-major tensors ``[T, B]`` (T steps of B environments) and touches no
parameters, so each can be checked against a plain Python loop (``tests/test_functional.py``).
"""

from __future__ import annotations

import torch


def reward_to_go(rew: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted reward-to-go within each episode (lecture §5.1).

        Q_t = Σ_{t' ≥ t, same episode} γ^{t'-t} r_{t'}   i.e.  Q_t = r_t + γ (1 - done_t) Q_{t+1}

    Args:
        rew: ``[T, B]`` rewards.
        done: ``[T, B]`` bool, the episode ended at step ``t`` (terminated or truncated).
        gamma: discount in [0, 1].

    Returns:
        ``[T, B]``. After the last step nothing is known, so Q of an episode still running at ``T - 1``
        counts only the rewards inside the batch; callers mask those steps (see ``ends_in_batch``).
    """
    out = torch.empty_like(rew)
    future = torch.zeros_like(rew[0])
    continues = (~done).to(rew.dtype)
    for t in range(rew.shape[0] - 1, -1, -1):
        future = rew[t] + gamma * continues[t] * future
        out[t] = future
    return out


def ends_in_batch(done: torch.Tensor) -> torch.Tensor:
    """``[T, B]`` bool: the episode that step ``t`` belongs to ends at some step ``t' ≥ t`` of the batch.

    The first ``done`` at or after ``t`` is the end of step ``t``'s episode, so this is a reversed
    cumulative OR of ``done`` over time.
    """
    return done.flip(0).to(torch.uint8).cummax(0).values.flip(0).bool()


def episode_returns(
    rew: torch.Tensor,
    done: torch.Tensor,
    valid: torch.Tensor,
    gamma: float,
    return_before: torch.Tensor,
    length_before: torch.Tensor,
) -> torch.Tensor:
    """The full discounted return R(τ) = Σ_k γ^k r_k of the episode each step belongs to (lecture §2).

    ``k`` counts an episode's steps from its first one, also across batches: an episode running at
    step 0 began ``length_before`` steps earlier and had earned ``return_before`` by then.

    Args:
        rew, done, valid: ``[T, B]``; reset steps (``valid`` False) belong to no episode.
        gamma: discount in [0, 1].
        return_before: ``[B]`` discounted return earned before the batch by the episode running at step 0.
        length_before: ``[B]`` number of steps that episode had before the batch.

    Returns:
        ``[T, B]``: R(τ) at every step of an episode that ends in the batch; for an episode still
        running at ``T - 1``, the return so far (its steps are masked by the callers).
    """
    num_steps = rew.shape[0]
    earned = return_before.to(rew.dtype).clone()
    discount = torch.pow(torch.as_tensor(gamma, dtype=rew.dtype), length_before.to(rew.dtype))
    so_far = torch.empty_like(rew)
    for t in range(num_steps):
        # A reset step starts a fresh episode at t + 1: nothing earned, discount back to γ^0.
        earned = torch.where(valid[t], earned + discount * rew[t], torch.zeros_like(earned))
        discount = torch.where(valid[t], discount * gamma, torch.ones_like(discount))
        so_far[t] = earned
    # Each step takes the total of its episode: the value at the episode's last step in the batch.
    total = torch.empty_like(rew)
    carry = so_far[-1]
    for t in range(num_steps - 1, -1, -1):
        carry = torch.where(done[t], so_far[t], carry)
        total[t] = carry
    return total


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (0 when the mask is empty)."""
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), values.new_zeros(()))


def pseudo_loss(
    logp: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_episodes: torch.Tensor | int
) -> torch.Tensor:
    """The negated pseudo-objective of lecture §7.2, whose gradient is the policy-gradient estimate.

        J~ = (1/N) Σ_i Σ_t log π_θ(a_it|s_it) · Ψ_it        loss = -J~

    Args:
        logp: ``[T, B]`` log π_θ(a_t|s_t), differentiable in θ.
        weights: ``[T, B]`` Ψ_t, the estimator's weights (treated as constants: detached here).
        mask: ``[T, B]`` bool, the steps that enter the sum.
        num_episodes: N, the number of trajectories the sum runs over.

    Returns:
        A scalar; ``-∇_θ loss`` is the estimate of ∇_θ J(θ).
    """
    terms = logp * weights.detach() * mask
    return -terms.sum() / max(float(num_episodes), 1.0)
