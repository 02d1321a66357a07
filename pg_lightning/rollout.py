"""On-policy data collection: a collector that steps a vector env, and the Lightning-facing dataset.

Lightning fetches the next batch of an iterable *before* ``training_step`` runs on the current one,
so an endless generator would train on data of the previous policy (docs/architecture.md, trap 1).
``RolloutDataset.__iter__`` therefore yields exactly one batch and stops: each Lightning epoch is one
iteration, and its ``iter()`` runs after the previous update, with the current weights. The envs and
their running episodes live in the ``RolloutCollector`` and survive across iterations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import nn
from torch.utils.data import IterableDataset

from pg_lightning.episodes import EpisodeTracker
from pg_lightning.batch import RolloutBatch
from pg_lightning.checkpoint import env_state, restore_env_state
from pg_lightning.distributions import ActionMaskReader, mask_actions
from pg_lightning.encoders import is_image_space
from pg_lightning.envs import check_action_space, to_env_action
from pg_lightning.policies import is_recurrent
from pg_lightning.validation import positive_int, require


Observer = Callable[[torch.Tensor, torch.Tensor], None]  # (obs [B, *o], rows [B]) before the policy acts


class EnvStepError(RuntimeError):
    """The environment raised while stepping; the message names the env and the env step."""


class RolloutCollector:
    """Collects a batch from every env of ``envs`` per call, with the given policy; two ways to end a batch.

    ``whole_episodes=True`` (what training uses for estimators without a value function): every call
    resets all envs; each env collects episodes until it has ``steps_per_env`` steps of them, and then
    finishes the episode it is in. An episode belongs to the batch if and only if it *started* before
    its env had T steps, a rule decided before the episode begins, so by Wald's identity the sum over
    the batch's episodes of any per-episode quantity has expectation E[N] times its per-episode mean:
    the batch is a set of whole episodes sampled with the current policy, as in the lecture (§2).
    Envs that are done wait for the others while the vector env keeps stepping them; those steps
    (and the episodes they start) belong to no episode of the batch: they are ``valid = False`` and
    still counted in ``steps_taken`` and ``env_steps``. The batch's time length varies from call to call.

    ``whole_episodes=False``: each call steps every env exactly ``steps_per_env`` times; the envs are
    reset once (with ``seed``), and the current observations and running episodes carry over from one
    ``collect`` to the next, so episodes are cut by the batch end (only a value function can bootstrap
    them).

    Either way the first reset uses ``seed`` (env ``i`` gets ``seed + i``) and later resets continue
    the envs' random streams. gymnasium's vector envs autoreset in NEXT_STEP mode: the step after an
    episode ends resets that env, ignores its action and returns reward 0; those steps are
    ``valid = False`` and are not env steps.

    A recurrent policy's state (``recurrent.py``) is carried per env across steps and batches like the running
    episodes, and reset to the policy's initial state before every step whose observation begins an episode
    (after a reset, including NEXT_STEP reset steps); the batch stores these starts (``first``) and the state
    before its step 0 (``policy_state``), so training replays exactly the computation that acted.

    Args:
        envs: a gymnasium vector env (NEXT_STEP autoreset, the gymnasium default). With
            ``whole_episodes`` its episodes must end (a time limit), or a batch never ends.
        steps_per_env: T.
        gamma: the discount used for ``RolloutBatch.return_before``.
        seed: seed of the first reset; ``None`` leaves the envs unseeded.
        name: how errors name the env (default: the vector env's spec id).
        whole_episodes: the batch rule above.

    An exception raised by the env is re-raised as ``EnvStepError`` naming the env and the env step.
    """

    def __init__(
        self,
        envs: VectorEnv,
        steps_per_env: int,
        gamma: float = 0.99,
        seed: int | None = None,
        name: str | None = None,
        whole_episodes: bool = False,
    ):
        require("steps_per_env", steps_per_env, positive_int, "a positive integer")
        spec = getattr(envs, "spec", None)
        self.name = name or (spec.id if spec is not None else type(envs).__name__)
        check_action_space(envs.single_action_space, self.name)
        self.envs = envs
        self.steps_per_env = steps_per_env
        self.gamma = gamma
        self.seed = seed
        self.whole_episodes = whole_episodes
        self.env_steps = 0
        self.episodes = EpisodeTracker(envs.num_envs, gamma)
        num_envs = envs.num_envs
        self._obs: np.ndarray | None = None
        self._first_reset = True
        self._taken_in_batch: np.ndarray | None = None
        self._reset_next = np.zeros(num_envs, dtype=bool)
        self._first = np.ones(num_envs, dtype=bool)  # the current observation begins an episode
        self._policy_state: torch.Tensor | None = None  # a recurrent policy's state per env, [B, S]
        self._action_mask: np.ndarray | None = None  # the actions the env allows now, [B, n] (its info's action_mask)
        self._masks = ActionMaskReader(envs.single_action_space, num_envs)
        self._initial_state: torch.Tensor | None = None  # its initial state, made once per batch, not per step

    def collect(self, policy: nn.Module, num_steps: int | None = None, observe: Observer | None = None) -> RolloutBatch:
        """One batch with actions sampled from ``policy``; ``num_steps`` (default T) steps per env.

        With ``whole_episodes`` each env collects whole episodes until it has ``num_steps`` steps of them;
        otherwise each env takes exactly ``num_steps`` steps (see the class doc). ``observe(obs [B, *o], rows [B])``,
        if given, is called at every step before the policy acts, with the envs whose step belongs to the batch
        (``valid``): per-step observation statistics (``normalization.NormalizedObservations.observe``).

        The policy runs under ``torch.inference_mode`` (no autograd bookkeeping on the per-step tensors); the
        batch's tensors are assembled outside it, so training can differentiate
        through them. A policy must therefore not keep tensors made in ``forward`` for later backward passes.
        """
        num_steps = self.steps_per_env if num_steps is None else num_steps
        if self.whole_episodes:
            return self._collect_whole_episodes(policy, num_steps, observe)
        return self._collect_steps(policy, num_steps, observe)

    def _collect_steps(self, policy: nn.Module, num_steps: int, observe: Observer | None) -> RolloutBatch:
        """Exactly ``num_steps`` steps of every env, continuing the running episodes."""
        if self._obs is None:
            self._reset(seed=self.seed)
            self._first[:] = True
            self._policy_state = None
        storage = _Storage.for_collector(self, policy, capacity=num_steps)
        state_before = self._start_state(policy)
        return_before = torch.as_tensor(self.episodes.discounted_return, dtype=torch.float32)
        length_before = torch.as_tensor(self.episodes.length.copy())
        with torch.inference_mode():
            for t in range(num_steps):
                storage.valid[t] = ~self._reset_next
                self._policy_step(policy, storage, t, observe)
                self._first = self._reset_next.copy()  # a reset step returns the first observation of an episode
                self._reset_next = storage.terminated[t] | storage.truncated[t]
        storage.mask_to_valid(num_steps)
        valid = storage.valid[:num_steps]
        self.env_steps += int(np.count_nonzero(valid))
        self.episodes.track(storage.rew[:num_steps], valid, storage.done(num_steps))
        return storage.batch(num_steps, self._obs, self._first, storage.valid[:num_steps].sum(0), return_before,
                             length_before, state_before)

    def _collect_whole_episodes(self, policy: nn.Module, num_steps: int, observe: Observer | None) -> RolloutBatch:
        """Whole episodes: env b's episodes that start before it has ``num_steps`` steps of them, each to its end."""
        num_envs = self.envs.num_envs
        self._reset(seed=self.seed if self._first_reset else None)
        self._first_reset = False
        # Room for T steps plus one typical episode; grown (doubled) if an env needs more.
        storage = _Storage.for_collector(self, policy, capacity=num_steps + num_steps // 4 + 16)
        self._reset_next[:] = False
        self._first = np.ones(num_envs, dtype=bool)
        state_before = self._start_state(policy)
        used = np.zeros(num_envs, dtype=np.int64)  # steps of this batch's episodes, per env
        taken = np.zeros(num_envs, dtype=np.int64)  # env steps (not reset steps), per env
        self._taken_in_batch = taken  # updated in place: what an EnvStepError reports
        collecting = np.ones(num_envs, dtype=bool)  # env b may still start (or is in) one of its episodes
        t = 0
        with torch.inference_mode():
            while collecting.any():
                if t == storage.capacity:
                    storage.grow()
                real = ~self._reset_next
                in_batch = real & collecting
                storage.valid[t] = in_batch
                self._policy_step(policy, storage, t, observe)
                taken += real
                used += in_batch
                done = storage.terminated[t] | storage.truncated[t]
                # An episode that ends after its env has T steps is the env's last one in this batch.
                collecting &= ~(done & in_batch & (used >= num_steps))
                self._first = self._reset_next.copy()
                self._reset_next = done
                t += 1
        self._taken_in_batch = None
        storage.mask_to_valid(t)
        self.episodes.record_whole_episodes(storage.rew[:t], storage.valid[:t], storage.done(t))
        self.env_steps += int(taken.sum())
        zeros = torch.zeros(num_envs)
        return storage.batch(t, self._obs, self._first, taken, zeros, zeros.long(), state_before)

    def _reset(self, seed: int | None) -> None:
        self._obs, info = self.envs.reset(seed=seed)
        self._action_mask = self._masks.read(info, self._where)

    def _where(self) -> str:
        return f"environment {self.name} at env step {self.env_steps}"

    def _mask_from(self, info: dict) -> np.ndarray:
        """The ``[B, n]`` action mask of an env that gave one at reset: it must give one at every step."""
        mask = self._masks.read(info, self._where)
        if mask is None:
            raise ValueError(f"{self._where()}: an env stopped giving info['action_mask'] (give it at every reset "
                             f"and step)")
        return mask

    def _start_state(self, policy: nn.Module) -> torch.Tensor | None:
        """A recurrent policy's carried state before this batch's step 0 (its initial state at first); None
        for a memoryless policy."""
        if not is_recurrent(policy):
            self._policy_state = None
            return None
        initial = self._initial_state = policy.initial_state(self.envs.num_envs)
        self._policy_state = initial if self._policy_state is None else self._policy_state.to(initial.device)
        # A copy made outside inference mode: the carried state was made inside it, and training differentiates
        # through the tensors built from this one.
        return self._policy_state.clone()

    def _policy_step(self, policy: nn.Module, storage: _Storage, t: int, observe: Observer | None = None) -> None:
        """Row ``t`` (its ``valid`` set): the observation, an action sampled from ``policy``, its log-prob, and the
        env's answer."""
        obs_t = storage.obs[t]
        obs_t[:] = self._obs  # the storage dtype: float32 (MuJoCo gives float64), uint8 for images
        storage.first[t] = self._first
        obs = torch.from_numpy(obs_t).to(storage.device)
        if observe is not None:
            observe(obs, torch.from_numpy(storage.valid[t]).to(storage.device))
        mask = None
        if storage.action_mask is not None:  # π restricted to the actions the env allows (distributions.py)
            storage.action_mask[t] = self._action_mask
            mask = torch.from_numpy(storage.action_mask[t]).to(storage.device)
        if self._policy_state is None:
            dist = mask_actions(policy(obs), mask)
        else:  # the state is reset before an episode's first observation, as the replay in training does
            first = torch.from_numpy(storage.first[t]).to(storage.device).unsqueeze(-1)
            state = torch.where(first, self._initial_state, self._policy_state)
            dist, self._policy_state = policy.step(obs, state)
            dist = mask_actions(dist, mask)
        action = dist.sample()
        step_logp = dist.log_prob(action)
        storage.logp_rows[t] = step_logp.numpy() if storage.on_host else step_logp  # stays on the policy's device
        storage.act[t] = action.cpu().numpy()  # the env needs the action on the host anyway
        try:
            self._obs, reward, term, trunc, info = self.envs.step(to_env_action(storage.act[t], storage.action_space))
        except Exception as error:
            # Whole-episode batches count their steps as they go (valid leaves out the waiting envs' steps).
            taken = storage.valid[:t].sum() if self._taken_in_batch is None else self._taken_in_batch.sum()
            raise EnvStepError(
                f"environment {self.name} raised at env step {self.env_steps + int(taken)} "
                f"(step {t} of this batch): {type(error).__name__}: {error}"
            ) from error
        # Raw env outputs; the masks of steps outside the batch's episodes are applied after the loop.
        storage.rew[t], storage.terminated[t], storage.truncated[t] = reward, term, trunc
        if mask is not None:
            self._action_mask = self._mask_from(info)

    def state_dict(self) -> dict:
        """The envs' state, their current observations and running episodes, as tensors and numbers only.

        With it a resumed run continues exactly where the checkpoint was taken, mid-episode. Envs whose state
        is not made of arrays and numbers (MuJoCo, Box2D) have ``envs: None`` and are reset on resume instead
        (``checkpoint.env_state``). Nothing is pickled, so the checkpoint loads with ``weights_only=True``.
        """
        envs = env_state(self.envs) if self._obs is not None else None
        state = {"envs": envs, "env_steps": self.env_steps}
        if envs is not None:
            arrays = {"obs": self._obs, "reset_next": self._reset_next, "first": self._first}
            if self._action_mask is not None:
                arrays["action_mask"] = self._action_mask
            state.update({name: torch.from_numpy(np.array(value)) for name, value in arrays.items()})
            state.update(self.episodes.state_dict())
            if self._policy_state is not None:
                state["policy_state"] = self._policy_state.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> bool:
        """Restore ``state_dict`` into this collector's fresh envs; returns False (the envs are reset at the
        next collect) if the state has none or they are not of the same structure."""
        self.env_steps = state["env_steps"]
        if not isinstance(state.get("envs"), list) or "obs" not in state:
            return False
        if not restore_env_state(self.envs, state["envs"]):
            return False
        self._first_reset = False  # the envs' random streams continue from the checkpoint
        self._obs, self._reset_next = state["obs"].numpy(), state["reset_next"].numpy()
        if "first" in state:
            self._first = state["first"].numpy().copy()
        self._action_mask = state["action_mask"].numpy().copy() if "action_mask" in state else None
        self._policy_state = state.get("policy_state")  # moved to the policy's device by the next collect
        self.episodes.load_state_dict(state)
        return True

    def close(self) -> None:
        self.envs.close()


class _Storage:
    """A batch's per-step rows in arrays allocated before the loop, so that a step costs only row writes.

    Keeping each step's action and log-prob tensors alive instead allocates fresh memory every step
    (measured in ``benchmarks/README.md``). ``logp`` lives on the policy's device; everything the env needs or returns stays on the host.
    """

    def __init__(self, capacity: int, envs: VectorEnv, device: torch.device, dtype: torch.dtype,
                 mask_width: int | None = None):
        num_envs = envs.num_envs
        self.capacity = capacity
        self.device = device
        self.on_host = device.type == "cpu"
        self.action_space = envs.single_action_space
        self.obs = np.empty((capacity + 1, num_envs, *envs.single_observation_space.shape),
                            dtype=_observation_dtype(envs.single_observation_space))
        self.act = np.empty((capacity, num_envs, *self.action_space.shape), dtype=_sample_dtype(self.action_space, dtype))
        self.logp = torch.empty((capacity, num_envs), dtype=dtype, device=device)
        self._view_logp_rows()
        self.rew = np.zeros((capacity, num_envs), dtype=np.float32)
        self.terminated = np.zeros((capacity, num_envs), dtype=bool)
        self.truncated = np.zeros((capacity, num_envs), dtype=bool)
        self.valid = np.zeros((capacity, num_envs), dtype=bool)
        self.first = np.zeros((capacity + 1, num_envs), dtype=bool)
        self.action_mask = None if mask_width is None else np.zeros((capacity, num_envs, mask_width), dtype=bool)

    @classmethod
    def for_collector(cls, collector: RolloutCollector, policy: nn.Module, capacity: int) -> _Storage:
        device, dtype = _device_and_dtype(policy)
        mask = collector._action_mask
        return cls(capacity, collector.envs, device, dtype, None if mask is None else mask.shape[1])

    def grow(self) -> None:
        """Double the capacity, keeping the rows written so far."""
        old, self.capacity = self.capacity, 2 * self.capacity
        for name in ("obs", "act", "rew", "terminated", "truncated", "valid", "first", "action_mask"):
            rows = getattr(self, name)
            if rows is None:
                continue
            extra = self.capacity + (name in ("obs", "first")) - rows.shape[0]
            setattr(self, name, np.concatenate([rows, np.zeros((extra, *rows.shape[1:]), dtype=rows.dtype)]))
        self.logp = torch.cat([self.logp, torch.empty((old, *self.logp.shape[1:]), dtype=self.logp.dtype, device=self.device)])
        self._view_logp_rows()

    def _view_logp_rows(self) -> None:
        # Step t's log-probs are written into logp_rows[t]: a numpy view on the host (a row write costs ~1 us,
        # torch's ~3 us), the tensor itself on an accelerator.
        self.logp_rows = self.logp.numpy() if self.on_host else self.logp

    def mask_to_valid(self, length: int) -> None:
        """Rewards and end flags only where a step belongs to the batch's episodes (reset steps give 0)."""
        valid = self.valid[:length]
        self.rew[:length] *= valid
        self.terminated[:length] &= valid
        self.truncated[:length] &= valid

    def done(self, length: int) -> np.ndarray:
        return self.terminated[:length] | self.truncated[:length]

    def batch(
        self, length: int, last_obs: np.ndarray, last_first: np.ndarray, steps_taken, return_before: torch.Tensor,
        length_before: torch.Tensor, policy_state: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """The first ``length`` rows as a ``RolloutBatch`` on the policy's device (``obs[length]`` = ``last_obs``,
        ``first[length]`` = ``last_first``); ``policy_state``: a recurrent policy's state before step 0."""
        self.obs[length] = last_obs
        self.first[length] = last_first
        device = self.device
        return RolloutBatch(
            obs=torch.from_numpy(self.obs[: length + 1]).to(device),
            act=torch.from_numpy(self.act[:length]).to(device),
            rew=torch.from_numpy(self.rew[:length]).to(device),
            terminated=torch.from_numpy(self.terminated[:length]).to(device),
            truncated=torch.from_numpy(self.truncated[:length]).to(device),
            valid=torch.from_numpy(self.valid[:length]).to(device),
            logp_behavior=self.logp[:length],
            return_before=return_before.to(device),
            length_before=length_before.to(device),
            steps_taken=torch.as_tensor(np.asarray(steps_taken, dtype=np.int64)).to(device),
            first=torch.from_numpy(self.first[: length + 1]).to(device),
            policy_state=policy_state,
            action_mask=None if self.action_mask is None else torch.from_numpy(self.action_mask[:length]).to(device),
        )


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


def _observation_dtype(space: gym.Space) -> np.dtype:
    """How the batch stores observations: images of uint8 pixels as uint8 (a quarter of float32's memory; the CNN
    converts them on the policy's device), everything else as float32 (MuJoCo's float64 included)."""
    if is_image_space(space) and space.dtype == np.uint8:
        return np.dtype(np.uint8)
    return np.dtype(np.float32)


def _sample_dtype(action_space: gym.Space, dtype: torch.dtype) -> np.dtype:
    """What a policy's ``sample()`` returns: class indices (int64) for ``Discrete`` and ``MultiDiscrete``, its float
    ``dtype`` for ``Box`` and ``MultiBinary`` (Bernoulli samples are 0./1. floats)."""
    if isinstance(action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        return np.dtype(np.int64)
    return torch.empty((), dtype=dtype).numpy().dtype
