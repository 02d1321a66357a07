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
    """One bar over the run's env-step budget, with the training return and the last evaluation's return.

    Lightning's bars count batches of an epoch; here an epoch is one batch and the budget is in env steps,
    so they would show ``Epoch 9/-2``. Rank 0 draws it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar: tqdm | None = None

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            self.bar = tqdm(
                total=getattr(pl_module, "total_env_steps", None),
                initial=getattr(pl_module, "env_steps", 0),
                desc=str(getattr(getattr(pl_module, "env", None), "id", "training")),
                unit=" steps",
                unit_scale=True,
                dynamic_ncols=True,
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar is None:
            return
        postfix = {"return": _fmt(pl_module.train_return_mean)}
        evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, Evaluation)), None)
        if evaluation is not None:
            postfix["eval"] = _fmt(evaluation.return_mean)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(pl_module.env_steps - self.bar.n)  # redraws at most every 0.1 s, with the postfix

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def print(self, *args, **kwargs) -> None:
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
