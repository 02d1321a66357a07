"""The rules that span config groups, and the one message format of every refused value.

Each object validates its own fields in its constructor (``require``), for configs and plain Python alike;
``run.build`` constructs them before any env is made. ``validate_config`` adds what no constructor can see:
rules across groups (a budget smaller than one batch, gradient clipping with this optimizer, a video without
its extra), run-level keys (``seed``, ``verbose``, ``ckpt_path``, the accelerator), and the optimizer's own
arguments (built once on a dummy parameter). One line per problem, naming key and value.
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


def finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def positive_number(value: Any) -> bool:
    return finite_number(value) and value > 0


def unit_interval(value: Any) -> bool:
    return finite_number(value) and 0.0 <= value <= 1.0


def non_negative(value: Any) -> bool:
    return finite_number(value) and value >= 0


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def require(key: str, value: Any, check: Callable[[Any], bool], expected: str, error: type = ValueError) -> None:
    """Raise ``error("<key> must be <expected>, got <value>")`` unless ``check(value)``: the one message format
    of every refused value, in configs and in constructors alike."""
    if not check(value):
        raise error(f"{key} must be {expected}, got {value!r}")

# Integer keys where an integer-valued float (``total_env_steps=1e6``) is accepted and converted.
INTEGER_KEYS = ("total_env_steps", "steps_per_env", "max_iterations", "env.num_envs", "env.max_episode_steps",
                "eval.every_n_env_steps")

# Run-level keys that no constructor owns: key -> (check, what a valid value is). Every other key is checked
# by the constructor of its object (VectorEnvFactory, Estimator, ValueFunctionConfig, OffPolicy,
# NaturalGradient, PolicyGradientModule, Evaluation, CrashSafeCheckpoint), which run.build calls before any
# env is made; this module keeps only these and the rules that span groups.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "an integer"),  # seed_everything runs before the module that would check it
    "verbose": (boolean, "true or false"),
    "optimizer.lr": (positive_number, "a positive number"),  # torch's optimizers accept lr=0
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
    sizes = OmegaConf.select(cfg, "policy.hidden_sizes", default=None)  # the policy is built after the env
    if sizes is not None and not all(positive_int(size) for size in sizes):
        raise ConfigError(f"policy.hidden_sizes must be a list of positive integers, got {list(sizes)}")
    steps, envs, budget = cfg.steps_per_env, cfg.env.num_envs, cfg.total_env_steps
    if positive_int(steps) and positive_int(envs) and positive_int(budget) and budget < steps * envs:
        raise ConfigError(
            f"total_env_steps={budget} is smaller than one batch "
            f"(steps_per_env={steps} x env.num_envs={envs} = {steps * envs})"
        )
    from pg_lightning.update import check_gradient_clipping  # torch: only when a config is checked

    natural_gradient = str(OmegaConf.select(cfg, "optimizer._target_", default="")).endswith("NaturalGradient")
    try:
        check_gradient_clipping(OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None), natural_gradient)
    except ValueError as error:
        raise ConfigError(str(error)) from None
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
