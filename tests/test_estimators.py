"""Estimator presets: their weights Ψ_t on a deterministic env, and the batch cut-off rule."""

from __future__ import annotations

import pytest
import torch
from conftest import counting_envs
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pg_lightning import Estimator, RolloutCollector
from pg_lightning.estimators import baseline, reinforce, reward_to_go
from pg_lightning.policies import mlp_policy

from test_configs import CONF_DIR

PRESETS = {"reinforce": reinforce, "reward_to_go": reward_to_go, "baseline": baseline}


def two_batches(gamma: float):
    """Episodes of 3 steps, batches of 5: batch 1 = [ep1 ep1 ep1 reset ep2], batch 2 = [ep2 ep2 reset ep3 ep3]."""
    envs = counting_envs([3])
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space, hidden_sizes=[])
    collector = RolloutCollector(envs, steps_per_env=5, gamma=gamma, seed=0)
    torch.manual_seed(0)
    return collector.collect(policy), collector.collect(policy)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_from_config_files_match_python_presets(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"estimator={name}"])
    assert instantiate(cfg.estimator) == PRESETS[name]()


@pytest.mark.parametrize("name", PRESETS)
def test_steps_of_an_episode_cut_by_the_batch_end_get_no_weight(name):
    first, second = two_batches(gamma=0.9)
    for batch, expected_mask in ((first, [True, True, True, False, False]), (second, [True, True, False, False, False])):
        out = PRESETS[name](gamma=0.9)(batch)
        assert out.mask[:, 0].tolist() == expected_mask
        assert (out.weights[~out.mask] == 0).all()
        assert out.num_episodes.item() == 1


def test_reinforce_weights_are_the_full_return_also_across_batches():
    gamma = 0.9
    first, second = two_batches(gamma)
    r1, r2 = first.rew[:, 0], second.rew[:, 0]
    episode_1 = r1[0] + gamma * r1[1] + gamma**2 * r1[2]
    # Episode 2 began at t = 4 of batch 1 and ended at t = 1 of batch 2.
    episode_2 = r1[4] + gamma * r2[0] + gamma**2 * r2[1]
    torch.testing.assert_close(reinforce(gamma)(first).weights[:3, 0], episode_1.repeat(3))
    torch.testing.assert_close(reinforce(gamma)(second).weights[:2, 0], episode_2.repeat(2))


def test_reward_to_go_and_baseline_weights():
    gamma = 0.9
    first, _ = two_batches(gamma)
    r = first.rew[:3, 0]
    q = torch.stack([r[0] + gamma * r[1] + gamma**2 * r[2], r[1] + gamma * r[2], r[2]])
    torch.testing.assert_close(reward_to_go(gamma)(first).weights[:3, 0], q)
    torch.testing.assert_close(baseline(gamma)(first).weights[:3, 0], q - q.mean())


def test_baseline_shifts_weights_by_a_constant_and_centres_them():
    envs = counting_envs([2, 3, 5, 4])
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space, hidden_sizes=[])
    batch = RolloutCollector(envs, steps_per_env=20, seed=0).collect(policy)
    plain, centred = reward_to_go(0.99)(batch), baseline(0.99)(batch)
    assert torch.equal(plain.mask, centred.mask)
    shift = (plain.weights - centred.weights)[plain.mask]
    torch.testing.assert_close(shift, shift[0].expand_as(shift))
    assert centred.weights[centred.mask].mean().abs() < 1e-5
    assert shift[0] > 0


@pytest.mark.parametrize(("field", "value"), [("gamma", 1.5), ("gamma", -0.1), ("baseline", "median")])
def test_invalid_fields_are_refused_with_the_key_and_value(field, value):
    with pytest.raises(ValueError, match=rf"estimator\.{field}.*{value}"):
        Estimator(**{field: value})
