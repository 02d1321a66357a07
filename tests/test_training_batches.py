"""The gradient that *training* takes is unbiased: batches from ``module.collect_batch()``, not from ``collect``.

The exact-gradient tests of ``test_exact_gradients.py`` give the estimators batches of whole episodes drawn
one per env. Training collects its own batches (``RolloutCollector`` in the module), so the property must
be checked on them: on a tabular MDP whose episode lengths are random and depend on the actions (mean ≈ 7,
capped at 30) with T = 8 steps per env, the mean over M batches of N · ĝ, where ĝ is the gradient of
``policy_loss`` and N its number of trajectories, must point along the exact ∇J (it is unbiased for
E[N] ∇J):

- along ∇J: the component of the mean is positive, more than Z standard errors;
- across ∇J: in the eigenbasis of the estimates' covariance restricted to the orthogonal complement of ∇J,
  every coordinate of the mean is within Z standard errors of 0 (directions with no variance must have no
  mean either).

Both after a burn-in of consecutive batches (steady state) and on the first batch after ``setup`` (M fresh
setups). The same statistic rejects the rule training used before: T steps per env, episodes running on
across batches, and only the steps whose episode ends in the batch kept.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from pg_lightning import PolicyGradientModule, VectorEnvFactory
from pg_lightning import estimators as E
from pg_lightning.gradient import policy_loss
from pg_lightning.mdps import exact_objective, random_length
from pg_lightning.policies import mlp_policy
from pg_lightning.rollout import RolloutCollector

NUM_BATCHES, NUM_ENVS, STEPS_PER_ENV, BURN_IN = 1000, 32, 8, 10
Z = 4.0
ENV_ID = "PgTest/RandomLength-v0"
ESTIMATORS = {
    "reinforce": E.reinforce(1.0),
    "reward_to_go": E.reward_to_go(1.0),
    "baseline": E.baseline(1.0),
    "reinforce_baseline": E.reinforce_baseline(1.0),
}

gym.register(ENV_ID, entry_point=random_length, max_episode_steps=30)


def tabular_policy() -> torch.nn.Module:
    mdp = random_length()
    policy = mlp_policy(mdp.observation_space, mdp.action_space, hidden_sizes=[])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return policy


def exact_gradient(policy: torch.nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(exact_objective(policy, random_length(), gamma=1.0), list(policy.parameters()))
    return torch.cat([g.flatten() for g in grads])


def make_module(policy: torch.nn.Module, seed: int) -> PolicyGradientModule:
    """The documented entry point, set up as a Trainer would (the estimator only picks the batch rule)."""
    module = PolicyGradientModule(
        env=VectorEnvFactory(ENV_ID, num_envs=NUM_ENVS),
        policy=policy,
        estimator=ESTIMATORS["reinforce"],
        steps_per_env=STEPS_PER_ENV,
        seed=seed,
    )
    module.setup("fit")
    return module


def use_the_old_rule(module: PolicyGradientModule, seed: int) -> None:
    """T steps per env, episodes continuing across batches; the estimators then keep only ended episodes."""
    module.collector = RolloutCollector(module.env.make(), STEPS_PER_ENV, gamma=1.0, seed=seed, whole_episodes=False)


def scaled_gradients(module: PolicyGradientModule, batch) -> dict[str, torch.Tensor]:
    """N · ĝ of each estimator on ``batch``: ĝ = -∇ policy_loss, N = ``estimate.num_segments``."""
    out = {}
    for name, estimator in ESTIMATORS.items():
        result = policy_loss(module.policy, batch, estimator)
        grads = torch.autograd.grad(-result.loss, list(module.policy.parameters()))
        out[name] = torch.cat([g.flatten() for g in grads]).double() * float(result.estimate.num_segments)
    return out


def steady_state(old_rule: bool = False) -> dict[str, torch.Tensor]:
    """``[M, P]`` per estimator: consecutive batches of one module after ``BURN_IN`` batches."""
    torch.manual_seed(1)
    module = make_module(tabular_policy(), seed=1)
    if old_rule:
        use_the_old_rule(module, seed=1)
    for _ in range(BURN_IN):
        module.collect_batch()
    rows = [scaled_gradients(module, module.collect_batch()) for _ in range(NUM_BATCHES)]
    return {name: torch.stack([row[name] for row in rows]) for name in ESTIMATORS}


def first_batches(old_rule: bool = False) -> dict[str, torch.Tensor]:
    """``[M, P]`` per estimator: the first batch after ``setup`` of M modules with seeds 0 … M-1."""
    policy = tabular_policy()
    rows = []
    for seed in range(NUM_BATCHES):
        torch.manual_seed(seed)
        module = make_module(policy, seed=seed)
        if old_rule:
            use_the_old_rule(module, seed)
        rows.append(scaled_gradients(module, module.collect_batch()))
        module.teardown("fit")
    return {name: torch.stack([row[name] for row in rows]) for name in ESTIMATORS}


def direction_z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(z along ∇J, largest |z| across ∇J) of the mean of ``estimates [M, P]`` in standard errors."""
    num, _ = estimates.shape
    mean, covariance = estimates.mean(0), torch.cov(estimates.T)
    u = (exact / exact.norm()).double()
    along = float(mean @ u / torch.sqrt(u @ covariance @ u / num))
    across = torch.eye(len(u), dtype=torch.float64) - torch.outer(u, u)
    eigenvalues, eigenvectors = torch.linalg.eigh(across @ covariance @ across)
    coordinates = eigenvectors.T @ (across @ mean)
    noisy = eigenvalues > 1e-9 * eigenvalues.max()
    z_across = coordinates[noisy].abs() / torch.sqrt(eigenvalues[noisy] / num)
    # A direction with no variance must have no mean either: the softmax's shift invariance, the bias (the sum
    # of the one-hot columns) and the terminal state's inputs leave 4 of the 12 directions free; the others
    # carry float32 rounding only (relative 1e-6 here).
    silent = coordinates[~noisy].abs().max() if (~noisy).any() else torch.zeros(())
    return along, max(float(z_across.max()), float("inf") if silent > 1e-4 * float(mean.norm()) else 0.0)


@pytest.fixture(scope="module")
def exact() -> torch.Tensor:
    gradient = exact_gradient(tabular_policy())
    assert gradient.abs().max() > 0.05, "a zero gradient would make the check vacuous"
    return gradient


@pytest.fixture(scope="module")
def steady() -> dict[str, torch.Tensor]:
    return steady_state()


@pytest.fixture(scope="module")
def first() -> dict[str, torch.Tensor]:
    return first_batches()


@pytest.mark.slow
@pytest.mark.parametrize("name", ESTIMATORS)
def test_training_batches_give_an_unbiased_gradient_in_steady_state(name, steady, exact):
    along, across = direction_z_scores(steady[name], exact)
    assert along > Z and across < Z, f"{name}: along ∇J {along:.1f} SE, across {across:.1f} SE"


@pytest.mark.slow
@pytest.mark.parametrize("name", ESTIMATORS)
def test_the_first_batch_after_setup_gives_an_unbiased_gradient(name, first, exact):
    along, across = direction_z_scores(first[name], exact)
    assert along > Z and across < Z, f"{name}: along ∇J {along:.1f} SE, across {across:.1f} SE"


@pytest.mark.slow
def test_the_statistic_rejects_the_old_rule_of_keeping_episodes_that_end_in_the_batch(exact):
    """T steps per env with only ended episodes used: measured 11–30 SE across ∇J; every estimator is rejected."""
    for name, estimates in steady_state(old_rule=True).items():
        along, across = direction_z_scores(estimates, exact)
        assert across > Z, f"{name}: across {across:.1f} SE"


def test_batches_hold_whole_episodes_that_start_before_their_env_has_T_steps():
    module = make_module(tabular_policy(), seed=3)
    taken = 0
    for _ in range(5):
        batch = module.collect_batch()
        taken += batch.env_steps
        for env in range(batch.num_envs):
            valid, done = batch.valid[:, env], batch.done[:, env]
            steps = torch.nonzero(valid).flatten()
            ends = torch.nonzero(done).flatten()
            assert len(ends) > 0 and bool(done[steps[-1]]), "the env's last used step ends an episode"
            # Every episode but the last started before the env had T steps; the last one made it reach T.
            before_last_start = int(valid[: int(ends[-2]) + 1].sum()) if len(ends) > 1 else 0
            assert before_last_start < STEPS_PER_ENV <= int(valid.sum())
        assert batch.env_steps >= batch.used_steps == int(batch.valid.sum())
        assert batch.env_steps == int(batch.steps_taken.sum())
    assert module.collector.env_steps == taken  # steps no episode uses are env steps too
