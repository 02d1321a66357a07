"""Estimators against exact gradients on small MDPs (lecture §2, §4, §5, §6).

For each MDP, M independent batches of n whole episodes are drawn with a fixed seed; each batch gives
one estimate ĝ. The mean of the M estimates must match the exact ∇J within 4 standard errors per
coordinate (|mean - ∇J| ≤ 4 · std/√M), and variances are compared with a margin of 4 relative standard
errors of a variance estimate (√(2/(M-1))). The data are the same for every estimator.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import gymnasium as gym
import pytest
import torch

from pg_lightning import estimators as E
from pg_lightning import functional as F
from pg_lightning.segments import masked_mean
from pg_lightning.batch import RolloutBatch
from pg_lightning.analysis import estimate_gradient
from pg_lightning.off_policy import OffPolicy
from pg_lightning.mdps import bandit, chain, exact_objective, exact_reward_to_go_surrogate
from pg_lightning.policies import mlp_policy
from pg_lightning.analysis import collect
from pg_lightning.value import ValueFunction

NUM_BATCHES, EPISODES_PER_BATCH = 1000, 32
Z = 4.0
VARIANCE_MARGIN = Z * math.sqrt(2 / (NUM_BATCHES - 1))
BANDIT_MEANS = [1.0, 5.0, 10.0]


@dataclass
class Samples:
    mdp: object
    policy: torch.nn.Module
    batch: RolloutBatch

    def estimates(self, estimator, value_fn=None, per_batch: int = EPISODES_PER_BATCH, policy=None, off_policy=None,
                  max_batches: int | None = None) -> torch.Tensor:
        """``[M, P]``: one flattened gradient estimate per batch of ``per_batch`` episodes (the first
        ``max_batches`` batches where given).

        ``policy`` is the policy whose gradient is estimated (default: the one that collected the data);
        with another policy, ``off_policy`` says how the data's behaviour log-probs are used.
        """
        policy = policy or self.policy
        total = self.batch.num_envs // per_batch
        total = total if max_batches is None else min(total, max_batches)
        rows = []
        for i in range(total):
            part = self.batch.select_envs(slice(i * per_batch, (i + 1) * per_batch))
            grads = estimate_gradient(policy, part, estimator, value_fn, off_policy=off_policy)
            rows.append(torch.cat([g.flatten() for g in grads]))
        return torch.stack(rows).double()

    def exact(self, objective, policy=None) -> torch.Tensor:
        policy = policy or self.policy
        grads = torch.autograd.grad(objective(policy), list(policy.parameters()))
        return torch.cat([g.flatten() for g in grads])


def draw(make_mdp, set_params, seed: int) -> Samples:
    mdp = make_mdp()
    policy = mlp_policy(mdp.observation_space, mdp.action_space, hidden_sizes=[])
    with torch.no_grad():
        set_params(policy)
    envs = gym.vector.SyncVectorEnv([make_mdp] * (NUM_BATCHES * EPISODES_PER_BATCH))
    torch.manual_seed(seed)
    return Samples(mdp, policy, collect(policy, envs, num_episodes=envs.num_envs, seed=seed))


def random_params(policy):
    generator = torch.Generator().manual_seed(0)
    for p in policy.parameters():
        p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def skewed_bandit_params(policy):
    policy.logits[0].weight.zero_()
    policy.logits[0].bias.copy_(torch.tensor([2.0, 0.3, -0.8]))  # π ≈ (0.80, 0.15, 0.05)


@pytest.fixture(scope="module")
def chain_samples() -> Samples:
    return draw(chain, random_params, seed=1)


@pytest.fixture(scope="module")
def bandit_samples() -> Samples:
    return draw(lambda: bandit(BANDIT_MEANS), skewed_bandit_params, seed=2)


@pytest.fixture(scope="module")
def shifted_bandit_samples() -> Samples:
    return draw(lambda: bandit([m + 20.0 for m in BANDIT_MEANS]), skewed_bandit_params, seed=2)


def fixed_value_function(obs_dim: int) -> ValueFunction:
    torch.manual_seed(3)
    return ValueFunction(obs_dim, E.ValueFunctionConfig(hidden_sizes=[8]))


def z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    return (estimates.mean(0) - exact).abs() / (standard_error + 1e-12)


def assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    deviation = (estimates.mean(0) - exact).abs()
    assert (deviation <= Z * standard_error + 1e-9).all(), f"|mean - exact| / SE = {(deviation / (standard_error + 1e-12)).tolist()}"


UNBIASED = {
    "reinforce": E.reinforce(1.0),
    "reward_to_go": E.reward_to_go(1.0),
    "baseline": E.baseline(1.0),
    "optimal_baseline": E.optimal_baseline(1.0),
    "reinforce_baseline": E.reinforce_baseline(1.0),
    "value_baseline": E.value_baseline(1.0, E.ValueFunctionConfig(hidden_sizes=[8])),
}


@pytest.mark.parametrize("name", UNBIASED)
@pytest.mark.parametrize("mdp", ["chain", "bandit"])
def test_mean_estimate_matches_the_exact_gradient(name, mdp, request):
    samples: Samples = request.getfixturevalue(f"{mdp}_samples")
    estimator = UNBIASED[name]
    value_fn = fixed_value_function(samples.mdp.observation_space.shape[0]) if estimator.needs_value else None
    exact = samples.exact(lambda policy: exact_objective(policy, samples.mdp, gamma=1.0))
    assert exact.abs().max() > 0.01, "a zero gradient would make the check vacuous"
    assert_unbiased(samples.estimates(estimator, value_fn), exact)


def test_discounted_estimators_match_their_exact_expectations(chain_samples):
    gamma = 0.5
    reinforce = chain_samples.estimates(E.reinforce(gamma))
    assert_unbiased(reinforce, chain_samples.exact(lambda p: exact_objective(p, chain_samples.mdp, gamma)))
    reward_to_go = chain_samples.estimates(E.reward_to_go(gamma))
    assert_unbiased(reward_to_go, chain_samples.exact(lambda p: exact_reward_to_go_surrogate(p, chain_samples.mdp, gamma)))
    # The check is sharp enough to see a dropped discount: the undiscounted expectation is far off.
    undiscounted = chain_samples.exact(lambda p: exact_reward_to_go_surrogate(p, chain_samples.mdp, 1.0))
    assert z_scores(reward_to_go, undiscounted).max() > 2 * Z


def test_a_baseline_that_sees_its_own_trajectory_is_caught_as_biased(chain_samples):
    """b = the mean return of a batch *including* trajectory i correlates with i's actions.

    With 2 episodes per batch, ĝ = ¼ (g_1 - g_2)(R_1 - R_2), whose mean is ½ ∇J: the unbiasedness
    check must reject it (this is why the presets leave each trajectory out of its own baseline).
    """

    @dataclass(frozen=True)
    class InSampleAverage(E.Estimator):
        def __call__(self, batch, values=None, reduction=None):
            out = E.reinforce(1.0)(batch)
            weights = (out.weights - masked_mean(out.weights, out.mask)) * out.mask
            return E.EstimatorOutput(weights, out.mask, out.segments, out.num_segments)

    # The first 2,000 pairs: the bias (half of ∇J) is many standard errors wide already; all 16,000 took ~100 s.
    estimates = chain_samples.estimates(InSampleAverage(name="in_sample", gamma=1.0, reward_to_go=False, baseline="none"),
                                        per_batch=2, max_batches=2000)
    exact = chain_samples.exact(lambda p: exact_objective(p, chain_samples.mdp, 1.0))
    z = z_scores(estimates, exact)
    assert z.max() > 2 * Z, z.max().item()  # 11.9 on this draw


def test_variance_ordering_on_the_chain(chain_samples):
    variance = {name: chain_samples.estimates(UNBIASED[name]).var(0).sum() for name in ("reinforce", "reward_to_go", "baseline")}
    assert variance["reward_to_go"] < variance["reinforce"] * (1 - VARIANCE_MARGIN)
    assert variance["baseline"] < variance["reward_to_go"] * (1 - VARIANCE_MARGIN)


def test_optimal_baseline_has_lower_variance_per_parameter(bandit_samples):
    optimal = bandit_samples.estimates(E.optimal_baseline(1.0)).var(0)
    average = bandit_samples.estimates(E.reinforce_baseline(1.0)).var(0)
    moving = average > 0  # parameters of the terminal state never get a gradient
    assert moving.sum() >= 6
    assert (optimal[moving] * (1 + VARIANCE_MARGIN) < average[moving]).all(), (optimal.tolist(), average.tolist())


def test_constant_reward_shift_raises_reinforce_variance_but_not_the_baselined_mean(bandit_samples, shifted_bandit_samples):
    """Lecture §4.1: adding 20 to every reward changes REINFORCE's spread; a baseline absorbs it."""
    exact = bandit_samples.exact(lambda p: exact_objective(p, bandit_samples.mdp, 1.0))
    shifted_exact = shifted_bandit_samples.exact(lambda p: exact_objective(p, shifted_bandit_samples.mdp, 1.0))
    torch.testing.assert_close(shifted_exact, exact)  # one step: J shifts by a constant, ∇J does not
    plain = bandit_samples.estimates(E.reinforce(1.0)).var(0).sum()
    shifted = shifted_bandit_samples.estimates(E.reinforce(1.0)).var(0).sum()
    assert shifted > plain * (1 + VARIANCE_MARGIN) * 2
    baselined = shifted_bandit_samples.estimates(E.baseline(1.0))
    assert_unbiased(baselined, exact)
    unshifted_baselined = bandit_samples.estimates(E.baseline(1.0)).var(0).sum()
    assert baselined.var(0).sum() < shifted * (1 - VARIANCE_MARGIN)
    assert baselined.var(0).sum() < unshifted_baselined * (1 + VARIANCE_MARGIN) * 1.5


# --- Off-policy (lecture §6): data of an older policy θ_b, the gradient at θ = θ_b + α Δ ---------------


def moved_policy(samples: Samples, alpha: float) -> torch.nn.Module:
    """The data's policy θ_b moved by α along a fixed random direction Δ (1.5 · N(0, 1) per parameter)."""
    generator = torch.Generator().manual_seed(7)
    policy = copy.deepcopy(samples.policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(alpha * 1.5 * torch.randn(p.shape, generator=generator))
    return policy


def off_policy_estimates(samples: Samples, alpha: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates of ∇J(θ_α) from θ_b's episodes with ``kind``'s importance weights, and the exact ∇J(θ_α)."""
    policy = moved_policy(samples, alpha)
    estimates = samples.estimates(E.reward_to_go(1.0), policy=policy, off_policy=OffPolicy(kind=kind))
    exact = samples.exact(lambda p: exact_objective(p, samples.mdp, 1.0), policy)
    return estimates, exact


def test_trajectory_importance_weights_give_an_unbiased_gradient_from_old_data(chain_samples):
    estimates, exact = off_policy_estimates(chain_samples, 1.0, "trajectory")
    assert_unbiased(estimates, exact)
    # θ is far enough from θ_b for this to mean something: the same data without ratios is rejected.
    unweighted = chain_samples.estimates(E.reward_to_go(1.0), policy=moved_policy(chain_samples, 1.0))
    assert z_scores(unweighted, exact).max() > 2 * Z


def test_a_flipped_ratio_is_caught_as_biased(chain_samples, monkeypatch):
    """π_b/π_θ instead of π_θ/π_b: the unbiasedness check above must reject it."""
    monkeypatch.setattr(F, "log_ratio", lambda logp, logp_behavior: logp_behavior - logp)
    estimates, exact = off_policy_estimates(chain_samples, 1.0, "trajectory")
    assert z_scores(estimates, exact).max() > 2 * Z


def test_per_step_ratios_are_biased_and_the_bias_shrinks_as_theta_nears_the_behaviour_policy(chain_samples):
    """§6.3: ignoring the state-distribution change biases the estimate by O(‖θ - θ_b‖).

    Far from θ_b the bias is many standard errors; the same episodes give a bias that shrinks with α
    and is within 4 SE of zero at α = 0.05 (α = 0 is the on-policy estimator, see test_off_policy.py).
    """
    norms = []
    for alpha in (0.4, 0.2, 0.1, 0.05):
        estimates, exact = off_policy_estimates(chain_samples, alpha, "per_step")
        norms.append(float((estimates.mean(0) - exact).norm()))
        if alpha == 0.4:
            assert z_scores(estimates, exact).max() > 2 * Z
    assert norms == sorted(norms, reverse=True), norms
    assert_unbiased(estimates, exact)


def test_per_step_ratios_have_lower_variance_than_trajectory_weights(chain_samples):
    per_step, _ = off_policy_estimates(chain_samples, 1.0, "per_step")
    trajectory, _ = off_policy_estimates(chain_samples, 1.0, "trajectory")
    assert per_step.var(0).sum() < trajectory.var(0).sum() * (1 - VARIANCE_MARGIN)
