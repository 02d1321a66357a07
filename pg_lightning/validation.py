"""Check a composed config before anything is built: one clear line per problem, naming key and value.

The constructors validate their own arguments too (for plain-Python use); this pass runs first so that a
bad value is refused before any env is created or any time is spent.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig


_MISSING = object()


class ConfigError(ValueError):
    """A config value that cannot work; its message names the key and the value."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def unit_interval(value: Any) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


def non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def require(key: str, value: Any, check: Callable[[Any], bool], expected: str, error: type = ValueError) -> None:
    """Raise ``error("<key> must be <expected>, got <value>")`` unless ``check(value)``: the one message format
    of every refused value, in configs and in constructors alike."""
    if not check(value):
        raise error(f"{key} must be {expected}, got {value!r}")

# Integer keys where an integer-valued float (``total_env_steps=1e6``) is accepted and converted.
INTEGER_KEYS = ("total_env_steps", "steps_per_env", "max_iterations", "env.num_envs", "env.max_episode_steps")

# key -> (check, what a valid value is). Keys that a config does not have are skipped.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "an integer"),
    "total_env_steps": (positive_int, "a positive integer"),
    "steps_per_env": (positive_int, "a positive integer"),
    "max_iterations": (lambda v: v is None or positive_int(v), "a positive integer or null"),
    "max_skipped_updates": (positive_int, "a positive integer"),
    "env.num_envs": (positive_int, "a positive integer"),
    "env.max_episode_steps": (lambda v: v is None or positive_int(v), "a positive integer or null"),
    "env.reward_threshold": (lambda v: v is None or _is_number(v), "a number or null"),
    "whole_episodes": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "verbose": (lambda v: isinstance(v, bool), "true or false"),
    "torch_threads": (lambda v: v is None or positive_int(v), "a positive integer or null (torch's default: one per core)"),
    "estimator.gamma": (unit_interval, "in [0, 1]"),
    "estimator.gae_lambda": (unit_interval, "in [0, 1]"),
    "estimator.value.lr": (positive_number, "a positive number"),
    "estimator.value.steps": (positive_int, "a positive integer"),
    "optimizer.lr": (positive_number, "a positive number"),
    "optimizer.max_kl": (positive_number, "a positive number"),
    "optimizer.damping": (non_negative, "a non-negative number"),
    "optimizer.cg_iters": (positive_int, "a positive integer"),
    "off_policy.clip_ratio": (positive_number, "a positive number"),
    "off_policy.kl_coef": (non_negative, "a non-negative number"),
    "off_policy.reuse_batches": (non_negative_int, "a non-negative integer"),
    "off_policy.updates_per_batch": (positive_int, "a positive integer"),
    "off_policy.minibatches": (positive_int, "a positive integer"),
    "off_policy.truncate": (lambda v: v is None or positive_number(v), "a positive number or null"),
    "eval.every_n_iterations": (positive_int, "a positive integer"),
    "eval.num_episodes": (positive_int, "a positive integer"),
    "checkpoint.every_n_iterations": (positive_int, "a positive integer"),
    "diagnostics.groups": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
}


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first value that cannot work (see ``CHECKS`` and the rules below)."""
    from omegaconf import OmegaConf  # here, not at the top: the analysis API imports this module without Hydra

    for key in INTEGER_KEYS:  # 1e6 is an integer budget written as a float: take it as one
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, float) and value.is_integer():
            OmegaConf.update(cfg, key, int(value))
    for key, (check, expected) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING:  # _MISSING: the config has no such key (or its parent is null)
            require(key, value, check, expected, error=ConfigError)
    for key in ("policy.hidden_sizes", "estimator.value.hidden_sizes"):
        sizes = OmegaConf.select(cfg, key, default=None)
        if sizes is not None and not all(positive_int(size) for size in sizes):
            raise ConfigError(f"{key} must be a list of positive integers, got {list(sizes)}")
    batch = cfg.steps_per_env * cfg.env.num_envs
    if cfg.total_env_steps < batch:
        raise ConfigError(
            f"total_env_steps={cfg.total_env_steps} is smaller than one batch "
            f"(steps_per_env={cfg.steps_per_env} x env.num_envs={cfg.env.num_envs} = {batch})"
        )
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    natural_gradient = str(OmegaConf.select(cfg, "optimizer._target_", default="")).endswith("NaturalGradient")
    if clip and not natural_gradient:  # the natural gradient refuses it with its own reason (run.build)
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} is not supported: PolicyGradientModule steps its optimizers itself "
            "(manual optimization), where Lightning does not clip; leave it unset"
        )
    if cfg.get("video", False) and importlib.util.find_spec("moviepy") is None:
        raise ConfigError(
            "video=true needs the rendering extra to encode videos (moviepy is not installed): "
            'pip install -e ".[video]"'
        )
    _check_accelerator(OmegaConf.select(cfg, "trainer.accelerator", default=None))
    _check_optimizer(cfg)
    ckpt_path = OmegaConf.select(cfg, "ckpt_path", default=None)
    if ckpt_path is not None:
        if not os.path.isfile(str(ckpt_path)):
            raise ConfigError(f"ckpt_path {str(ckpt_path)!r} is not a file")
        from pg_lightning.checkpoint import UnsafeCheckpointError, check_checkpoint

        try:
            check_checkpoint(str(ckpt_path))  # before any env is built: a refused file costs nothing
        except UnsafeCheckpointError as error:
            raise ConfigError(str(error)) from None



def _check_accelerator(accelerator: Any) -> None:
    """Refuse a GPU accelerator on a machine without one (Lightning would stop with a long traceback)."""
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}: this machine has no CUDA GPU that torch can use "
                "(torch.cuda.is_available() is False); use trainer.accelerator=cpu"
            )


def _check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer on a dummy parameter, so that torch refuses a bad argument before anything runs."""
    from omegaconf import OmegaConf

    optimizer = OmegaConf.select(cfg, "optimizer", default=None)
    if optimizer is None or str(optimizer.get("_target_", "")).endswith("NaturalGradient"):
        return  # the natural gradient checks its own arguments in its constructor
    import torch
    from hydra.utils import instantiate

    try:
        instantiate(optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as error:  # noqa: BLE001 - torch's ValueError/TypeError, Hydra's wrapper: one line
        while error.__cause__ is not None:  # Hydra wraps the optimizer's own error
            error = error.__cause__
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"optimizer ({optimizer.get('_target_')}) refuses its arguments: {first_line}") from None
