"""Composite discrete actions: MultiDiscrete (independent categoricals) and MultiBinary (independent Bernoullis),
from the distribution through the rollout to training with every update kind; Discrete spaces with a ``start``."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_configs import compose_with
from torch.distributions import Bernoulli, Categorical, kl_divergence

from pg_lightning.distributions import BernoulliVector, MultiCategorical, logits_distribution, logits_size
from pg_lightning.policies import mlp_policy
from pg_lightning.recurrent import action_distribution, recurrent_policy
from pg_lightning.rollout import RolloutCollector
from pg_lightning.envs import VectorEnvFactory
from pg_lightning.run import ConfigError, train

NVEC = np.array([3, 5, 2])


def components(logits: torch.Tensor) -> list[Categorical]:
    return [Categorical(logits=part) for part in logits.split(NVEC.tolist(), dim=-1)]


def test_a_multi_discrete_log_prob_entropy_and_kl_are_the_sums_of_the_components():
    torch.manual_seed(0)
    logits, other = torch.randn(2, 7, NVEC.sum())
    dist = MultiCategorical(logits, NVEC)
    act = dist.sample()
    assert act.shape == (7, 3) and act.dtype == torch.int64
    parts = components(logits)
    torch.testing.assert_close(dist.log_prob(act), sum(c.log_prob(act[:, k]) for k, c in enumerate(parts)))
    torch.testing.assert_close(dist.entropy(), sum(c.entropy() for c in parts))
    kl_parts = sum(kl_divergence(p, q) for p, q in zip(parts, components(other)))
    torch.testing.assert_close(kl_divergence(dist, MultiCategorical(other, NVEC)), kl_parts)
    torch.testing.assert_close(dist.mode, torch.stack([c.probs.argmax(-1) for c in parts], -1))


def test_a_multi_discrete_sample_never_takes_a_padding_class():
    """Components with fewer classes are padded to the widest with -inf logits: never drawn."""
    dist = MultiCategorical(torch.zeros(20_000, NVEC.sum()), NVEC)
    act = dist.sample()
    for k, n in enumerate(NVEC):
        counts = torch.bincount(act[:, k], minlength=n)
        assert len(counts) == n and (counts > 0).all(), (k, counts)


def test_a_multi_binary_distribution_sums_its_bits_and_its_mode_is_defined_at_one_half():
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    dist = BernoulliVector(logits, (2, 3))
    act = dist.sample()
    assert act.shape == (5, 2, 3)
    reference = Bernoulli(logits=logits.reshape(5, 2, 3)).log_prob(act).sum((-2, -1))
    torch.testing.assert_close(dist.log_prob(act), reference)
    # torch's own Bernoulli mode is NaN at p = 1/2, where a policy's head starts (zero logits).
    assert torch.equal(BernoulliVector(torch.zeros(4, 6), (6,)).mode, torch.zeros(4, 6))


@pytest.mark.parametrize(
    ("space", "dtype"),
    [(gym.spaces.MultiDiscrete([3, 4]), torch.int64), (gym.spaces.MultiBinary(4), torch.float32)],
    ids=["multi_discrete", "multi_binary"],
)
def test_composite_actions_go_through_the_rollout_with_their_shapes_and_dtypes(space, dtype):
    """The env (``CodeEnv``) asserts that every action it gets is in its space, with the space's dtype."""
    kind = "multi_discrete" if isinstance(space, gym.spaces.MultiDiscrete) else "multi_binary"
    envs = gym.make_vec(f"PgTest/{'MultiDiscrete' if kind == 'multi_discrete' else 'MultiBinary'}Code-v0", num_envs=3)
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space)
    assert logits_size(space) == (7 if kind == "multi_discrete" else 4)
    batch = RolloutCollector(envs, steps_per_env=40, seed=0).collect(policy)
    assert batch.act.shape == (40, 3, 4 if kind == "multi_binary" else 2) and batch.act.dtype == dtype
    recomputed = policy(batch.obs[:-1]).log_prob(batch.act)
    torch.testing.assert_close(recomputed[batch.valid], batch.logp_behavior[batch.valid])


class ShiftedDiscreteEnv(gym.Env):
    """Discrete(3, start=-1): the env asserts it gets -1, 0 or 1 (the policy's indices are 0, 1, 2)."""

    metadata: dict = {"render_modes": []}
    observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(3, start=-1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        return np.zeros(1, dtype=np.float32), float(action), False, False, {}


def test_a_discrete_space_with_a_start_gets_its_own_actions():
    envs = gym.vector.SyncVectorEnv([ShiftedDiscreteEnv] * 2)
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space)
    batch = RolloutCollector(envs, steps_per_env=50, seed=0).collect(policy)
    assert set(batch.act.unique().tolist()) == {0, 1, 2}
    assert set(batch.rew.unique().tolist()) == {-1.0, 0.0, 1.0}, "the env's rewards are its actions -1, 0, 1"


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["PgTest/MultiDiscreteCode-v0", "PgTest/MultiBinaryCode-v0"],
                         ids=["multi_discrete", "multi_binary"])
@pytest.mark.parametrize(
    "overrides",
    [
        ["estimator=reward_to_go"],
        ["estimator=gae", "off_policy=clipped"],
        ["estimator=optimal_baseline"],
        ["estimator=baseline", "off_policy=trajectory"],
        ["estimator=value_baseline", "optimizer=natural_gradient"],
    ],
    ids=["reward_to_go", "clipped", "optimal_baseline", "trajectory", "natural_gradient"],
)
def test_composite_actions_train_with_every_update_kind(env_id, overrides, tmp_path):
    """Of the optimal 16, uniform actions earn 4.7 (MultiDiscrete) or 8 (MultiBinary), and the best actions that
    ignore the context 5.3 or 10.7: a return of 12 needs every component to read the context."""
    summary = train(compose_with("logger=csv", "stop_on_solve=false", f"env.id={env_id}", "env.num_envs=4",
                                 "steps_per_env=64", "total_env_steps=12000", "eval.num_episodes=8", *overrides),
                    tmp_path)
    assert summary["status"] == "finished"
    assert summary["eval_return_mean"] >= 12.0, summary["eval_return_mean"]


@pytest.mark.parametrize("env_id", ["PgTest/MultiDiscreteCode-v0", "PgTest/MultiBinaryCode-v0"],
                         ids=["multi_discrete", "multi_binary"])
def test_a_recurrent_policy_replays_composite_actions_and_trains(env_id, tmp_path):
    envs = gym.make_vec(env_id, num_envs=3)
    torch.manual_seed(0)
    policy = recurrent_policy(envs.single_observation_space, envs.single_action_space, hidden_size=8)
    batch = RolloutCollector(envs, steps_per_env=40, seed=0).collect(policy)
    replayed = action_distribution(policy, batch).log_prob(batch.act)
    torch.testing.assert_close(replayed[batch.valid], batch.logp_behavior[batch.valid], rtol=1e-5, atol=1e-5)
    summary = train(compose_with("logger=none", "stop_on_solve=false", f"env.id={env_id}", "policy=gru",
                                 "estimator=gae", "off_policy=clipped", "env.num_envs=4", "steps_per_env=32",
                                 "total_env_steps=256", "eval.num_episodes=2"), tmp_path)
    assert summary["status"] == "finished" and np.isfinite(summary["eval_return_mean"])


def test_logits_distribution_picks_the_distribution_of_the_space():
    logits = torch.zeros(2, 4)
    assert isinstance(logits_distribution(gym.spaces.Discrete(4), logits), Categorical)
    assert isinstance(logits_distribution(gym.spaces.MultiDiscrete([2, 2]), logits), MultiCategorical)
    assert isinstance(logits_distribution(gym.spaces.MultiBinary(4), logits), BernoulliVector)


# --- Dict observations through gymnasium's wrappers ------------------------------------------------------------

FLATTEN_DICT = ("env.wrappers=[{name: gymnasium.wrappers.FilterObservation, kwargs: {filter_keys: [context, clock]}},"
                "{name: gymnasium.wrappers.FlattenObservation}]")


def test_a_dict_observation_without_wrappers_is_refused_naming_the_env_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with("logger=none", "env.id=PgTest/DictCode-v0"), tmp_path)
    message = str(info.value)
    assert message.startswith("env.id='PgTest/DictCode-v0': observation space Dict(") and "\n" not in message
    assert "env.wrappers=[{name: gymnasium.wrappers.FlattenObservation}]" in message


def test_env_wrappers_flatten_a_dict_observation_into_the_flat_box_the_policies_read():
    factory = VectorEnvFactory("PgTest/DictCode-v0", num_envs=2, wrappers=[
        {"name": "gymnasium.wrappers.FilterObservation", "kwargs": {"filter_keys": ["context", "clock"]}},
        {"name": "gymnasium.wrappers.FlattenObservation"},
    ])
    observation_space, _ = factory.spaces()
    assert observation_space.shape == (4,), "the clock (1) and the context one-hot (3), in gymnasium's key order"
    obs, _ = factory.make().reset(seed=0)
    assert obs.shape == (2, 4) and set(np.unique(obs[:, 1:])) <= {0, 1}


@pytest.mark.parametrize(
    ("wrapper", "message"),
    [({"name": "gymnasium.wrappers.NoSuchWrapper"}, "env.wrappers[0].name 'gymnasium.wrappers.NoSuchWrapper' cannot be imported"),
     ({"name": "numpy.ndarray"}, "env.wrappers[0].name 'numpy.ndarray' is not a gymnasium.Wrapper"),
     ({"class": "x"}, "env.wrappers[0] must be {name: <import path>, kwargs: {...}}, got {'class': 'x'}")],
)
def test_a_bad_wrapper_is_refused_in_one_line(wrapper, message):
    with pytest.raises(ValueError) as info:
        VectorEnvFactory("PgTest/DictCode-v0", wrappers=[wrapper])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_a_dict_observation_env_trains_through_its_wrappers(tmp_path):
    """The context reaches the policy only through the flattened Dict: a return of 12 needs it (see above)."""
    summary = train(compose_with("logger=none", "stop_on_solve=false", "env.id=PgTest/DictCode-v0", FLATTEN_DICT,
                                 "env.num_envs=4", "steps_per_env=64", "total_env_steps=12000", "eval.num_episodes=8",
                                 "estimator=gae", "off_policy=clipped"), tmp_path)
    assert summary["eval_return_mean"] >= 12.0, summary["eval_return_mean"]


@pytest.mark.skipif(importlib.util.find_spec("minigrid") is None, reason='needs the envs extra: pip install -e ".[envs]"')
def test_the_minigrid_config_makes_a_flat_observation_and_runs(tmp_path):
    summary = train(compose_with("logger=none", "+experiment=ppo", "env=minigrid_doorkey", "env.num_envs=8",
                                 "total_env_steps=1024", "eval.num_episodes=2", "stop_on_solve=false"), tmp_path)
    assert summary["status"] == "finished" and summary["env_id"] == "MiniGrid-DoorKey-5x5-v0"


# --- Pixels: a CNN on uint8 images ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy_kind", ["mlp", "gru"])
def test_images_are_stored_as_uint8_and_the_cnn_reads_them(policy_kind):
    envs = gym.make_vec("PgTest/Pixels-v0", num_envs=3)
    space = envs.single_observation_space
    torch.manual_seed(0)
    policy = (mlp_policy(space, envs.single_action_space) if policy_kind == "mlp"
              else recurrent_policy(space, envs.single_action_space, hidden_size=8))
    batch = RolloutCollector(envs, steps_per_env=20, seed=0).collect(policy)
    assert batch.obs.dtype == torch.uint8 and batch.obs.shape == (21, 3, 8, 8, 3)
    assert batch.obs.element_size() * batch.obs.numel() == 21 * 3 * 8 * 8 * 3, "one byte per pixel"
    replayed = action_distribution(policy, batch).log_prob(batch.act)
    torch.testing.assert_close(replayed, batch.logp_behavior, rtol=1e-5, atol=1e-5)
    # The same pixels as floats (evaluation's tensors) give the same distribution.
    first = policy(batch.obs[0].float()) if policy_kind == "mlp" else policy.step(batch.obs[0].float(), policy.initial_state(3))[0]
    torch.testing.assert_close(first.log_prob(batch.act[0]), batch.logp_behavior[0], rtol=1e-5, atol=1e-5)


def test_the_cnn_trunk_is_picked_by_the_image_size():
    from pg_lightning.encoders import image_encoder

    assert image_encoder(gym.spaces.Box(0, 255, (84, 84, 3), np.uint8)).out_features == 512  # Nature
    assert image_encoder(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)).out_features == 512  # a frame stack
    assert image_encoder(gym.spaces.Box(0, 255, (7, 7, 3), np.uint8)).out_features == 64  # grid: 7 -> 6 -> 3 -> 2 -> 1


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["policy=gru"]], ids=["cnn", "cnn_gru"])
def test_a_pixel_env_trains_through_the_cnn(overrides, tmp_path):
    """The context is only in the pixels: uniform actions earn 5.3 of 16, reading the image 16."""
    summary = train(compose_with("logger=none", "stop_on_solve=false", "env.id=PgTest/Pixels-v0", "env.num_envs=4",
                                 "steps_per_env=64", "total_env_steps=8000", "eval.num_episodes=8", "estimator=gae",
                                 "off_policy=clipped", *overrides), tmp_path)
    assert summary["eval_return_mean"] >= 12.0, summary["eval_return_mean"]


@pytest.mark.skipif(importlib.util.find_spec("ale_py") is None, reason='needs the envs extra: pip install -e ".[envs]"')
def test_the_atari_config_collects_uint8_frame_stacks_through_the_nature_cnn():
    """env=atari_pong: ALE's native vector env, (4, 84, 84) uint8 frames, the policy its config picks (policy=cnn)."""
    from hydra.utils import instantiate

    cfg = compose_with("env=atari_pong", "env.num_envs=2")
    factory = instantiate(cfg.env)
    envs = factory.make()
    policy = instantiate(cfg.policy)(envs.single_observation_space, envs.single_action_space)
    assert policy.encoder.out_features == 512, "the Nature trunk"
    batch = RolloutCollector(envs, steps_per_env=16, seed=0).collect(policy)
    assert batch.obs.dtype == torch.uint8 and batch.obs.shape == (17, 2, 4, 84, 84)
    torch.testing.assert_close(action_distribution(policy, batch).log_prob(batch.act), batch.logp_behavior,
                               rtol=1e-5, atol=1e-5)
