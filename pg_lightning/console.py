"""What a run prints: a progress bar over the env-step budget, the run dir and the result, nothing else.

Lightning, torch and W&B each print lines a user does not need on every run: Lightning's hardware summary
and its advertisement for a logging product (info logs), a deprecation warning that Lightning triggers
inside torch, W&B's banner and its history footer. ``quiet_libraries`` silences Lightning's and torch's, and
``run.make_loggers`` starts W&B with its ``silent`` setting (its files still go to the run dir);
``verbose=true`` (a config key) leaves everything as the libraries print it. Lines whose cause is ours are fixed where they
start instead (``CrashSafeCheckpoint`` says what its checkpoint holds; ``run.make_loggers`` gives the CSV
logger the run dir it expects).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import IO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm

from pg_lightning.callbacks import Evaluation

# Lightning's rank-zero info lines ("GPU available: ...", the LitLogger tip, "`Trainer.fit` stopped: ...").
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_libraries() -> None:
    """Silence the libraries' routine console output in this process (warnings that matter still show)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's own pytree helper builds torch's deprecated LeafSpec at every training step; not ours to fix.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class EnvStepProgressBar(ProgressBar):
    """One bar over the run's budget, with env steps/s, the ETA, the training return and the last evaluation's.

    Lightning's bars count batches of an epoch; here an epoch is one batch and the budget is in env steps,
    so they would show ``Epoch 9/-2``. The bar counts env steps out of ``total_env_steps``, or iterations out
    of ``max_iterations`` when there is no env-step budget. Rank 0 draws it, and only on a terminal: written to
    a file or a pipe (a cluster's log) it stays quiet. ``Trainer(callbacks=[EnvStepProgressBar()])`` in plain
    Python.

    Args:
        file: where to draw (default: stderr).
    """

    def __init__(self, file: IO[str] | None = None) -> None:
        super().__init__()
        self._enabled = True
        self.file = file
        self.bar: tqdm | None = None
        self._count_iterations = False

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        total_env_steps = getattr(pl_module, "total_env_steps", None)
        max_iterations = getattr(pl_module, "max_iterations", None)
        self._count_iterations = total_env_steps is None and max_iterations is not None
        self.bar = tqdm(
            total=max_iterations if self._count_iterations else total_env_steps,
            initial=self._position(pl_module),
            desc=str(getattr(getattr(pl_module, "env", None), "id", "training")),
            unit=" it" if self._count_iterations else " steps",
            unit_scale=not self._count_iterations,
            dynamic_ncols=True,
            file=self.file,
            disable=None,  # tqdm's "only on a terminal"
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar is None:
            return
        postfix = {"return": _fmt(pl_module.train_return_mean)}
        evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, Evaluation)), None)
        if evaluation is not None:
            postfix["eval"] = _fmt(evaluation.return_mean)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(self._position(pl_module) - self.bar.n)  # redraws at most every 0.1 s, with the postfix

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def _position(self, pl_module: LightningModule) -> int:
        return getattr(pl_module, "iterations" if self._count_iterations else "env_steps", 0)

    def print(self, *args, **kwargs) -> None:
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
