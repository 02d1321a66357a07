"""Callbacks around training: periodic deterministic evaluation with stop-on-solve, and the run summary."""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from pg_lightning.evaluation import evaluate_policy, record_episode, write_video
from pg_lightning.module import PolicyGradientModule
from pg_lightning.validation import positive_int, require


class Evaluation(Callback):
    """Every ``every_n_iterations`` (or ``every_n_env_steps``), run the module's ``eval_episodes`` deterministic
    episodes on separate envs.

    Logs ``eval/return_mean``, ``eval/return_std``, what the evaluation took (``perf/eval_s``; the run's total
    is ``eval_s`` in summary.json) and, to W&B, the histogram ``eval/returns``; the latest
    ``eval/return_mean`` is also in ``trainer.callback_metrics`` after every iteration from the first evaluation
    on, so that ``ModelCheckpoint`` and ``EarlyStopping`` can monitor it (list them after this callback). With
    ``stop_on_solve``, training ends once the mean reaches the env's ``reward_threshold`` (CartPole-v1:
    475). The last iteration is always evaluated, so the final policy has a score.

    Args:
        every_n_iterations: evaluate after every n-th iteration.
        every_n_env_steps: if set, evaluate instead after the first iteration that passes each multiple of
            this many env steps: a schedule that does not depend on the batch size (small batches would
            otherwise spend most of the run evaluating).
        stop_on_solve: stop training when the eval mean reaches the reward threshold.
        seed: seed of the eval envs' first reset (later evaluations continue their RNG streams); ``None``: the
            module's ``eval_seed``, the seed ``trainer.validate`` uses too.
        video: an mp4 path: at the end of training, render one deterministic episode, write it there and,
            with a W&B logger, log it as ``eval/video`` (needs the ``video`` extra; a rendering failure is
            reported as a warning, the run is kept). ``None``: no video.
    """

    def __init__(
        self,
        every_n_iterations: int = 5,
        stop_on_solve: bool = True,
        seed: int | None = None,
        video: str | Path | None = None,
        every_n_env_steps: int | None = None,
    ):
        require("eval.every_n_iterations", every_n_iterations, positive_int, "a positive integer")
        if every_n_env_steps is not None:
            require("eval.every_n_env_steps", every_n_env_steps, positive_int, "a positive integer or null")
        self.every_n_iterations = every_n_iterations
        self.every_n_env_steps = every_n_env_steps
        self.stop_on_solve = stop_on_solve
        self.seed = seed
        self.video = None if video is None else Path(video)
        self.envs = None
        self.return_mean = math.nan
        self.evaluated_at_iteration = 0
        self.evaluated_at_env_steps = 0
        self.eval_s = 0.0  # wall time spent evaluating, over the run
        self.solved_at_env_steps: int | None = None
        self.reward_threshold: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = _pg_module(pl_module)
        self.reward_threshold = module.env.reward_threshold
        if self.envs is None:
            self.envs = module.env.make(num_envs=module.eval_episodes)
            if self.seed is None:
                self.seed = module.eval_seed
            self._next_seed: int | None = self.seed

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module = _pg_module(pl_module)
        # The last iteration (the budget is spent: the module set should_stop) is evaluated here, not at
        # train end, so that callbacks after this one (ModelCheckpoint) see its score too.
        if self._due(module) or trainer.should_stop:
            self._evaluate(trainer, module)
        if not math.isnan(self.return_mean):
            # The latest evaluation in trainer.callback_metrics, for Lightning's own callbacks
            # (ModelCheckpoint(monitor="eval/return_mean", mode="max"), EarlyStopping); the loggers get it above.
            pl_module.log("eval/return_mean", self.return_mean, logger=False, on_step=False, on_epoch=True, batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module = _pg_module(pl_module)
        if self.evaluated_at_iteration != module.iterations:
            self._evaluate(trainer, module)
        if self.video is not None and trainer.is_global_zero:
            self._write_video(trainer, module)

    def _write_video(self, trainer: Trainer, module: PolicyGradientModule) -> None:
        try:
            frames, fps = record_episode(module.policy, module.env, seed=self.seed)
            write_video(frames, fps, self.video)
        except Exception as error:  # noqa: BLE001 - a finished run is kept even if rendering fails
            rank_zero_warn(f"eval video skipped: {type(error).__name__}: {error}")
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb  # only when a W&B logger is in use

                video = wandb.Video(str(self.video), format="mp4")
                logger.log_metrics({"eval/video": video, "rollout/env_steps": float(module.env_steps)},
                                   step=trainer.global_step)

    def _due(self, module: PolicyGradientModule) -> bool:
        if self.every_n_env_steps is None:
            return module.iterations % self.every_n_iterations == 0
        every = self.every_n_env_steps
        return module.env_steps // every > self.evaluated_at_env_steps // every

    def _evaluate(self, trainer: Trainer, module: PolicyGradientModule) -> None:
        start = time.perf_counter()
        returns = evaluate_policy(module.policy, self.envs, seed=self._next_seed)
        elapsed = time.perf_counter() - start
        self.eval_s += elapsed
        self._next_seed = None
        self.return_mean = float(returns.mean())
        self.evaluated_at_iteration = module.iterations
        self.evaluated_at_env_steps = module.env_steps
        solved = self.reward_threshold is not None and self.return_mean >= self.reward_threshold
        if solved and self.solved_at_env_steps is None:
            self.solved_at_env_steps = module.env_steps
        metrics = {
            "eval/return_mean": self.return_mean,
            "eval/return_std": float(returns.std()),
            "perf/eval_s": elapsed,
            "rollout/env_steps": float(module.env_steps),
        }
        # Logged through the loggers directly: this also runs in on_train_end, where self.log is not allowed.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                import wandb  # only when a W&B logger is in use

                histogram = {"eval/returns": wandb.Histogram(returns.tolist()), "rollout/env_steps": float(module.env_steps)}
                logger.log_metrics(histogram, step=trainer.global_step)
        if solved and self.stop_on_solve:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "return_mean": self.return_mean,
            "evaluated_at_iteration": self.evaluated_at_iteration,
            "evaluated_at_env_steps": self.evaluated_at_env_steps,
            "eval_s": self.eval_s,
            "solved_at_env_steps": self.solved_at_env_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.return_mean = state_dict["return_mean"]
        self.evaluated_at_iteration = state_dict["evaluated_at_iteration"]
        self.evaluated_at_env_steps = state_dict.get("evaluated_at_env_steps", 0)  # older checkpoints lack them
        self.eval_s = state_dict.get("eval_s", 0.0)
        self.solved_at_env_steps = state_dict["solved_at_env_steps"]

    @property
    def solved(self) -> bool:
        """The latest evaluation reached the reward threshold."""
        return self.reward_threshold is not None and self.return_mean >= self.reward_threshold


class RunSummary(Callback):
    """Writes ``summary.json`` at the end of every run: finished, solved, interrupted or failed.

    Args:
        path: where to write the JSON (atomically: a temp file renamed over it).
        evaluation: the run's ``Evaluation`` callback, for eval and solve figures (optional).
        metrics_csv: path of the run's metrics CSV, or ``None`` if there is none.
        checkpoint: path of the run's ``last.ckpt``, reported when the file exists.
    """

    def __init__(
        self,
        path: str | Path,
        evaluation: Evaluation | None = None,
        metrics_csv: str | Path | None = None,
        checkpoint: str | Path | None = None,
    ):
        self.path = Path(path)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.evaluation = evaluation
        self.metrics_csv = None if metrics_csv is None else str(metrics_csv)
        self.summary: dict[str, Any] | None = None
        self._start: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, _pg_module(pl_module), "finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        error = None if interrupted else "".join(traceback.format_exception(exception))
        self._write(trainer, _pg_module(pl_module), "interrupted" if interrupted else "failed", error=error)

    def _write(self, trainer: Trainer, module: PolicyGradientModule, status: str, error: str | None = None) -> None:
        # Every rank keeps the summary (train() returns it); only rank 0 writes the file.
        try:
            summary = self._summary(trainer, module, status)
        except Exception as failure:  # noqa: BLE001 - a run's summary is written even when a figure cannot be made
            summary = {"status": status, "env_id": module.env.id, "env_steps": module.env_steps,
                       "iterations": module.iterations, "summary_error": f"{type(failure).__name__}: {failure}"}
        if error is not None:
            summary["error"] = error.strip().splitlines()[-1]
            summary["traceback"] = error
        self.summary = summary
        if trainer.is_global_zero:
            write_json_atomic(self.path, summary)

    def _summary(self, trainer: Trainer, module: PolicyGradientModule, status: str) -> dict[str, Any]:
        wall_s = time.perf_counter() - self._start if self._start is not None else math.nan
        evaluation = self.evaluation
        summary = {
            "status": status,
            "env_id": module.env.id,
            "estimator": module.estimator.name,
            "off_policy": module.off_policy.kind,
            "seed": module.seed,
            "world_size": trainer.world_size,
            "env_steps": module.env_steps,
            "iterations": module.iterations,
            "wall_s": round(wall_s, 3),
            "env_steps_per_s": round(module.env_steps / wall_s, 1) if wall_s > 0 else None,
            "train_return_mean": _finite_or_none(module.train_return_mean),
            "eval_return_mean": _finite_or_none(evaluation.return_mean) if evaluation else None,
            "eval_s": round(evaluation.eval_s, 3) if evaluation else None,
            "reward_threshold": module.env.reward_threshold,
            "solved": evaluation.solved if evaluation else False,
            "solved_at_env_steps": evaluation.solved_at_env_steps if evaluation else None,
            "metrics_csv": self.metrics_csv,
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None and self.checkpoint.exists() else None,
        }
        return summary


class KeepInterrupts(Callback):
    """Ctrl-C is never lost: a SIGINT that Python turned into a swallowed exception is raised again.

    Python raises ``KeyboardInterrupt`` wherever the main thread happens to be. Inside a finalizer
    (``__del__``) or a weakref callback it is printed as "Exception ignored" and the run goes on, here for the
    rest of its budget. During ``fit`` this callback's SIGINT handler records the signal before raising, and
    the end of every iteration raises it again if it was swallowed; Lightning then saves and stops as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # After an interrupt Lightning ignores SIGINT for its shutdown: leave its setting then.
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None


class CrashSafeCheckpoint(Callback):
    """Keeps ``last.ckpt`` current: every ``every_n_iterations``, at the end, and on interrupt or failure.

    The checkpoint holds the policy, V_φ, optimizer states, the run counters and the evaluation state
    (Lightning's checkpoint plus ``PolicyGradientModule.on_save_checkpoint``). It is written to a temp
    file and renamed over ``last.ckpt``, so a kill at any moment leaves the previous complete file.

    Args:
        path: where ``last.ckpt`` goes.
        every_n_iterations: period of the regular save.
    """

    def __init__(self, path: str | Path, every_n_iterations: int = 50):
        require("checkpoint.every_n_iterations", every_n_iterations, positive_int, "a positive integer")
        self.path = Path(path)
        self.every_n_iterations = every_n_iterations

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _pg_module(pl_module).iterations % self.every_n_iterations == 0:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.world_size == 1:  # saving is collective: with several ranks, one failing rank would hang it
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        # The whole state (optimizers and callbacks too), not only the weights: resume needs it. Its contents
        # are tensors, numbers and strings, which load with weights_only=True (no pickled objects).
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file in the same directory, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _pg_module(pl_module: LightningModule) -> PolicyGradientModule:
    if not isinstance(pl_module, PolicyGradientModule):
        raise TypeError(f"this callback needs a PolicyGradientModule, got {type(pl_module).__name__}")
    return pl_module
