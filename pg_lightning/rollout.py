"""On-policy data collection: a collector that steps a vector env, and the Lightning-facing dataset.

Lightning fetches the next batch of an iterable *before* ``training_step`` runs on the current one,
so an endless generator would train on data of the previous policy (ARCHITECTURE.md, trap 1).
``RolloutDataset.__iter__`` therefore yields exactly one batch and stops: each Lightning epoch is one
iteration, and its ``iter()`` runs after the previous update, with the current weights. The envs and
their running episodes live in the ``RolloutCollector`` and survive across iterations.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import nn
from torch.utils.data import IterableDataset

from pg_lightning.batch import RolloutBatch
from pg_lightning.envs import VectorEnvFactory, check_action_space, to_env_action
from pg_lightning.validation import positive_int, require


class EnvStepError(RuntimeError):
    """The environment raised while stepping; the message names the env and the env step."""


@dataclass
class EpisodeStats:
    """Undiscounted returns and lengths of the episodes that ended since the last ``pop``."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def pop(self) -> tuple[list[float], list[int]]:
        returns, lengths = self.returns, self.lengths
        self.returns, self.lengths = [], []
        return returns, lengths


class RolloutCollector:
    """Collects ``steps_per_env`` steps of every env of ``envs`` per call, with the given policy.

    The envs are reset once (with ``seed``: env ``i`` gets ``seed + i``); afterwards the current
    observations and the running episodes carry over from one ``collect`` to the next.

    gymnasium's vector envs autoreset in NEXT_STEP mode: the step after an episode ends resets that
    env, ignores its action and returns reward 0. Those steps are marked ``valid = False``.

    Args:
        envs: a gymnasium vector env (NEXT_STEP autoreset, the gymnasium default).
        steps_per_env: T, the batch's time length.
        gamma: the discount used for ``RolloutBatch.return_before``.
        seed: seed of the first reset; ``None`` leaves the envs unseeded.
        name: how errors name the env (default: the vector env's spec id).

    An exception raised by the env is re-raised as ``EnvStepError`` naming the env and the env step.
    """

    def __init__(
        self, envs: VectorEnv, steps_per_env: int, gamma: float = 0.99, seed: int | None = None, name: str | None = None
    ):
        require("steps_per_env", steps_per_env, positive_int, "a positive integer")
        check_action_space(envs.single_action_space)
        self.envs = envs
        spec = getattr(envs, "spec", None)
        self.name = name or (spec.id if spec is not None else type(envs).__name__)
        self.steps_per_env = steps_per_env
        self.gamma = gamma
        self.seed = seed
        self.env_steps = 0
        self.episodes = EpisodeStats()
        num_envs = envs.num_envs
        self._obs: np.ndarray | None = None
        self._reset_next = np.zeros(num_envs, dtype=bool)
        self._ep_return = np.zeros(num_envs)
        self._ep_disc_return = np.zeros(num_envs)
        self._ep_length = np.zeros(num_envs, dtype=np.int64)

    def collect(self, policy: nn.Module, num_steps: int | None = None) -> RolloutBatch:
        """Step every env ``num_steps`` (default T) times with actions sampled from ``policy``.

        The policy runs under ``torch.inference_mode`` (no autograd bookkeeping on the per-step tensors, ~4%
        of a CartPole rollout); the batch's tensors are assembled outside it, so training can differentiate
        through them. A policy must therefore not keep tensors made in ``forward`` for later backward passes.
        """
        device, dtype = _device_and_dtype(policy)
        if self._obs is None:
            self._obs, _ = self.envs.reset(seed=self.seed)
        num_steps = self.steps_per_env if num_steps is None else num_steps
        num_envs = self.envs.num_envs
        obs_shape = self.envs.single_observation_space.shape
        rew = np.zeros((num_steps, num_envs), dtype=np.float32)
        terminated = np.zeros((num_steps, num_envs), dtype=bool)
        truncated = np.zeros((num_steps, num_envs), dtype=bool)
        valid = np.zeros((num_steps, num_envs), dtype=bool)
        return_before = torch.as_tensor(self._ep_disc_return, dtype=torch.float32)
        length_before = torch.as_tensor(self._ep_length.copy())

        action_space = self.envs.single_action_space
        # Storage for the whole batch, allocated once here: per step only row writes into numpy buffers. Keeping
        # each step's action and log-prob tensors alive instead costs ~10% at 1024 envs (fresh memory every step).
        obs = np.empty((num_steps + 1, num_envs, *obs_shape), dtype=np.float32)
        act = np.empty((num_steps, num_envs, *action_space.shape), dtype=_sample_dtype(action_space, dtype))
        logp = torch.empty((num_steps, num_envs), dtype=dtype, device=device)
        on_host = device.type == "cpu"
        logp_rows = logp.numpy() if on_host else logp  # a numpy row write costs ~1 us, torch's ~3 us
        with torch.inference_mode():
            for t in range(num_steps):
                obs[t] = self._obs  # float32, whatever the env's dtype (MuJoCo's is float64)
                dist = policy(torch.from_numpy(obs[t]).to(device))
                action = dist.sample()
                step_logp = dist.log_prob(action)
                logp_rows[t] = step_logp.numpy() if on_host else step_logp  # stays on the policy's device
                act[t] = action.cpu().numpy()  # the env needs the action on the host anyway
                try:
                    self._obs, reward, term, trunc, _ = self.envs.step(to_env_action(act[t], action_space))
                except Exception as error:
                    raise EnvStepError(
                        f"environment {self.name} raised at env step {self.env_steps + int(valid[:t].sum())} "
                        f"(step {t} of this batch): {type(error).__name__}: {error}"
                    ) from error
                # Raw env outputs now; the reset-step masks are applied to whole arrays after the loop.
                rew[t], terminated[t], truncated[t] = reward, term, trunc
                valid[t] = ~self._reset_next
                self._reset_next = term | trunc
        obs[num_steps] = self._obs
        rew *= valid
        terminated &= valid
        truncated &= valid
        self._track_episodes(rew, valid, terminated | truncated)

        return RolloutBatch(
            obs=torch.from_numpy(obs).to(device),
            act=torch.from_numpy(act).to(device),
            rew=torch.from_numpy(rew).to(device),
            terminated=torch.from_numpy(terminated).to(device),
            truncated=torch.from_numpy(truncated).to(device),
            valid=torch.from_numpy(valid).to(device),
            logp_behavior=logp,
            return_before=return_before.to(device),
            length_before=length_before.to(device),
        )

    def _track_episodes(self, rew: np.ndarray, valid: np.ndarray, done: np.ndarray) -> None:
        """Continue the running episodes through a batch ``[T, B]``; record those that ended in it.

        Once per batch, not per step, and without a pass over ``[T, B]`` for lengths: with NEXT_STEP autoreset
        the invalid steps are exactly the reset steps, the step after each ``done`` (step 0 when the previous
        batch ended with one). So an episode's length is the distance between its env's consecutive ends
        less that reset step, and its return a difference of running sums over time. Env b's first episode
        adds what it had before the batch (``_ep_return``, ``_ep_length``). The steps after env b's last end
        (its tail) run on into the next batch, which needs their discounted return-so-far Σ_k γ^k r_k, k
        counted from the episode's first step: the tail's own discounted sum, times γ^(steps before this
        batch) when the episode began earlier.
        """
        num_steps, num_envs = rew.shape
        envs = np.arange(num_envs)
        reset_at_0 = ~valid[0]
        self.env_steps += int(np.count_nonzero(valid))
        # torch's cumsum over time is several times faster than numpy's on [T, B] (zero-copy views).
        cum_return = torch.from_numpy(rew).cumsum(0, dtype=torch.float64).numpy()  # [T, B]
        ended_env, ended_t = np.nonzero(done.T)  # env by env, in time order
        first = np.ones(len(ended_env), dtype=bool)
        first[1:] = ended_env[1:] != ended_env[:-1]
        previous = np.concatenate([[0], ended_t[:-1]])  # the env's previous end, where there is one
        returns = cum_return[ended_t, ended_env] - np.where(first, 0.0, cum_return[previous, ended_env])
        lengths = np.where(first, ended_t + 1 - reset_at_0[ended_env], ended_t - previous - 1)
        returns += np.where(first, self._ep_return[ended_env], 0.0)
        lengths += np.where(first, self._ep_length[ended_env], 0)
        self.episodes.returns.extend(returns.tolist())
        self.episodes.lengths.extend(lengths.tolist())
        # The tail: valid steps from tail_start (T or T + 1 when the last end is at T - 2 or T - 1: empty).
        last_done = np.full(num_envs, -1)
        last_done[ended_env] = ended_t  # ended_t increases within an env, so the last write is the last end
        any_done = last_done >= 0
        tail_start = np.where(any_done, last_done + 2, reset_at_0)
        tail_length = np.maximum(num_steps - tail_start, 0)
        tail_return = cum_return[-1] - np.where(any_done, cum_return[np.maximum(last_done, 0), envs], 0.0)
        # Σ_t γ^(t - tail_start) r_t in one gather: k = t - tail_start < 0 (before the tail) indexes the zeros
        # after γ^0 … γ^(T-1). A lookup, so no γ^-k overflow; int32 k halves the memory traffic. Rows before
        # the earliest tail start weigh nothing in any env and are skipped.
        powers = np.zeros(2 * num_steps + 2)
        powers[:num_steps] = self.gamma ** np.arange(num_steps, dtype=np.float64)
        from_row = min(int(tail_start.min()), num_steps)
        k = np.arange(from_row, num_steps, dtype=np.int32)[:, None] - tail_start.astype(np.int32)
        tail_discounted = np.einsum("tb,tb->b", powers[k], rew[from_row:])
        began_before = ~any_done
        self._ep_disc_return = np.where(
            began_before, self._ep_disc_return + self.gamma ** self._ep_length * tail_discounted, tail_discounted
        )
        self._ep_return = np.where(began_before, self._ep_return, 0.0) + tail_return
        self._ep_length = np.where(began_before, self._ep_length, 0) + tail_length

    def state_dict(self) -> dict:
        """The envs (pickled, or None where they cannot be), their current observations and running episodes.

        With it a resumed run continues exactly where the checkpoint was taken, mid-episode; envs that do not
        pickle (mujoco, subprocess vector envs, observation-masking wrappers) are reset on resume instead.
        Arrays are stored as tensors, which Lightning's ``weights_only`` checkpoint loading accepts.
        """
        try:
            envs = pickle.dumps(self.envs)
        except Exception:  # noqa: BLE001 - any env that cannot be pickled is simply not restored
            envs = None
        state = {"envs": envs, "env_steps": self.env_steps}
        if envs is not None and self._obs is not None:
            arrays = {"obs": self._obs, "reset_next": self._reset_next, "ep_return": self._ep_return,
                      "ep_disc_return": self._ep_disc_return, "ep_length": self._ep_length}
            state.update({name: torch.from_numpy(np.array(value)) for name, value in arrays.items()})
        return state

    def load_state_dict(self, state: dict) -> bool:
        """Restore ``state_dict``; returns False (and keeps fresh envs, reset at the next collect) if it has no envs.

        The envs are unpickled: load only checkpoints you trust (as with any pickle).
        """
        self.env_steps = state["env_steps"]
        if state.get("envs") is None or "obs" not in state:
            return False
        self.envs.close()
        self.envs = pickle.loads(state["envs"])
        self._obs, self._reset_next = state["obs"].numpy(), state["reset_next"].numpy()
        self._ep_return, self._ep_disc_return = state["ep_return"].numpy(), state["ep_disc_return"].numpy()
        self._ep_length = state["ep_length"].numpy()
        return True

    def close(self) -> None:
        self.envs.close()


class RolloutDataset(IterableDataset):
    """An iterable of exactly one fresh on-policy batch per ``iter()`` (see the module doc).

    Use it with ``DataLoader(dataset, batch_size=None, num_workers=0)``: a worker process would hold a
    stale copy of the policy.
    """

    def __init__(self, collect: Callable[[], RolloutBatch]):
        self.collect = collect

    def __iter__(self) -> Iterator[RolloutBatch]:
        yield self.collect()


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the module's parameters live and their dtype (CPU and the default dtype if it has none)."""
    param = next(module.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.get_default_dtype())


def _sample_dtype(action_space: gym.Space, dtype: torch.dtype) -> np.dtype:
    """What a policy's ``sample()`` returns: class indices (int64) for ``Discrete``, its float ``dtype`` for ``Box``."""
    if isinstance(action_space, gym.spaces.Discrete):
        return np.dtype(np.int64)
    return torch.empty((), dtype=dtype).numpy().dtype


def collect(
    policy: nn.Module,
    env: str | VectorEnvFactory | gym.Env | VectorEnv,
    *,
    num_steps: int | None = None,
    num_episodes: int | None = None,
    seed: int | None = None,
    gamma: float = 0.99,
) -> RolloutBatch:
    """Collect a batch with ``policy``: the same code path as training (``RolloutCollector``).

    Args:
        policy: ``obs -> Distribution``.
        env: a registered gymnasium id, a ``VectorEnvFactory``, an env or a vector env (reset here).
        num_steps: collect at least this many steps: ``ceil(num_steps / num_envs)`` steps of each env.
        num_episodes: collect exactly this many complete episodes, each from a reset. An id or factory
            is built with one env per episode. With a given vector env of B envs, env b contributes its
            first ``num_episodes // B`` (+1 for the first ``num_episodes % B`` envs) episodes: a choice
            fixed in advance, so that short episodes are not favoured. Every other step is marked invalid.
        seed: seed of the envs' reset.
        gamma: discount for ``RolloutBatch.return_before`` (0 here: every episode starts in the batch).

    Exactly one of ``num_steps`` and ``num_episodes`` must be given.
    """
    if (num_steps is None) == (num_episodes is None):
        raise ValueError("collect: give exactly one of num_steps and num_episodes")
    envs = _as_vector_env(env, num_envs=num_episodes)
    collector = RolloutCollector(envs, steps_per_env=1, gamma=gamma, seed=seed)
    if num_steps is not None:
        require("num_steps", num_steps, positive_int, "a positive integer")
        return collector.collect(policy, num_steps=math.ceil(num_steps / envs.num_envs))
    assert num_episodes is not None
    require("num_episodes", num_episodes, positive_int, "a positive integer")
    quota = torch.full((envs.num_envs,), num_episodes // envs.num_envs)
    quota[: num_episodes % envs.num_envs] += 1
    chunks, ended = [], torch.zeros(envs.num_envs, dtype=torch.long)
    while (ended < quota).any():
        chunks.append(collector.collect(policy, num_steps=_EPISODE_CHUNK))
        ended += (chunks[-1].done & chunks[-1].valid).sum(0).cpu()
    return _first_episodes(_concat_in_time(chunks), quota)


# Steps per collect call while gathering whole episodes.
_EPISODE_CHUNK = 16


def _as_vector_env(env: str | VectorEnvFactory | gym.Env | VectorEnv, num_envs: int | None) -> VectorEnv:
    if isinstance(env, VectorEnv):
        return env
    if isinstance(env, gym.Env):
        return gym.vector.SyncVectorEnv([lambda: env])
    factory = env if isinstance(env, VectorEnvFactory) else VectorEnvFactory(id=env)
    return factory.make(num_envs=num_envs)


def _concat_in_time(batches: list[RolloutBatch]) -> RolloutBatch:
    """Consecutive batches of the same envs as one: ``obs`` overlap by one step at each seam."""
    first = batches[0]
    return RolloutBatch(
        obs=torch.cat([b.obs[:-1] for b in batches] + [batches[-1].obs[-1:]]),
        act=torch.cat([b.act for b in batches]),
        rew=torch.cat([b.rew for b in batches]),
        terminated=torch.cat([b.terminated for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
        valid=torch.cat([b.valid for b in batches]),
        logp_behavior=torch.cat([b.logp_behavior for b in batches]),
        return_before=first.return_before,
        length_before=first.length_before,
    )


def _first_episodes(batch: RolloutBatch, quota: torch.Tensor) -> RolloutBatch:
    """Keep the first ``quota[b]`` episodes of each env b (all complete); mark every other step invalid."""
    starts = torch.ones_like(batch.valid)
    starts[1:] = ~batch.valid[:-1] | batch.done[:-1]
    episode_index = torch.cumsum((starts & batch.valid).long(), 0) - 1  # [T, B]: k-th episode of env b
    keep = batch.valid & (episode_index < quota.to(episode_index.device))
    return RolloutBatch(
        obs=batch.obs,
        act=batch.act,
        rew=batch.rew * keep,
        terminated=batch.terminated & keep,
        truncated=batch.truncated & keep,
        valid=keep,
        logp_behavior=batch.logp_behavior,
        return_before=torch.zeros_like(batch.return_before),
        length_before=torch.zeros_like(batch.length_before),
    )
