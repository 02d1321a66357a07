"""Invalid-action masks from the env (``info["action_mask"]``): π restricted to the allowed actions at collection,
in training's loss and in evaluation; the gradient of the masked policy is unbiased on an MDP with exact ∇J."""

from __future__ import annotations

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import VectorEnv
from test_configs import compose_with

from pg_lightning import estimators as E
from pg_lightning.analysis import collect, estimate_gradient
from pg_lightning.distributions import MultiCategorical, mask_actions
from pg_lightning.evaluation import evaluate_policy
from pg_lightning.mdps import exact_objective, masked_chain
from pg_lightning.policies import mlp_policy
from pg_lightning.recurrent import action_distribution
from pg_lightning.rollout import RolloutCollector
from pg_lightning.run import train

BATCHES, EPISODES_PER_BATCH, Z = 400, 16, 4.0


def test_a_masked_categorical_gives_masked_actions_no_probability():
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.0, 5.0, 0.0]])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    dist = mask_actions(torch.distributions.Categorical(logits=logits), mask)
    assert torch.equal(dist.probs[~mask], torch.zeros(2))
    torch.testing.assert_close(dist.probs.sum(-1), torch.ones(2))
    assert torch.equal(dist.mode, torch.tensor([1, 0])), "the mode is taken among the allowed actions"
    assert torch.isfinite(dist.entropy()).all()


def test_a_multi_discrete_mask_applies_per_component():
    nvec = np.array([2, 3])
    mask = torch.tensor([[True, False, False, True, True]] * 5000)
    act = mask_actions(MultiCategorical(torch.zeros(5000, 5), nvec), mask).sample()
    assert (act[:, 0] == 0).all() and set(act[:, 1].tolist()) == {1, 2}


@pytest.fixture(scope="module")
def masked_samples():
    """Whole episodes of ``masked_chain`` collected by the training rollout with a random tabular policy; the env
    raises on any disallowed action, so collecting them at all shows none was sampled."""
    mdp = masked_chain()
    policy = mlp_policy(mdp.observation_space, mdp.action_space, hidden_sizes=[])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    envs = gym.vector.SyncVectorEnv([masked_chain] * (BATCHES * EPISODES_PER_BATCH))
    torch.manual_seed(4)
    batch = collect(policy, envs, num_episodes=envs.num_envs, seed=4)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_objective(policy, mdp), list(policy.parameters()))])
    return policy, batch, exact.double()


def estimates(policy, batch, estimator) -> torch.Tensor:
    rows = []
    for i in range(BATCHES):
        part = batch.select_envs(slice(i * EPISODES_PER_BATCH, (i + 1) * EPISODES_PER_BATCH))
        rows.append(torch.cat([g.flatten() for g in estimate_gradient(policy, part, estimator)]))
    return torch.stack(rows).double()


def z_scores(rows: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (rows.mean(0) - exact).abs() / (rows.std(0) / math.sqrt(len(rows)) + 1e-12)


def test_the_stored_log_probs_are_the_masked_policys_and_training_recomputes_them(masked_samples):
    policy, batch, _ = masked_samples
    valid = batch.valid
    assert batch.action_mask is not None and not batch.action_mask[valid].all(), "some actions were masked"
    recomputed = action_distribution(policy, batch).log_prob(batch.act)
    torch.testing.assert_close(recomputed[valid], batch.logp_behavior[valid])
    unmasked = policy(batch.obs[:-1]).log_prob(batch.act)
    assert not torch.allclose(unmasked[valid], batch.logp_behavior[valid], atol=1e-3)


@pytest.mark.parametrize("estimator", [E.reinforce(1.0), E.reward_to_go(1.0), E.optimal_baseline(1.0)],
                         ids=["reinforce", "reward_to_go", "optimal_baseline"])
def test_the_masked_policys_gradient_estimate_matches_the_exact_gradient(masked_samples, estimator):
    """The logits of a masked (state, action) pair get no gradient, exactly (∇J) and up to float rounding (the
    estimates: the policy's own normalisation over all actions cancels only numerically); every other
    coordinate is within 4 SE."""
    policy, batch, exact = masked_samples
    assert exact.abs().max() > 0.1
    rows = estimates(policy, batch, estimator)
    inert = rows.abs().max(0).values < 1e-5  # the masked pairs and the terminal state's column
    assert inert.sum() >= 4 and (exact[inert] == 0).all()
    z = z_scores(rows[:, ~inert], exact[~inert])
    assert (z <= Z).all(), z.tolist()


def test_training_without_the_mask_is_caught_as_biased(masked_samples):
    """The same episodes with the mask dropped from the batch: training differentiates the unmasked log π, whose
    score is not the masked policy's, and the mean estimate misses ∇J by many standard errors."""
    policy, batch, exact = masked_samples
    z = z_scores(estimates(policy, dataclasses.replace(batch, action_mask=None), E.reinforce(1.0)), exact)
    assert z.max() > 3 * Z, z.tolist()


class MaskedBanditVectorEnv(VectorEnv):
    """A natively vectorised env (no per-env objects): 3 arms, a random arm forbidden at each step; it raises
    on a forbidden arm and pays the arm's index. Its info holds ``action_mask`` without gymnasium's ``_`` keys."""

    def __init__(self, num_envs: int = 4):
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(0.0, 1.0, shape=(3,), dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(3)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.rng = np.random.default_rng(0)
        self.mask = np.ones((num_envs, 3), dtype=bool)
        self.t = np.zeros(num_envs, dtype=int)

    def _draw(self):
        self.mask = np.ones((self.num_envs, 3), dtype=bool)
        self.mask[np.arange(self.num_envs), self.rng.integers(3, size=self.num_envs)] = False
        return self.mask.astype(np.float32), {"action_mask": self.mask.copy()}

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t[:] = 0
        return self._draw()

    def step(self, actions):
        assert self.mask[np.arange(self.num_envs), actions].all(), (self.mask, actions)
        self.t += 1
        done = self.t >= 5
        self.t[done] = 0
        obs, info = self._draw()
        return obs, actions.astype(np.float64), done, np.zeros(self.num_envs, dtype=bool), info


def test_masks_from_a_natively_vectorised_env_are_used_in_rollout_and_evaluation():
    torch.manual_seed(0)
    envs = MaskedBanditVectorEnv()
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space)
    with torch.no_grad():  # the policy prefers the arm that is often forbidden: unmasked, it would be taken
        policy.logits[-1].bias.copy_(torch.tensor([0.0, 0.0, 6.0]))
    batch = RolloutCollector(envs, steps_per_env=60, seed=0).collect(policy)
    torch.testing.assert_close(action_distribution(policy, batch).log_prob(batch.act), batch.logp_behavior)
    assert (batch.act == 2).any() and (batch.act != 2).any()
    returns = evaluate_policy(policy, MaskedBanditVectorEnv(), seed=1, max_steps=100)
    assert np.isfinite(returns).all()


@pytest.mark.slow
def test_an_env_with_masks_trains_and_evaluates_within_them(tmp_path):
    """``PgTest/MaskedCode-v0`` (``conftest.CodeEnv`` with masks) raises on a masked action, in training and in
    the evaluation. Of the optimal 16, uniform allowed actions earn 8 and the best context-free preference order
    (the first allowed value of a fixed ranking per component) 9.3: a return of 12 needs the policy to read the
    context."""
    summary = train(compose_with("logger=csv", "stop_on_solve=false", "env.id=PgTest/MaskedCode-v0", "env.num_envs=4",
                                 "steps_per_env=64", "total_env_steps=12000", "eval.num_episodes=8",
                                 "estimator=gae", "off_policy=clipped"), tmp_path)
    assert summary["status"] == "finished"
    assert summary["eval_return_mean"] >= 12.0, summary["eval_return_mean"]


def test_a_mask_that_allows_nothing_is_refused_in_one_line():
    class NothingAllowed(MaskedBanditVectorEnv):
        def _draw(self):
            obs, info = super()._draw()
            info["action_mask"][1] = False
            return obs, info

    envs = NothingAllowed()
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space)
    with pytest.raises(ValueError, match=r"at env step 0: info\['action_mask'\] allows no action") as info:
        RolloutCollector(envs, steps_per_env=4, seed=0, name="NothingAllowed").collect(policy)
    assert "\n" not in str(info.value)
    # The evaluation reads the mask through the same check (before it, an all-False mask made π's logits all
    # -inf there and the mode an arbitrary action).
    with pytest.raises(ValueError, match=r"^evaluation on .* at step 0: info\['action_mask'\] allows no action") as info:
        evaluate_policy(policy, NothingAllowed(), seed=0, max_steps=10)
    assert "\n" not in str(info.value)


def test_a_mask_in_a_dict_observation_is_moved_to_the_info_by_a_wrapper():
    """PettingZoo-style envs carry the mask in the observation: ``ActionMaskToInfo`` (first in env.wrappers) moves it
    to the info, and the rest is flattened; the env raises on a masked action, so collecting shows none was taken."""
    from pg_lightning.envs import VectorEnvFactory

    factory = VectorEnvFactory("PgTest/MaskInObservation-v0", num_envs=3, wrappers=[
        {"name": "pg_lightning.envs.ActionMaskToInfo"}, {"name": "gymnasium.wrappers.FlattenObservation"}])
    envs = factory.make()
    assert envs.single_observation_space.shape == (3,), "the mask is not part of what the policy reads"
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space)
    batch = RolloutCollector(envs, steps_per_env=40, seed=0).collect(policy)
    assert batch.action_mask is not None and batch.action_mask.shape == (40, 3, 7)
    torch.testing.assert_close(action_distribution(policy, batch).log_prob(batch.act), batch.logp_behavior)
