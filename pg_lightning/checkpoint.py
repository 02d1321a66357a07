"""Checkpoints that hold no code: what is saved is tensors, numbers and strings, and loading runs nothing.

A pickle can make its loader run any function, so a checkpoint that is unpickled is a program
(docs/architecture.md, trap 15). Lightning
and torch load ours with ``weights_only=True``, whose unpickler accepts only tensors, numbers, strings and
containers of them and refuses anything else before building it. Everything pg_lightning saves is of that
kind, including the envs' state:

* ``env_state`` walks a vector env (its wrappers and, for a synchronous one, every sub-env and its wrapper
  chain) and records each object's attributes: arrays as tensors, numbers, strings, and numpy random
  generators as their bit generator's state (a dict of integers). Spaces, specs, enums and callables are
  configuration, rebuilt by ``VectorEnvFactory.make``, and are skipped.
* An env with any other attribute (a MuJoCo ``MjData``, a Box2D world) cannot be saved that way: its state
  is ``None`` and a resumed run resets it.
* ``restore_env_state`` writes the attributes back into a freshly made env of the same structure.
"""

from __future__ import annotations

import enum
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded without running code it contains (or is not a checkpoint)."""


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded weights-only; a file that this refuses is refused in one line.

    The weights-only unpickler stops at the first object it does not allow, before creating it, so a
    hostile file runs nothing here. Loading twice (here and in Lightning) costs milliseconds for our files.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a page of advice; the line that matters names the refused callable.
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise UnsafeCheckpointError(f"ckpt_path {str(path)!r} is not a readable checkpoint (not a torch pickle)") from None
        raise UnsafeCheckpointError(
            f"ckpt_path {str(path)!r} was refused: it holds objects that loading would have to run code for "
            f"(it calls {refused.group(1)}; pg_lightning's checkpoints hold only tensors, numbers and strings)"
        ) from None
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: one line, not a traceback
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UnsafeCheckpointError(f"ckpt_path {str(path)!r} is not a readable checkpoint ({type(error).__name__}: {first_line})") from None


# --- env state as tensors and numbers -----------------------------------------------------------------

# Attributes that are the env's configuration, not its state: rebuilt identically by the factory.
_CONFIGURATION = (gym.Space, EnvSpec, enum.Enum, type)


class _NotSaveable(Exception):
    """An attribute value that is neither configuration nor made of arrays and numbers."""


def env_state(envs: gym.vector.VectorEnv) -> list[dict[str, Any]] | None:
    """Every object's state in ``envs``, as ``[{"type": name, "attrs": {...}}]``; None if some part cannot be saved."""
    try:
        return [{"type": type(obj).__qualname__, "attrs": _encode_attrs(obj)} for obj in _objects(envs)]
    except _NotSaveable:
        return None


def restore_env_state(envs: gym.vector.VectorEnv, state: list[dict[str, Any]]) -> bool:
    """Write ``state`` (from ``env_state``) into a fresh ``envs`` of the same structure; False if it differs."""
    objects = list(_objects(envs))
    if [type(obj).__qualname__ for obj in objects] != [entry["type"] for entry in state]:
        return False
    for obj, entry in zip(objects, state):
        for name, value in entry["attrs"].items():
            setattr(obj, name, _decode(value))
    return True


def _objects(envs: Any) -> Iterator[Any]:
    """The vector env, its wrappers, and each sub-env with its wrappers, outermost first."""
    obj = envs
    while obj is not None:
        yield obj
        for sub_env in getattr(obj, "envs", None) or []:  # a synchronous vector env's copies
            yield from _objects(sub_env)
        obj = getattr(obj, "env", None)


# Attribute names that hold configuration or links: the wrapped env(s), a synchronous vector env's
# constructors, class metadata, the wrapper's constructor arguments, the render mode.
_CONFIGURATION_NAMES = frozenset({"env", "envs", "env_fns", "metadata", "spec", "_saved_kwargs", "render_mode"})


def _encode_attrs(obj: Any) -> dict[str, Any]:
    return {
        name: _encode(value)
        for name, value in vars(obj).items()
        if name not in _CONFIGURATION_NAMES and not isinstance(value, _CONFIGURATION) and not callable(value)
    }


def _encode(value: Any) -> dict[str, Any]:
    """A tagged value of tensors, numbers and strings only (what ``weights_only`` loading accepts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"kind": "py", "value": value}
    if isinstance(value, np.random.Generator):
        return {"kind": "generator", "value": value.bit_generator.state}
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" or array.dtype in (np.uint16, np.uint32, np.uint64):
            raise _NotSaveable(array.dtype)
        kind = "array" if isinstance(value, np.ndarray) else "scalar"
        return {"kind": kind, "value": torch.from_numpy(np.array(array, copy=True))}
    if isinstance(value, (list, tuple)):
        return {"kind": type(value).__name__, "value": [_encode(item) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"kind": "dict", "value": {key: _encode(item) for key, item in value.items()}}
    raise _NotSaveable(type(value))


def _decode(tagged: dict[str, Any]) -> Any:
    kind, value = tagged["kind"], tagged["value"]
    if kind == "py":
        return value
    if kind == "generator":
        generator = np.random.Generator(getattr(np.random, value["bit_generator"])())
        generator.bit_generator.state = value
        return generator
    if kind == "array":
        return value.numpy().copy()
    if kind == "scalar":
        return value.numpy()[()]
    if kind == "list":
        return [_decode(item) for item in value]
    if kind == "tuple":
        return tuple(_decode(item) for item in value)
    if kind == "dict":
        return {key: _decode(item) for key, item in value.items()}
    raise ValueError(f"unknown saved value kind {kind!r}")
