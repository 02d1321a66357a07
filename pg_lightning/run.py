"""From a composed Hydra config to a finished run: build the objects, fit, write ``summary.json``.

``train.py`` is a thin ``@hydra.main`` wrapper around ``train``; tests and notebooks call it directly
with a config from ``hydra.compose``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from pg_lightning.callbacks import CrashSafeCheckpoint, Evaluation, KeepInterrupts, RunSummary
from pg_lightning.checkpoint import check_checkpoint
from pg_lightning.console import EnvStepProgressBar, quiet_libraries
from pg_lightning.module import PolicyGradientModule
from pg_lightning.natural_gradient import NaturalGradient
from pg_lightning.run_dir import RunDirCSVLogger, register_resolvers
from pg_lightning.threads import DEFAULT_TORCH_THREADS
from pg_lightning.validation import ConfigError, validate_config

register_resolvers()  # conf/config.yaml's hydra.run.dir uses them: a resumed run continues in its run dir

# W&B plots every namespace against env steps, not Lightning's global step.
WANDB_NAMESPACES = ("rollout", "eval", "loss", "diag", "perf")


@dataclass
class Run:
    """Everything ``train`` needs, built and validated before any training starts."""

    module: PolicyGradientModule
    trainer: L.Trainer
    summary: RunSummary
    ckpt_path: str | None = None


def build(cfg: DictConfig, run_dir: str | Path) -> Run:
    """Instantiate module, loggers, callbacks and trainer from ``cfg``; outputs go to ``run_dir``.

    Raises:
        ConfigError: with one line naming the bad key and value.
    """
    run_dir = Path(run_dir)
    quiet = not cfg.get("verbose", False)
    if quiet:
        quiet_libraries()
    validate_config(cfg)
    try:
        # The callbacks first: their constructors check their keys before the module makes an env.
        video = run_dir / "video.mp4" if cfg.get("video") else None
        evaluation = Evaluation(cfg.eval.every_n_iterations, stop_on_solve=cfg.stop_on_solve, video=video,
                                every_n_env_steps=cfg.eval.get("every_n_env_steps"))
        checkpoint = CrashSafeCheckpoint(run_dir / "last.ckpt", cfg.checkpoint.every_n_iterations)
        module = make_module(cfg)
        tags = [module.env.id, module.estimator.name, f"off_policy={module.off_policy.kind}"]
        loggers = make_loggers(cfg.logger, run_dir, tags, quiet=quiet, resume_step=resume_step(cfg.get("ckpt_path")))
    except Exception as error:  # noqa: BLE001 - turned into one line for the user, see _root_message
        message = _root_message(error)
        if message is None:
            raise
        raise ConfigError(message) from error
    metrics_csv = next((Path(lg.log_dir) / "metrics.csv" for lg in loggers if isinstance(lg, CSVLogger)), None)
    summary = RunSummary(run_dir / "summary.json", evaluation, metrics_csv=metrics_csv, checkpoint=checkpoint.path)
    # Order matters at the end of a run: final evaluation, then the checkpoint, then the summary; the
    # progress bar after the evaluation, so that it shows the latest evaluation's return.
    callbacks = [*optimizer_callbacks(module), evaluation, checkpoint, summary, KeepInterrupts()]
    if cfg.checkpoint.get("best", False):
        callbacks.insert(callbacks.index(evaluation) + 1, best_checkpoint(run_dir))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(EnvStepProgressBar())
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir),
        # Lightning's own checkpointing only through best.ckpt: without it, Lightning would add a default one.
        enable_checkpointing=bool(cfg.checkpoint.get("best", False)),
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if isinstance(logger, WandbLogger):
            for namespace in WANDB_NAMESPACES:
                logger.experiment.define_metric(f"{namespace}/*", step_metric="rollout/env_steps")
    return Run(module=module, trainer=trainer, summary=summary, ckpt_path=cfg.get("ckpt_path"))


def resume_step(ckpt_path: str | None) -> int | None:
    """The global step of the checkpoint a run resumes from (validate_config has already checked the file)."""
    return None if ckpt_path is None else int(check_checkpoint(str(ckpt_path))["global_step"])


def best_checkpoint(run_dir: Path) -> ModelCheckpoint:
    """Lightning's ``ModelCheckpoint`` keeping ``<run_dir>/best.ckpt``: the policy of the highest ``eval/return_mean``.

    Listed after the ``Evaluation`` callback, it checks every iteration: between evaluations the metric keeps
    its last value, which is no improvement, so a new best is saved only right after the evaluation that
    found it (the final one included).
    """
    # It warns about any file in its directory, and the run dir always holds Hydra's .hydra/ (and last.ckpt):
    # sharing the run dir is the design, so that warning is left out for this directory only. Before the first
    # evaluation there is no score to monitor yet: its warning about that is expected too.
    warnings.filterwarnings("ignore", message=rf"Checkpoint directory {re.escape(str(run_dir))} exists and is not empty")
    warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='eval/return_mean'\)` could not find the monitored key")
    return ModelCheckpoint(
        dirpath=run_dir, filename="best", monitor="eval/return_mean", mode="max", save_top_k=1,
        every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False,
    )


def make_module(cfg: DictConfig) -> PolicyGradientModule:
    """Seed everything with ``cfg.seed`` and build the module from the config's groups."""
    L.seed_everything(cfg.seed, verbose=False)
    return PolicyGradientModule(
        env=instantiate(cfg.env),
        policy=instantiate(cfg.policy),
        estimator=instantiate(cfg.estimator),
        optimizer=instantiate(cfg.optimizer),
        steps_per_env=cfg.steps_per_env,
        total_env_steps=cfg.total_env_steps,
        seed=cfg.seed,
        grad_variance_groups=cfg.diagnostics.groups if cfg.diagnostics.grad_variance else None,
        max_skipped_updates=cfg.max_skipped_updates,
        off_policy=instantiate(cfg.off_policy) if cfg.get("off_policy") else None,
        max_iterations=cfg.get("max_iterations"),
        whole_episodes=cfg.get("whole_episodes"),
        torch_threads=cfg.get("torch_threads", DEFAULT_TORCH_THREADS),
        eval_episodes=cfg.eval.num_episodes,
        normalize_observations=cfg.get("normalize_observations", False),
        scale_rewards=cfg.get("scale_rewards", False),
        max_grad_norm=cfg.get("max_grad_norm"),
        entropy_coef=cfg.get("entropy_coef", 0.0),
        anneal_lr=cfg.get("anneal_lr", False),
        normalizer_updates=cfg.get("normalizer_updates", "batch"),
    )


def optimizer_callbacks(module: PolicyGradientModule) -> list[Callback]:
    """The callbacks the module's optimizer needs in the trainer (the natural gradient is one)."""
    return [module.optimizer_factory] if isinstance(module.optimizer_factory, NaturalGradient) else []


def train(cfg: DictConfig, run_dir: str | Path, announce: bool = False) -> dict[str, Any]:
    """Build the run from ``cfg``, fit it, and return the summary that was written to ``run_dir``.

    ``announce``: print the run dir once the run is built (a refused config prints only its error).
    """
    run = build(cfg, run_dir)
    if announce:
        print(f"run dir: {run_dir}", flush=True)
    try:
        # weights_only: the checkpoint's unpickler builds tensors, numbers and strings only (checkpoint.py).
        run.trainer.fit(run.module, ckpt_path=run.ckpt_path, weights_only=True)
    finally:
        if any(isinstance(logger, WandbLogger) for logger in run.trainer.loggers):
            import wandb

            wandb.finish()  # a sweep runs many jobs in one process: each gets its own W&B run
            # finish() returns before wandb-core has written the run's records to run-*.wandb (trap 16);
            # teardown() waits for the core to close the run file and exit. The next wandb.init starts a new core.
            wandb.teardown()
    assert run.summary.summary is not None, "RunSummary writes at the end of fit"
    return run.summary.summary


def make_loggers(
    logger_cfg: DictConfig | None, run_dir: Path, tags: list[str] | None = None, quiet: bool = False,
    resume_step: int | None = None,
) -> list[Logger]:
    """The ``logger/`` group's logger, plus ``<run_dir>/metrics.csv`` unless the group is ``none``.

    A W&B run whose ``group`` is not set is grouped by what launched it (``wandb_grouping``) and tagged with
    ``tags`` (env id, estimator, off-policy kind); ``quiet`` starts it with W&B's ``silent`` setting (no banner,
    no history footer on the console). ``resume_step``: a resumed run's checkpoint step; its metrics.csv
    continues (``run_dir.RunDirCSVLogger``).
    """
    if not logger_cfg:
        return []
    metrics_csv = RunDirCSVLogger(run_dir, resume_step=resume_step)
    if str(logger_cfg.get("_target_", "")).endswith(RunDirCSVLogger.__name__):
        return [metrics_csv]
    extra = {}
    if str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        group, name = wandb_grouping()
        extra = {"group": logger_cfg.get("group") or group, "name": logger_cfg.get("name") or name, "tags": tags or []}
        if quiet:
            import wandb  # only when a W&B logger is configured

            # A Settings object, not a dict: Hydra's instantiate would turn a dict into a DictConfig, which W&B ignores.
            extra["settings"] = wandb.Settings(silent=True)
    logger = instantiate(logger_cfg, save_dir=str(run_dir), **extra)
    if isinstance(logger, WandbLogger):
        # Lightning hands wandb.init anonymous=None, which W&B reports as a deprecated setting on every run
        # (docs/architecture.md, trap 11). Left out, W&B's default is the same.
        logger._wandb_init.pop("anonymous", None)
    return [logger, metrics_csv]


def wandb_grouping() -> tuple[str | None, str | None]:
    """(group, name) of a W&B run from Hydra's runtime: the experiment overlay and the sweep it belongs to.

    A job of ``python train.py -m ...`` is grouped as ``[<experiment>/]sweep <sweep dir>`` and named by its
    overrides (``estimator=baseline,seed=1``); a single run only by its experiment, if it has one.
    """
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    experiment = hydra_cfg.runtime.choices.get("experiment")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = f"sweep {hydra_cfg.sweep.dir}"
        group = f"{experiment}/{sweep}" if experiment else sweep
        return group, hydra_cfg.job.override_dirname or f"job {hydra_cfg.job.num}"
    return experiment, None


def _root_message(error: BaseException) -> str | None:
    """The message of the ``ValueError`` behind ``error`` (Hydra wraps it), or None if there is none."""
    while error is not None:
        if isinstance(error, ValueError):
            return str(error)
        error = error.__cause__ or error.__context__
    return None
