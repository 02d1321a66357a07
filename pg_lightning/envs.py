"""Vector environments: one factory that every part of the library builds its envs from."""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import VectorEnv

from pg_lightning.validation import finite_number, positive_int, require


BACKENDS = ("sync", "async")


@dataclass
class VectorEnvFactory:
    """How to build a gymnasium vector env; the config group ``env/`` instantiates this.

    Args:
        id: a registered gymnasium id, e.g. ``CartPole-v1``, or ``module:EnvId`` as gymnasium accepts it
            (``mypkg.envs:Corridor-v0`` imports ``mypkg.envs``, which registers ``Corridor-v0``).
        num_envs: parallel envs per process (per DDP rank).
        observation_indices: keep only these observation entries, e.g. ``[0, 2]`` hides CartPole's
            velocities (a POMDP, lecture §3.3). ``None`` keeps them all.
        reward_threshold: the return at which the env counts as solved; ``None`` takes the env spec's.
        max_episode_steps: the time limit (episodes are truncated after this many steps); ``None`` takes
            the env spec's. Whole-episode batches need one, or a batch might never end.
        kwargs: keyword arguments for the env's constructor.
        imports: modules to import before the id is looked up: the ones whose import registers your envs
            (``gymnasium.register``). They are imported again wherever envs are made (every DDP rank).

        wrappers: gymnasium wrappers put around each env copy, innermost first, each ``{"name": import path,
            "kwargs": {...}}``, e.g. ``gymnasium.wrappers.FilterObservation`` with ``filter_keys`` and then
            ``gymnasium.wrappers.FlattenObservation``, which turn a Dict observation into the flat Box the shipped
            policies read. With wrappers the env is made per copy (no native vector implementation).
        backend: ``sync``: the env's native vectorised implementation where it has one (CartPole-v1 does),
            else gymnasium's synchronous vector env (one env after another, in this process); ``async``:
            gymnasium's ``AsyncVectorEnv``, each env in its own subprocess. Both reset at the next step
            (NEXT_STEP autoreset), which the collector expects. ``benchmarks/env_backends.py`` times them: on
            Hopper-v5 on 2 cores ``async`` steps 0.45× as fast as ``sync`` with 1 env, 0.68× with 2.
    """

    id: str
    num_envs: int = 8
    observation_indices: Sequence[int] | None = None
    reward_threshold: float | None = None
    max_episode_steps: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    imports: Sequence[str] = ()
    backend: str = "sync"
    wrappers: Sequence[dict[str, Any]] = ()

    def __post_init__(self) -> None:
        require("env.num_envs", self.num_envs, positive_int, "a positive integer")
        require("env.backend", self.backend, lambda value: value in BACKENDS, "sync or async")
        if ":" in self.id:  # gymnasium's "module:EnvId": the module registers the id when imported
            module, self.id = self.id.split(":", 1)
            self.imports = [*self.imports, module]
        self.imports = list(self.imports)
        self.import_modules()
        if self.id not in gym.registry:
            close = difflib.get_close_matches(self.id, list(gym.registry), n=3, cutoff=0.6)
            hint = (f" (did you mean {', '.join(close)}?)" if close else
                    " (your own env? import the module that registers it: env.imports=[mypkg.envs], or env.id=mypkg.envs:<id>)")
            raise ValueError(f"env.id {self.id!r} is not a registered gymnasium environment{hint}")
        if self.reward_threshold is None:
            self.reward_threshold = gym.spec(self.id).reward_threshold
        else:
            require("env.reward_threshold", self.reward_threshold, finite_number, "a number or null")
        if self.max_episode_steps is not None:
            require("env.max_episode_steps", self.max_episode_steps, positive_int, "a positive integer or null")
        self.wrappers = [_plain(wrapper) for wrapper in self.wrappers]
        self._wrapper_classes = [_wrapper_class(i, wrapper) for i, wrapper in enumerate(self.wrappers)]

    def import_modules(self) -> None:
        """Import ``imports`` (registering their envs); one line naming the module if one cannot be imported."""
        for module in self.imports:
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - any import failure is the user's module: one line
                raise ValueError(f"env.imports: cannot import {module!r} ({type(error).__name__}: {error})") from None

    def _newer_version_hint(self) -> str:
        """`` (use <name>-v<latest>)`` when the registry has a newer version of this env, else ``""``."""
        namespace, name, version = gym.envs.registration.parse_env_id(self.id)
        latest = gym.envs.registration.find_highest_version(namespace, name)
        if version is None or latest is None or latest <= version:
            return ""
        return f"; use {gym.envs.registration.get_env_id(namespace, name, latest)}, the current version"

    @property
    def time_limit(self) -> int | None:
        """The episode cap in steps: ``max_episode_steps`` if set, else the env spec's (None if neither has one)."""
        return self.max_episode_steps if self.max_episode_steps is not None else gym.spec(self.id).max_episode_steps

    def _make_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.kwargs)
        if self.max_episode_steps is not None:
            kwargs["max_episode_steps"] = self.max_episode_steps  # gym.make's TimeLimit, or a native vector env's cap
        return kwargs

    def make(self, num_envs: int | None = None) -> VectorEnv:
        """A new vector env of ``num_envs`` (default ``self.num_envs``) copies; not yet reset."""
        envs = self._make_vector_env(self.num_envs if num_envs is None else num_envs)
        if self.observation_indices is not None:
            envs = _select_observations(envs, list(self.observation_indices))
        return envs

    def _make_vector_env(self, num_envs: int) -> VectorEnv:
        """gymnasium's vector env of the id, before our observation selection."""
        self.import_modules()  # a fresh process (a spawned DDP rank) has not registered the user's envs yet
        spec = gym.spec(self.id)
        if self.wrappers:  # wrappers go around each copy: gymnasium's sync or async vector env
            wrappers = [partial(cls, **dict(w.get("kwargs") or {})) for cls, w in zip(self._wrapper_classes, self.wrappers)]
            mode = "async" if self.backend == "async" else "sync"
            return gym.make_vec(self.id, num_envs=num_envs, vectorization_mode=mode, wrappers=wrappers,
                                **self._make_kwargs())
        mode = "async" if self.backend == "async" else "vector_entry_point" if spec.vector_entry_point else "sync"
        return gym.make_vec(self.id, num_envs=num_envs, vectorization_mode=mode, **self._make_kwargs())

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        """``(observation_space, action_space)`` of one env, read from a throwaway env.

        Raises:
            ValueError: one line, if the env cannot be made (naming a newer registered version if there is one).
        """
        try:
            with warnings.catch_warnings():  # gymnasium's "out of date" notice: the hint below says it in one line
                warnings.simplefilter("ignore")
                envs = self._make_vector_env(num_envs=1)
        except Exception as error:  # noqa: BLE001 - whatever the env's constructor raises: one line for the user
            first_line = (str(error).strip().splitlines() or [""])[0]
            hint = self._newer_version_hint()
            raise ValueError(f"env.id {self.id!r} cannot be made ({type(error).__name__}: {first_line}){hint}") from None
        if self.observation_indices is not None:
            envs = _select_observations(envs, list(self.observation_indices))
        try:
            return envs.single_observation_space, envs.single_action_space
        finally:
            envs.close()


class ActionMaskToInfo(gym.ObservationWrapper):
    """For envs that put their action mask in a Dict observation (PettingZoo-style ``{"observation": ...,
    "action_mask": ...}``): moves ``obs["action_mask"]`` into ``info["action_mask"]``, where the collector and the
    evaluation read masks, and leaves the other keys as the observation. List it first in ``env.wrappers``:
    ``[{name: pg_lightning.envs.ActionMaskToInfo}, {name: gymnasium.wrappers.FlattenObservation}]``."""

    def __init__(self, env: gym.Env, key: str = "action_mask"):
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Dict) or key not in space.spaces:
            raise ValueError(f"ActionMaskToInfo needs a Dict observation with a {key!r} key, got {space}")
        self.key = key
        self.observation_space = gym.spaces.Dict({k: v for k, v in space.spaces.items() if k != key})

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._split(obs, info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self._split(obs, info)
        return obs, reward, terminated, truncated, info

    def _split(self, obs: dict, info: dict) -> tuple[dict, dict]:
        rest = {k: v for k, v in obs.items() if k != self.key}
        return rest, {**info, "action_mask": np.asarray(obs[self.key], dtype=bool)}

    def observation(self, observation: dict) -> dict:
        return {k: v for k, v in observation.items() if k != self.key}


def _plain(value: Any) -> Any:
    """``value`` with every mapping a dict and every list a list (Hydra hands over DictConfig and ListConfig)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _wrapper_class(position: int, wrapper: dict[str, Any]) -> type:
    """The wrapper class ``wrapper["name"]`` names (an import path); one line naming ``env.wrappers[i]`` if not."""
    key = f"env.wrappers[{position}]"
    unknown = set(wrapper) - {"name", "kwargs"}
    if "name" not in wrapper or unknown:
        raise ValueError(f"{key} must be {{name: <import path>, kwargs: {{...}}}}, got {wrapper}")
    module_name, _, attribute = str(wrapper["name"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{key}.name {wrapper['name']!r} cannot be imported ({type(error).__name__}: {error})") from None
    if not (isinstance(cls, type) and issubclass(cls, gym.Wrapper)):
        raise ValueError(f"{key}.name {wrapper['name']!r} is not a gymnasium.Wrapper")
    return cls


def _select_observations(envs: VectorEnv, indices: list[int]) -> VectorEnv:
    """Keep observation entries ``indices`` of a vector env with a flat Box observation space."""
    space = envs.single_observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"env.observation_indices needs a flat Box observation space, got {space}")
    if not indices or min(indices) < 0 or max(indices) >= space.shape[0]:
        raise ValueError(f"env.observation_indices {indices} out of range for observations of size {space.shape[0]}")
    single = gym.spaces.Box(space.low[indices], space.high[indices], dtype=space.dtype)
    batched = gym.vector.utils.batch_space(single, envs.num_envs)
    return gym.wrappers.vector.TransformObservation(
        envs, lambda obs: obs[:, indices], observation_space=batched, single_observation_space=single
    )


class UnsupportedSpace(ValueError):
    """An observation or action space that pg_lightning's policies or rollout do not handle; the module adds the
    env's id to the message."""


def check_action_space(space: gym.Space, env_id: str | None = None) -> None:
    """Refuse action spaces the rollout cannot send to an env, in one line naming the env."""
    if (isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiBinary))
            or (isinstance(space, gym.spaces.MultiDiscrete) and len(space.shape) == 1)
            or (isinstance(space, gym.spaces.Box) and len(space.shape) == 1)):
        return
    where = f"env.id={env_id!r}: " if env_id else ""
    raise UnsupportedSpace(
        f"{where}action space {space} is not supported: pg_lightning handles Discrete, MultiDiscrete (one row of "
        "components), MultiBinary and 1-D Box actions; wrap the env so that its actions are one of these"
    )


def require_flat_observations(space: gym.Space, policies: str) -> None:
    """Refuse, for the shipped ``policies``, an observation space that is not a flat Box; say what to do instead."""
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 3:
        hint = ("an image is read by the CNN when its channels (at most 4) come first or last; wrap the env to "
                "reshape it, or pass your own policy")
    elif isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple, gym.spaces.Discrete, gym.spaces.Box)):
        hint = ("flatten it with gymnasium's wrappers: env.wrappers=[{name: gymnasium.wrappers.FlattenObservation}] "
                "(first gymnasium.wrappers.FilterObservation to drop keys it cannot flatten, such as text)")
    else:
        hint = "pass your own policy"
    raise UnsupportedSpace(f"observation space {space} is not supported by the {policies}: they need a flat Box; {hint}")


def to_env_action(act: np.ndarray, space: gym.Space) -> np.ndarray:
    """Map sampled actions to what the env accepts: Box actions are clipped to the bounds; categorical indices
    0..n-1 are shifted by the space's ``start``; bits are cast to the space's dtype."""
    if isinstance(space, gym.spaces.Box):
        return np.clip(act, space.low, space.high).astype(space.dtype, copy=False)
    if isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        return act if not np.any(space.start) else act + space.start
    if isinstance(space, gym.spaces.MultiBinary):
        return act.astype(space.dtype)
    return act
