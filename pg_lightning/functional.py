"""The lecture's formulas as pure tensor functions, in the lecture's order.

Every function takes time-major tensors ``[T, B]`` (T steps of B environments) and touches no parameters, so
each can be checked against a plain Python loop (``tests/test_functional.py``). Segment ids and masked means
are in ``segments.py``; flattening and conjugate gradient in ``linalg.py``.
"""

from __future__ import annotations

import math

import torch

from pg_lightning.distributed import LOCAL, Reduction


# --- Returns (lecture §2): R(τ), and which steps have one ---------------------------------------------------


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


def ends_in_batch(done: torch.Tensor) -> torch.Tensor:
    """``[T, B]`` bool: the episode that step ``t`` belongs to ends at some step ``t' ≥ t`` of the batch.

    The first ``done`` at or after ``t`` is the end of step ``t``'s episode, so this is a reversed
    cumulative OR of ``done`` over time.
    """
    return done.flip(0).to(torch.uint8).cummax(0).values.flip(0).bool()


# --- Reward-to-go (lecture §5.1) ----------------------------------------------------------------------------


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


# --- Baselines (lecture §5.2): the other envs' mean, the optimal per-parameter b*, a learned V_φ (GAE) ------


def other_envs_mean(values: torch.Tensor, mask: torch.Tensor, reduction: Reduction = LOCAL) -> torch.Tensor:
    """``[B]``: for each env b, the mean of ``values [T, B]`` over the used steps of the *other* envs.

        b_env = (Σ_{e≠env} S_e) / (Σ_{e≠env} n_e),   S_e, n_e = sum and count of env e's used steps

    A baseline for env b's steps must not depend on their actions (lecture §5.2: E[∇ log π · b] = 0
    needs b independent of a). Other envs are independent of env b. Env b's own other episodes are not:
    in a whole-episode batch, how many episodes follow an episode in its env depends on how long that
    episode was. Both totals are sums: ``reduction`` makes them totals over all processes (other ranks'
    envs are other envs too). 0 where no other env has a used step.
    """
    own_sum = (values * mask).sum(0)
    own_count = mask.to(values.dtype).sum(0)
    total_sum, total_count = reduction.sum(torch.stack([own_sum.sum(), own_count.sum()]))
    others_count = total_count - own_count
    return torch.where(others_count > 0, (total_sum - own_sum) / others_count.clamp(min=1), torch.zeros_like(own_sum))


def standardize(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduction: Reduction = LOCAL) -> torch.Tensor:
    """``(values - μ_env) / σ`` over the masked steps (normalisation of Ψ); 0 off the mask.

    μ_env, for env b's steps, is the mean over the *other* envs' masked steps: a baseline independent of env b's
    actions (see ``other_envs_mean``). σ is the standard deviation over all masked steps of the batch: one
    positive number per batch, like the pseudo-loss's 1/N, so σ·N·ĝ is an unbiased estimate of E[N] ∇J. (Each
    env's σ from the other envs alone would be unbiased too, but with few envs it is often 0 near a return cap,
    where every other episode reaches it, and one env's weights then explode.) Normalising with the batch's own
    mean would not be unbiased: with 2 envs the mean is half env b's. Where no other env has used steps (one env
    on one process) the env's own mean is used. Sums n, Σx, Σx² are reduced over all processes, in float64
    around a shared centre.
    """
    used = mask.to(torch.float64)
    x = values.double()
    count, total = reduction.sum(torch.stack([used.sum(), (x * used).sum()]))
    centre = total / count.clamp(min=1)
    centred = (x - centre) * used  # any shared shift gives the same result; this one keeps Σx² small
    own = torch.stack([used.sum(0), centred.sum(0)])  # [2, B]: each env's count and sum
    totals = reduction.sum(torch.stack([own[0].sum(), own[1].sum(), (centred**2).sum()]))
    others_count, others_sum = totals[0] - own[0], totals[1] - own[1]
    alone = others_count <= 0
    env_mean = torch.where(alone, own[1] / own[0].clamp(min=1), others_sum / others_count.clamp(min=1))
    std = (totals[2] / totals[0].clamp(min=1)).sqrt()
    out = (centred - env_mean) / (std + eps) * used
    return out.to(values.dtype)


def optimal_baseline(
    scores: torch.Tensor, returns: torch.Tensor, envs: torch.Tensor, num_envs: int, reduction: Reduction = LOCAL
) -> torch.Tensor:
    """Per-parameter optimal baseline of lecture §5.2, from the other envs' trajectories: ``[N, P]``.

        b*_k = E[g_k² R] / E[g_k²],   g = Σ_t ∇_θ log π(a_t|s_t) of one trajectory

    For trajectory i of env e, both expectations are taken over the trajectories of the *other* envs,
    so b is independent of trajectory i's actions and the estimate stays unbiased (see
    ``other_envs_mean`` for why not merely the other trajectories). ``scores`` is ``[N, P]`` (g per
    trajectory), ``returns`` ``[N]`` (R per trajectory), ``envs`` ``[N]`` the env of each trajectory
    (0 … ``num_envs`` - 1). Where Σ_{j∉e} g_jk² = 0 the baseline is 0. The sums over trajectories are
    reduced over all processes by ``reduction``.
    """
    g2 = scores**2
    g2r = g2 * returns[:, None]
    own_g2 = g2.new_zeros(num_envs, g2.shape[1]).index_add(0, envs, g2)
    own_g2r = g2.new_zeros(num_envs, g2.shape[1]).index_add(0, envs, g2r)
    total_g2, total_g2r = reduction.sum(torch.stack([own_g2.sum(0), own_g2r.sum(0)]))
    others_g2 = (total_g2 - own_g2)[envs]
    others_g2r = (total_g2r - own_g2r)[envs]
    tiny = torch.finfo(g2.dtype).tiny
    return torch.where(others_g2 > 0, others_g2r / others_g2.clamp(min=tiny), torch.zeros_like(g2))


def generalized_advantages(
    rew: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), ``[T, B]``.

        δ_t = r_t + γ (1 - terminated_t) V(s_{t+1}) - V(s_t)
        A_t = δ_t + γ λ (1 - done_t) A_{t+1},           A_T = 0

    ``values`` is ``[T + 1, B]``, V at ``obs[0..T]``. Under NEXT_STEP autoreset ``obs[t + 1]`` after a
    final step is the true final observation, so a truncated episode bootstraps V(final obs), a
    terminated one uses 0, and an episode cut by the batch end bootstraps V(obs[T]).
    λ = 1 gives A_t = Q̂_t - V(s_t) with the bootstrapped reward-to-go Q̂_t (the value baseline);
    λ = 0 gives the one-step TD error δ_t.
    """
    continues = (~done).to(rew.dtype)
    alive = (~terminated).to(rew.dtype)
    deltas = rew + gamma * alive * values[1:] - values[:-1]
    out = torch.empty_like(rew)
    future = torch.zeros_like(rew[0])
    for t in range(rew.shape[0] - 1, -1, -1):
        future = deltas[t] + gamma * gae_lambda * continues[t] * future
        out[t] = future
    return out


# --- The pseudo-loss (lecture §7.2) -------------------------------------------------------------------------


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


# --- Importance weights (lecture §6.2) ----------------------------------------------------------------------


def log_ratio(logp: torch.Tensor, logp_behavior: torch.Tensor) -> torch.Tensor:
    """log ρ_t = log π_θ(a_t|s_t) - log π_b(a_t|s_t): the importance ratio's one definition (lecture §6.2).

    The direction is fixed here and nowhere else: the *current* policy over the *behaviour* policy
    that collected the step, so that E_{a~π_b}[ρ f(a)] = E_{a~π_θ}[f(a)].
    """
    return logp - logp_behavior


def trajectory_weights(
    log_weights: torch.Tensor, truncate: float | None = None, self_normalize: bool = False, reduction: Reduction = LOCAL
) -> torch.Tensor:
    """Importance weights w_i = Π_t ρ_it = exp(Σ_t log ρ_it) of whole trajectories, from their log (§6.2).

    Args:
        log_weights: ``[N]`` Σ_t log ρ_t per trajectory (sums, so no product of many ratios is formed).
        truncate: if set, w_i ← min(w_i, truncate) (truncated importance sampling, applied in log space).
        self_normalize: return w_i / Σ_j w_j (weighted importance sampling): the weights sum to 1.
            The largest log-weight is subtracted before ``exp``, so this never overflows or gives 0/0.
            Max and Σ are taken over all processes by ``reduction``.

    Returns:
        ``[N]`` float64 weights (float64 so that products over 500-step episodes stay representable).
    """
    log_weights = log_weights.double()
    if truncate is not None:
        log_weights = log_weights.clamp(max=math.log(truncate))
    if self_normalize:
        local_max = log_weights.max() if log_weights.numel() else log_weights.new_tensor(-torch.inf)
        shifted = (log_weights - reduction.max(local_max)).exp()
        return shifted / reduction.sum(shifted.sum())
    return log_weights.exp()


def effective_sample_size(weights: torch.Tensor, reduction: Reduction = LOCAL) -> torch.Tensor:
    """Kish's effective sample size as a fraction of the sample: (Σ w)² / (n Σ w²) ∈ (0, 1].

    1 when all weights are equal (on-policy data); 1/n when one sample carries all the weight.
    n, Σ w and Σ w² are summed over all processes by ``reduction``.
    """
    weights = weights.double()
    n, total, squares = reduction.sum(
        torch.stack([weights.new_tensor(float(weights.numel())), weights.sum(), (weights**2).sum()])
    )
    return total**2 / (n.clamp(min=1) * squares).clamp(min=torch.finfo(torch.float64).tiny)


# --- Per-step and clipped surrogates (lecture §6.3; PPO) ----------------------------------------------------


def per_step_surrogate(
    rho: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_segments: torch.Tensor | int
) -> torch.Tensor:
    """The first-order importance-sampled objective of lecture §6.3 (maximised; the loss is its negative).

        J~ = (1/N) Σ_t ρ_t Ψ_t,   ρ_t = π_θ(a_t|s_t) / π_b(a_t|s_t) = exp(``log_ratio``)

    Its gradient Σ_t ρ_t ∇log π_θ(a_t|s_t) Ψ_t / N ignores the change of the state distribution: biased
    unless θ = θ_b, far lower variance than the trajectory product. ``[T, B]`` inputs; N > 0 (fractional for
    a minibatch of steps, ``off_policy.select_steps``; 1 is used for 0).
    """
    terms = rho * weights
    return (terms * mask.to(weights.dtype)).sum() / positive_count(num_segments)


def clipped_surrogate(
    rho: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_segments: torch.Tensor | int, clip_ratio: float
) -> torch.Tensor:
    """The pessimistic clipped objective of PPO (Schulman et al. 2017), maximised:

        J~ = (1/N) Σ_t min(ρ_t Ψ_t, clip(ρ_t, 1 - ε, 1 + ε) Ψ_t),   ε = ``clip_ratio``

    It equals ``per_step_surrogate`` while ρ_t stays in [1 - ε, 1 + ε] and stops rewarding moves beyond.
    """
    terms = torch.minimum(rho * weights, rho.clamp(1 - clip_ratio, 1 + clip_ratio) * weights)
    return (terms * mask.to(weights.dtype)).sum() / positive_count(num_segments)


def positive_count(count: torch.Tensor | float) -> float:
    """N for a division: N itself when positive, 1 when no segment is used (the sum is 0 then)."""
    return float(count) if float(count) > 0 else 1.0


# --- The KL estimate ----------------------------------------------------------------------------------------


def kl_estimate(rho: torch.Tensor, log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[T, B]`` per-step estimates of KL(π_b ‖ π_θ) from samples of π_b (0 off the mask), given ρ and log ρ:

        k_t = (ρ_t - 1) - log ρ_t

    Non-negative for every ρ > 0, unbiased (E_{π_b}[ρ] = 1, so E[k] = E[-log ρ] = KL), and with zero gradient
    at θ = θ_b: the penalty ``kl_coef`` · mean k keeps θ near the data's policies (Schulman's "k3").
    """
    return ((rho - 1) - log_rho) * mask


# --- The natural-gradient step (lecture §8) -----------------------------------------------------------------


def kl_step_scale(curvature: torch.Tensor | float, max_kl: float) -> float:
    """The natural-gradient step length of lecture §8: β with ½ (βx)ᵀ F (βx) = δ, for x ≈ F⁻¹ g.

        β = sqrt(2 δ / xᵀ F x),   δ = ``max_kl``,  ``curvature`` = xᵀ F x (floored at 1e-12)
    """
    return math.sqrt(2 * max_kl / max(float(curvature), 1e-12))
