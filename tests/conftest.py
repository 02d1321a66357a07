"""Shared helpers: a tiny deterministic env whose episodes and rewards are known in advance."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch

# No test may reach W&B's servers.
os.environ.setdefault("WANDB_MODE", "disabled")
# One torch thread, as training processes use (pg_lightning/threads.py): the suite beside a training run, or
# beside the runs it starts itself, would otherwise oversubscribe the cores.
torch.set_num_threads(1)


class CountingEnv(gym.Env):
    """Episode of ``length`` steps; reward of step k (0-based) is ``k + 1 + action``.

    Observation: ``[k / length, 1]``. The episode *terminates* after ``length`` steps unless
    ``truncate`` is set, in which case it is *truncated* there (a time limit).
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, length: int = 3, truncate: bool = False, num_actions: int = 2):
        self.length = length
        self.truncate = truncate
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(num_actions)
        self.k = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.k / self.length, 1.0], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return self._obs(), {}

    def step(self, action):
        reward = float(self.k + 1 + int(action))
        self.k += 1
        ended = self.k >= self.length
        return self._obs(), reward, ended and not self.truncate, ended and self.truncate, {}


def counting_envs(lengths: list[int], truncate: bool = False) -> gym.vector.VectorEnv:
    """A synchronous vector env of ``CountingEnv`` with one episode length per sub-env."""
    return gym.vector.SyncVectorEnv([lambda n=n: CountingEnv(n, truncate) for n in lengths])


def collect_cartpole(steps_per_env: int, num_envs: int = 8, hidden_sizes=(16,), seed: int = 0):
    """(policy, batch): a small seeded MLP policy and one CartPole-v1 batch it collected."""
    import torch

    from pg_lightning.envs import VectorEnvFactory
    from pg_lightning.policies import mlp_policy
    from pg_lightning.rollout import RolloutCollector

    env = VectorEnvFactory("CartPole-v1", num_envs=num_envs).make()
    torch.manual_seed(seed)
    policy = mlp_policy(env.single_observation_space, env.single_action_space, hidden_sizes=list(hidden_sizes))
    try:
        return policy, RolloutCollector(env, steps_per_env=steps_per_env, seed=seed).collect(policy)
    finally:
        env.close()


@pytest.fixture
def tmp_run_dir(tmp_path, monkeypatch):
    """A temporary working directory for runs (W&B offline files land in it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


class FaultyEnv(CountingEnv):
    """A ``CountingEnv`` (episodes of 20 steps) that misbehaves after ``fault_after`` steps of its life.

    ``fault="raise"`` raises RuntimeError; ``fault="nan"`` returns a NaN reward for ``nan_steps`` steps.
    """

    def __init__(self, fault: str = "raise", fault_after: int = 150, nan_steps: int = 1):
        super().__init__(length=20)
        self.fault, self.fault_after, self.nan_steps = fault, fault_after, nan_steps
        self.lifetime = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.lifetime += 1
        if self.lifetime > self.fault_after:
            if self.fault == "raise":
                raise RuntimeError("simulator exploded")
            if self.lifetime <= self.fault_after + self.nan_steps:
                reward = float("nan")
        return obs, reward, terminated, truncated, info


class TupleActionEnv(CountingEnv):
    """Actions no policy here handles (a Tuple)."""

    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(2)))


class OddShapeEnv(CountingEnv):
    """A 3-D Box that is no image (16 channels first and last): nothing here reads it."""

    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Box(0, 255, shape=(16, 8, 16), dtype=np.uint8)


class PixelsEnv(gym.Env):
    """Pixels that show a context: an 8 x 8 x 3 uint8 image, blank but for a bright 2 x 8 band in row block c and
    colour channel c of the context c ∈ {0, 1, 2}, drawn at every step; action c pays 1. 16 steps: uniform actions
    earn 5.3, a policy that reads the image 16."""

    metadata: dict = {"render_modes": []}
    observation_space = gym.spaces.Box(0, 255, shape=(8, 8, 3), dtype=np.uint8)
    action_space = gym.spaces.Discrete(3)

    def _obs(self) -> np.ndarray:
        image = np.zeros((8, 8, 3), dtype=np.uint8)
        image[2 * self.context : 2 * self.context + 2, :, self.context] = 255
        return image

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.context, self.t = int(self.np_random.integers(3)), 0
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == self.context)
        self.t += 1
        self.context = int(self.np_random.integers(3))
        return self._obs(), reward, self.t >= 16, False, {}


class CodeEnv(gym.Env):
    """A contextual bandit over composite actions: each of 16 steps shows a context c ∈ {0, 1, 2} (one-hot); each
    action component that equals the context's code ``CODES[c]`` earns 1 / K. Optimal return 16; uniform
    actions earn 16 · mean_k(1 / n_k) (MultiDiscrete([3, 4]): 4.7, MultiBinary(4): 8).

    ``masked=True`` (MultiDiscrete): each component allows its code and one other value, drawn at each step, given
    as ``info["action_mask"]`` (the components' masks side by side); the env raises on a masked action.
    """

    metadata: dict = {"render_modes": []}
    SPACES = {"multi_discrete": gym.spaces.MultiDiscrete([3, 4]), "multi_binary": gym.spaces.MultiBinary(4)}
    CODES = {"multi_discrete": [[0, 3], [2, 1], [1, 0]], "multi_binary": [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 1]]}

    def __init__(self, kind: str = "multi_discrete", masked: bool = False):
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(3,), dtype=np.float32)
        self.action_space = self.SPACES[kind]
        self.codes = np.array(self.CODES[kind])
        self.context, self.t = 0, 0
        self.masked = masked
        self.mask: list[np.ndarray] = []

    def _info(self) -> dict:
        if not self.masked:
            return {}
        self.mask = []
        for code, n in zip(self.codes[self.context], self.action_space.nvec):
            allowed = np.zeros(n, dtype=bool)
            allowed[code] = True
            allowed[self.np_random.choice([v for v in range(n) if v != code])] = True
            self.mask.append(allowed)
        return {"action_mask": np.concatenate(self.mask)}

    def _obs(self) -> np.ndarray:
        return np.eye(3, dtype=np.float32)[self.context]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.context, self.t = int(self.np_random.integers(3)), 0
        return self._obs(), self._info()

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype)), action
        if self.masked and not all(allowed[a] for allowed, a in zip(self.mask, np.asarray(action))):
            raise ValueError(f"masked action {action} (allowed: {self.mask})")
        reward = float(np.mean(np.asarray(action) == self.codes[self.context]))
        self.t += 1
        self.context = int(self.np_random.integers(3))
        return self._obs(), reward, self.t >= 16, False, self._info()


gym.register("PgTest/Faulty-v0", entry_point=FaultyEnv, max_episode_steps=100)
gym.register("PgTest/TupleAction-v0", entry_point=TupleActionEnv)
gym.register("PgTest/Pixels-v0", entry_point=PixelsEnv, max_episode_steps=16, reward_threshold=15.0)
gym.register("PgTest/OddShape-v0", entry_point=OddShapeEnv)
for _kind, _name in (("multi_discrete", "MultiDiscrete"), ("multi_binary", "MultiBinary")):
    gym.register(f"PgTest/{_name}Code-v0", entry_point=CodeEnv, kwargs={"kind": _kind}, max_episode_steps=16,
                 reward_threshold=15.0)
class DictCodeEnv(CodeEnv):
    """``CodeEnv`` (MultiDiscrete) whose observation is a Dict: the context as a ``Discrete(3)``, the time as a Box,
    and a text note that no policy reads (MiniGrid's mission is such a key)."""

    def __init__(self):
        super().__init__("multi_discrete")
        self.observation_space = gym.spaces.Dict({
            "context": gym.spaces.Discrete(3),
            "clock": gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
            "note": gym.spaces.Text(max_length=8),
        })

    def _obs(self):
        return {"context": self.context, "clock": np.array([self.t / 16], dtype=np.float32), "note": "match"}


class MaskInObservationEnv(CodeEnv):
    """``CodeEnv`` with masks (MultiDiscrete) whose mask comes in a Dict observation, not in the info:
    ``{"observation": one-hot context, "action_mask": [7] bool}``."""

    def __init__(self):
        super().__init__("multi_discrete", masked=True)
        self.observation_space = gym.spaces.Dict({
            "observation": gym.spaces.Box(0.0, 1.0, shape=(3,), dtype=np.float32),
            "action_mask": gym.spaces.MultiBinary(7),
        })

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return {"observation": obs, "action_mask": info.pop("action_mask").astype(np.int8)}, info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return {"observation": obs, "action_mask": info.pop("action_mask").astype(np.int8)}, reward, terminated, truncated, info


gym.register("PgTest/MaskInObservation-v0", entry_point=MaskInObservationEnv, max_episode_steps=16)
gym.register("PgTest/DictCode-v0", entry_point=DictCodeEnv, max_episode_steps=16, reward_threshold=15.0)
gym.register("PgTest/MaskedCode-v0", entry_point=CodeEnv, kwargs={"kind": "multi_discrete", "masked": True},
             max_episode_steps=16, reward_threshold=15.0)
