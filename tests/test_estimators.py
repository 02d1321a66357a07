"""Estimator presets: their weights Ψ_t on a deterministic env, and the batch cut-off rule."""

from __future__ import annotations

import pytest
import torch
from conftest import counting_envs
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pg_lightning import Estimator, RolloutCollector
from pg_lightning.estimators import ValueFunctionConfig, baseline, gae, optimal_baseline, reinforce, reinforce_baseline, reward_to_go, value_baseline
from pg_lightning.policies import mlp_policy

from test_configs import CONF_DIR

NO_VALUE_PRESETS = {
    "reinforce": reinforce,
    "reward_to_go": reward_to_go,
    "baseline": baseline,
    "reinforce_baseline": reinforce_baseline,
    "optimal_baseline": optimal_baseline,
}
PRESETS = {**NO_VALUE_PRESETS, "value_baseline": value_baseline, "gae": gae}


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


@pytest.mark.parametrize("name", NO_VALUE_PRESETS)
def test_steps_of_an_episode_cut_by_the_batch_end_get_no_weight(name):
    first, second = two_batches(gamma=0.9)
    for batch, expected_mask in ((first, [True, True, True, False, False]), (second, [True, True, False, False, False])):
        out = PRESETS[name](gamma=0.9)(batch)
        assert out.mask[:, 0].tolist() == expected_mask
        assert (out.weights[~out.mask] == 0).all()
        assert out.num_segments.item() == 1


def test_reinforce_weights_are_the_full_return_also_across_batches():
    gamma = 0.9
    first, second = two_batches(gamma)
    r1, r2 = first.rew[:, 0], second.rew[:, 0]
    episode_1 = r1[0] + gamma * r1[1] + gamma**2 * r1[2]
    # Episode 2 began at t = 4 of batch 1 and ended at t = 1 of batch 2.
    episode_2 = r1[4] + gamma * r2[0] + gamma**2 * r2[1]
    torch.testing.assert_close(reinforce(gamma)(first).weights[:3, 0], episode_1.repeat(3))
    torch.testing.assert_close(reinforce(gamma)(second).weights[:2, 0], episode_2.repeat(2))


def test_reward_to_go_weights():
    gamma = 0.9
    first, _ = two_batches(gamma)
    r = first.rew[:3, 0]
    q = torch.stack([r[0] + gamma * r[1] + gamma**2 * r[2], r[1] + gamma * r[2], r[2]])
    torch.testing.assert_close(reward_to_go(gamma)(first).weights[:3, 0], q)


def test_baseline_subtracts_the_average_of_the_other_envs():
    envs = counting_envs([2, 3, 5, 4])
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space, hidden_sizes=[])
    batch = RolloutCollector(envs, steps_per_env=20, seed=0, whole_episodes=True).collect(policy)
    plain, centred = reward_to_go(0.99)(batch), baseline(0.99)(batch)
    assert torch.equal(plain.mask, centred.mask)
    shift = plain.weights - centred.weights
    for env in range(4):
        own = plain.mask[:, env]
        others = plain.mask.clone()
        others[:, env] = False
        torch.testing.assert_close(shift[own, env], plain.weights[others].mean().expand(int(own.sum())))


def test_value_presets_use_every_step_and_bootstrap_the_cut():
    """With V, the episode cut at the batch end is kept and closed with γ V(obs[T])."""
    gamma = 0.9
    first, _ = two_batches(gamma)
    values = torch.full((first.num_steps + 1, 1), 2.0)
    out = value_baseline(gamma, ValueFunctionConfig())(first, values)
    assert torch.equal(out.mask, first.valid)
    r = first.rew[:, 0]
    # Step 4 starts an episode that runs past the batch end: Q̂ = r_4 + γ V(obs[5]), minus V(obs[4]).
    assert out.weights[4, 0].item() == pytest.approx(float(r[4]) + gamma * 2.0 - 2.0)
    # Step 2 terminates its episode: no bootstrap.
    assert out.weights[2, 0].item() == pytest.approx(float(r[2]) - 2.0)
    torch.testing.assert_close(out.value_targets[:3, 0], reward_to_go(gamma)(first).weights[:3, 0])


def test_normalize_standardizes_the_weights_of_any_preset():
    first, _ = two_batches(0.9)  # one env: its own statistics
    out = Estimator(name="n", gamma=0.9, reward_to_go=True, baseline="none", normalize=True)(first)
    used = out.weights[out.mask]
    assert used.mean().abs() < 1e-5 and used.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert not torch.equal(out.weights, reward_to_go(0.9)(first).weights)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"gamma": 1.5}, r"estimator\.gamma.*1\.5"),
        ({"gamma": -0.1}, r"estimator\.gamma.*-0\.1"),
        ({"baseline": "median"}, r"estimator\.baseline.*median"),
        ({"baseline": "value"}, r"estimator\.value is required"),
        ({"gae_lambda": 0.9}, r"estimator\.gae_lambda=0\.9 needs estimator\.baseline=value"),
        ({"baseline": "optimal"}, r"estimator\.reward_to_go=false"),
        ({"value": ValueFunctionConfig}, r"estimator\.value is only used"),
        ({"baseline": "value", "value": lambda: ValueFunctionConfig(lr=-1.0)}, r"estimator\.value\.lr.*-1"),
    ],
)
def test_invalid_fields_are_refused_with_the_key_and_value(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        Estimator(**{k: (v() if callable(v) else v) for k, v in fields.items()})
