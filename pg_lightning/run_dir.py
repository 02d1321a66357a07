"""The run dir: where a ``train.py`` run's files go, and how a resumed run continues in it.

A run dir holds ``.hydra/`` (the composed config), ``metrics.csv``, ``summary.json``, ``last.ckpt`` and
``best.ckpt``. ``python train.py ckpt_path=<run dir>/last.ckpt`` continues that run *in the same dir*:

- ``hydra.run.dir`` resolves to the checkpoint's run dir (``continued_run_dir``, an OmegaConf resolver used
  in ``conf/config.yaml``); ``hydra.run.dir=...`` on the command line still asks for a new one;
- the resumed run's own Hydra files go to ``.hydra/resumed/``, so ``.hydra/config.yaml`` stays the config
  that built the weights (``PolicyGradientModule.from_run`` rebuilds from it);
- ``metrics.csv`` is continued (``RunDirCSVLogger``): rows logged after the checkpoint was saved (a run
  killed between two saves) are dropped, the resumed rows follow, so the file holds one curve.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import OmegaConf

METRICS_CSV = "metrics.csv"


def is_run_dir(path: str | Path) -> bool:
    """A directory a ``train.py`` run wrote: it has the run's ``.hydra/config.yaml``."""
    return (Path(path) / ".hydra" / "config.yaml").is_file()


def continued_run_dir(ckpt_path: str | None, new_dir: str) -> str:
    """``hydra.run.dir``: the run dir of ``ckpt_path`` when the checkpoint is in one, else ``new_dir``."""
    if ckpt_path and is_run_dir(Path(str(ckpt_path)).parent):
        return str(Path(str(ckpt_path)).parent)
    return new_dir


def hydra_subdir(ckpt_path: str | None) -> str:
    """``hydra.output_subdir``: ``.hydra``, or ``.hydra/resumed`` for a run continued in its own run dir."""
    return ".hydra/resumed" if ckpt_path and is_run_dir(Path(str(ckpt_path)).parent) else ".hydra"


def register_resolvers() -> None:
    """Make ``${pg_run_dir:...}`` and ``${pg_hydra_subdir:...}`` available to Hydra's configs."""
    OmegaConf.register_new_resolver("pg_run_dir", continued_run_dir, replace=True)
    OmegaConf.register_new_resolver("pg_hydra_subdir", hydra_subdir, replace=True)


class RunDirCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` writing ``<run_dir>/metrics.csv``, continued when a run resumes.

    Lightning's writer expects a directory of its own: it warns about any other file in it and deletes an
    existing ``metrics.csv``. Here the run dir is shared by design (``.hydra/``, checkpoints, W&B files), and a
    resumed run appends.

    Args:
        run_dir: the run dir.
        resume_step: the global step of the checkpoint being resumed, or ``None`` for a new run. Rows of an
            existing ``metrics.csv`` up to this step are kept; later ones were logged after that checkpoint.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        super().__init__(save_dir=str(run_dir), name="", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _ContinuedWriter(self.log_dir, self.resume_step)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep the rows up to ``resume_step`` of an existing metrics.csv (Lightning's writer deletes it)."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resume_step is None:
            # A new run in a dir that has a metrics.csv: the old file is kept beside the new one, not deleted.
            kept = path.with_name("metrics.previous.csv")
            os.replace(path, kept)
            rank_zero_warn(f"{path} belonged to an earlier run in this dir: moved to {kept.name}")
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) <= self.resume_step]
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = header  # later rows are appended under this header (widened if new keys come)
