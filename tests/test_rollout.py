"""Rollout collection: shapes, NEXT_STEP masking, terminated vs truncated, carry-over and seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import counting_envs

from pg_lightning import PolicyGradientModule, RolloutCollector, RolloutDataset, VectorEnvFactory, collect
from pg_lightning import functional as F
from pg_lightning.episodes import EpisodeTracker, reference_episodes
from pg_lightning.policies import mlp_policy


def uniform_policy(envs):
    return mlp_policy(envs.single_observation_space, envs.single_action_space, hidden_sizes=[])


def test_batch_shapes_are_time_major():
    envs = VectorEnvFactory("CartPole-v1", num_envs=3).make()
    batch = RolloutCollector(envs, steps_per_env=7, seed=0).collect(uniform_policy(envs))
    assert batch.obs.shape == (8, 3, 4)
    assert batch.act.shape == (7, 3)
    for name in ("rew", "terminated", "truncated", "valid", "logp_behavior"):
        assert getattr(batch, name).shape == (7, 3), name
    assert batch.return_before.shape == batch.length_before.shape == (3,)


def test_gaussian_batch_keeps_unclipped_actions_and_their_log_prob():
    factory = VectorEnvFactory("Pendulum-v1", num_envs=2)
    envs = factory.make()
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space, log_std_init=1.5)
    batch = RolloutCollector(envs, steps_per_env=50, seed=0).collect(policy)
    assert batch.act.shape == (50, 2, 1)
    assert batch.act.abs().max() > 2.0, "σ = e^1.5 must produce samples beyond Pendulum's bound of 2"
    torch.testing.assert_close(policy(batch.obs[:-1]).log_prob(batch.act), batch.logp_behavior)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_batch_from_inference_mode_is_differentiable_and_typed_like_the_samples(env_id):
    """The policy runs under inference mode; the batch must still be ordinary tensors that training backprops through."""
    envs = VectorEnvFactory(env_id, num_envs=3).make()
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space)
    batch = RolloutCollector(envs, steps_per_env=9, seed=0).collect(policy)
    for name in ("obs", "act", "rew", "valid", "logp_behavior"):
        assert not getattr(batch, name).is_inference(), name
    expected_dtype = torch.int64 if env_id == "CartPole-v1" else torch.float32
    assert batch.act.dtype == expected_dtype and batch.logp_behavior.dtype == torch.float32
    logp = policy(batch.obs[:-1]).log_prob(batch.act)
    torch.testing.assert_close(logp.detach(), batch.logp_behavior)
    (logp * batch.valid).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())


def test_reset_steps_are_masked_and_episodes_carry_over():
    # Episodes of 3 steps: done at t = 2, reset step at t = 3, next episode at t = 4, 5, 6, reset at 7, ...
    envs = counting_envs([3])
    collector = RolloutCollector(envs, steps_per_env=5, gamma=1.0, seed=0)
    policy = uniform_policy(envs)
    first = collector.collect(policy)
    assert first.valid[:, 0].tolist() == [True, True, True, False, True]
    assert first.terminated[:, 0].tolist() == [False, False, True, False, False]
    assert not first.truncated.any()
    assert first.rew[3, 0] == 0.0
    second = collector.collect(policy)
    # The episode that began at t = 4 of the first batch goes on; it had earned r_0 = 1 + a.
    assert second.length_before.tolist() == [1]
    assert second.return_before.tolist() == [float(first.rew[4, 0])]
    assert second.valid[:, 0].tolist() == [True, True, False, True, True]
    assert second.terminated[:, 0].tolist() == [False, True, False, False, False]
    returns, lengths = collector.episodes.pop()
    assert lengths == [3, 3], "episodes are tracked whole across the batch boundary"
    assert returns[1] == pytest.approx(float(first.rew[4, 0] + second.rew[0, 0] + second.rew[1, 0]))
    assert collector.env_steps == first.env_steps + second.env_steps == 8


def test_truncation_is_kept_apart_from_termination():
    envs = counting_envs([2], truncate=True)
    batch = RolloutCollector(envs, steps_per_env=6, seed=0).collect(uniform_policy(envs))
    assert batch.truncated[:, 0].tolist() == [False, True, False, False, True, False]
    assert not batch.terminated.any()


def test_same_seed_same_batch_and_different_seed_different_batch():
    def collect(seed: int):
        torch.manual_seed(seed)
        envs = VectorEnvFactory("CartPole-v1", num_envs=4).make()
        return RolloutCollector(envs, steps_per_env=64, seed=seed).collect(uniform_policy(envs))

    a, b, c = collect(0), collect(0), collect(1)
    for name in ("obs", "act", "rew", "terminated", "valid", "logp_behavior"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.obs, c.obs)


def test_dataset_yields_exactly_one_batch_per_iter_with_the_current_policy():
    """Trap 1: each iter() collects anew, so a weight change between iterations is seen at once."""
    envs = counting_envs([4, 4])
    policy = uniform_policy(envs)
    dataset = RolloutDataset(lambda: RolloutCollector(envs, steps_per_env=3, seed=0).collect(policy))
    assert len(list(iter(dataset))) == 1
    with torch.no_grad():
        policy.logits[0].bias.copy_(torch.tensor([50.0, -50.0]))  # now always action 0
    (batch,) = list(iter(dataset))
    assert (batch.act == 0).all()


def test_module_seeds_each_rank_differently(monkeypatch):
    """Env seeds are ``seed + rank * num_envs``: the ranks' envs start from different states."""
    factory = VectorEnvFactory("CartPole-v1", num_envs=2)
    starts = {}
    for rank in (0, 1):
        module = PolicyGradientModule(factory, steps_per_env=4, seed=7)
        monkeypatch.setattr(type(module), "global_rank", property(lambda self, r=rank: r))
        module.setup("fit")
        starts[rank] = module.collect_batch().obs[0]
        module.teardown("fit")
        expected, _ = factory.make().reset(seed=7 + rank * 2)
        np.testing.assert_array_equal(starts[rank].numpy(), expected)
    assert not torch.equal(starts[0], starts[1])


def test_collect_num_episodes_returns_exactly_that_many_whole_episodes():
    factory = VectorEnvFactory("CartPole-v1")
    policy = mlp_policy(*factory.spaces())
    batch = collect(policy, "CartPole-v1", num_episodes=5, seed=0)
    assert batch.num_envs == 5
    assert (batch.done & batch.valid).sum(0).tolist() == [1] * 5
    first_steps = batch.valid.long().argmax(0)
    assert first_steps.tolist() == [0] * 5, "each episode starts at the reset"
    # A given vector env of 2 envs: 5 episodes = 3 from env 0 and 2 from env 1, all whole.
    batch = collect(policy, factory.make(num_envs=2), num_episodes=5, seed=0)
    assert (batch.done & batch.valid).sum(0).tolist() == [3, 2]
    assert not (batch.valid & F.ends_in_batch(batch.done) != batch.valid).any(), "no step of an unfinished episode"


def test_collect_num_steps_and_argument_checks():
    factory = VectorEnvFactory("CartPole-v1", num_envs=4)
    policy = mlp_policy(*factory.spaces())
    batch = collect(policy, factory, num_steps=10, seed=0)
    # Whole episodes: each env has at least ceil(10 / 4) = 3 steps of them, and every used episode ends.
    assert batch.num_envs == 4 and (batch.valid.sum(0) >= 3).all()
    assert torch.equal(batch.valid & F.ends_in_batch(batch.done), batch.valid)
    cut = collect(policy, factory, num_steps=10, seed=0, whole_episodes=False)
    assert cut.num_envs == 4 and cut.num_steps == 3  # exactly ceil(10 / 4) steps of each env
    with pytest.raises(ValueError, match="exactly one of num_steps and num_episodes"):
        collect(policy, factory, num_steps=10, num_episodes=2)


def random_batches(num_batches, num_steps, num_envs, seed):
    """Random rewards and episode ends with NEXT_STEP semantics: the step after a done is invalid."""
    rng = np.random.default_rng(seed)
    reset_next = np.zeros(num_envs, bool)
    batches = []
    for _ in range(num_batches):
        rew = rng.normal(size=(num_steps, num_envs)).astype(np.float32)
        valid = np.zeros((num_steps, num_envs), bool)
        done = np.zeros((num_steps, num_envs), bool)
        for t in range(num_steps):
            valid[t] = ~reset_next
            done[t] = valid[t] & (rng.random(num_envs) < 0.15)
            reset_next = done[t]
        batches.append((rew * valid, valid, done))
    return batches


@pytest.mark.parametrize(("num_steps", "num_envs", "seed"), [(13, 5, 0), (1, 7, 1), (2, 6, 2), (40, 3, 3)])
def test_vectorised_episode_tracking_equals_the_per_step_reference(num_steps, num_envs, seed):
    """Also T = 1 and 2, where episodes end at T - 1 and T - 2 and the next batch starts with a reset step."""
    gamma = 0.9
    batches = random_batches(num_batches=30, num_steps=num_steps, num_envs=num_envs, seed=seed)
    tracker = EpisodeTracker(num_envs, gamma)
    expected_finished, expected_carried = reference_episodes(batches, gamma)
    for (rew, valid, done), (disc_before, length_before) in zip(batches, expected_carried):
        np.testing.assert_allclose(tracker.discounted_return, disc_before, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(tracker.length, length_before)
        tracker.track(rew, valid, done)
    returns, lengths = tracker.pop()
    assert len(returns) == len(expected_finished) > 20
    # The tracker lists episodes batch by batch, env by env; compare as multisets of (return, length).
    expected = sorted((round(r, 4), n) for _, r, n in expected_finished)
    assert sorted(zip(np.round(returns, 4), lengths)) == expected


@pytest.mark.parametrize("env_id", ["InvertedPendulum-v5", "Pendulum-v1", "Acrobot-v1"])
def test_collect_feeds_float32_observations_whatever_the_env_dtype(env_id):
    """MuJoCo observations are float64; the policy's weights are float32."""
    factory = VectorEnvFactory(env_id, num_envs=2)
    policy = mlp_policy(*factory.spaces())
    batch = RolloutCollector(factory.make(), steps_per_env=20, seed=0).collect(policy)
    assert batch.obs.dtype == torch.float32 and batch.obs.shape[:2] == (21, 2)
    assert torch.isfinite(batch.logp_behavior).all()
