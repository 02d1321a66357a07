"""Learning curves of runs and sweeps: ``python -m pg_lightning.plot RUN_OR_SWEEP_DIR... [--by KEY] [--out F.png]``.

Every directory under the given paths that holds a ``summary.json`` is a run; its curve is ``--metric``
(default ``eval/return_mean``) against ``rollout/env_steps`` from its ``metrics.csv``. Runs are grouped by
``--by``: one or more comma-separated keys, each a key of ``summary.json`` (``estimator``, ``off_policy``, ``env_id``, ``world_size``) or any config key
of the run's ``.hydra/config.yaml`` (``optimizer.lr``, ``estimator.gae_lambda``, ``steps_per_env``). Each group
is one line, the mean over its runs (usually seeds) with a ±1 std band, on a common grid of env steps; a run's
curve holds its latest evaluation until its next one, and its last one after it ends (a run stopped on solve
counts as solved from then on). Also prints one row per group: runs, final mean ± std, how many solved.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RunCurve:
    """One run's evaluations: ``env_steps`` (increasing) and ``values``, its group label, and its summary."""

    path: Path
    label: str
    env_steps: np.ndarray
    values: np.ndarray
    summary: dict


def find_runs(paths: list[Path]) -> list[Path]:
    """Every directory at or under ``paths`` that holds a ``summary.json``, sorted."""
    runs = set()
    for path in paths:
        if (path / "summary.json").is_file():
            runs.add(path)
        runs.update(p.parent for p in path.glob("**/summary.json"))
    return sorted(runs)


def group_label(run_dir: Path, summary: dict, keys: str) -> str:
    """``key=value`` of each comma-separated key: from summary.json, else from the run's saved Hydra config."""
    return ", ".join(_key_value(run_dir, summary, key.strip()) for key in keys.split(","))


def _key_value(run_dir: Path, summary: dict, key: str) -> str:
    if key in summary:
        return f"{key}={summary[key]}"
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.load(config), key, default=None)
        if value is not None:
            return f"{key}={value}"
    raise ValueError(f"--by {key!r}: run {run_dir} has no such key in summary.json or .hydra/config.yaml")


class NoMetricsError(ValueError):
    """A run without a metrics.csv (``logger=none``, or stopped before its first iteration)."""


def load_run(run_dir: Path, by: str, metric: str) -> RunCurve:
    summary = json.loads((run_dir / "summary.json").read_text())
    csv_path = Path(summary.get("metrics_csv") or run_dir / "metrics.csv")
    if not csv_path.is_file():
        raise NoMetricsError(f"run {run_dir} has no metrics.csv (was it run with logger=none?)")
    steps, values = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row.get(metric) not in (None, "") and row.get("rollout/env_steps") not in (None, ""):
                steps.append(float(row["rollout/env_steps"]))
                values.append(float(row[metric]))
    order = np.argsort(steps, kind="stable")
    return RunCurve(run_dir, group_label(run_dir, summary, by), np.asarray(steps)[order], np.asarray(values)[order], summary)


def held_values(curve: RunCurve, grid: np.ndarray) -> np.ndarray:
    """The run's latest value at or before each grid point (NaN before its first evaluation)."""
    index = np.searchsorted(curve.env_steps, grid, side="right") - 1
    return np.where(index >= 0, curve.values[np.maximum(index, 0)], np.nan)


def aggregate(curves: list[RunCurve], num_points: int = 200) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[RunCurve]]]:
    """label -> (grid, mean, std, runs), on a grid from 0 to the longest run's last evaluation."""
    end = max(float(c.env_steps[-1]) for c in curves if len(c.env_steps))
    grid = np.linspace(0.0, end, num_points)
    groups: dict[str, list[RunCurve]] = {}
    for curve in curves:
        groups.setdefault(curve.label, []).append(curve)
    out = {}
    for label in sorted(groups):
        stacked = np.stack([held_values(c, grid) for c in groups[label]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # grid points before a group's first evaluation: NaN
            out[label] = (grid, np.nanmean(stacked, 0), np.nanstd(stacked, 0), groups[label])
    return out


def pyplot():
    """matplotlib's pyplot with the file-only Agg backend, imported when a figure is drawn (not at start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, dpi: int = 120) -> None:
    """Lay out, write ``out`` (creating its folder) and free the figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)


def plot(curves: list[RunCurve], out: Path, metric: str, title: str | None = None) -> dict:
    """Write the figure to ``out``; return the per-group table that ``main`` prints."""
    groups = aggregate(curves)
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    table = {}
    for label, (grid, mean, std, runs) in groups.items():
        line, = ax.plot(grid, mean, label=f"{label} (n={len(runs)})")
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        finals = np.array([c.values[-1] for c in runs if len(c.values)])
        table[label] = {
            "runs": len(runs),
            "final_mean": float(finals.mean()) if finals.size else math.nan,
            "final_std": float(finals.std()) if finals.size else math.nan,
            "solved": sum(bool(c.summary.get("solved")) for c in runs),
        }
    thresholds = {c.summary.get("reward_threshold") for c in curves} - {None}
    if metric == "eval/return_mean" and len(thresholds) == 1:
        ax.axhline(thresholds.pop(), color="grey", linestyle=":", linewidth=1, label="reward threshold")
    envs = sorted({c.summary.get("env_id", "?") for c in curves})
    ax.set_title(title or ", ".join(envs))
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"{metric} (mean ± std over runs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pg_lightning.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs or sweep dirs (searched recursively)")
    parser.add_argument("--by", default="estimator", help="summary.json or config keys (comma-separated) that make the lines")
    parser.add_argument("--metric", default="eval/return_mean",
                        help="a metrics.csv column, plotted against rollout/env_steps (e.g. rollout/return_mean, diag/entropy)")
    parser.add_argument("--out", type=Path, default=Path("learning_curves.png"))
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no run (a directory with summary.json) under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    curves = []
    try:
        for run in runs:
            try:
                curves.append(load_run(run, args.by, args.metric))
            except NoMetricsError as error:  # one run without metrics does not cost the others their figure
                print(f"warning: skipped: {error}", file=sys.stderr)
    except ValueError as error:  # a --by key that a run does not have
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not any(len(c.env_steps) for c in curves):
        print(f"error: no run has values of {args.metric!r} in its metrics.csv", file=sys.stderr)
        return 2
    table = plot(curves, args.out, args.metric, args.title)
    print(f"{'group':40} {'runs':>5} {'final mean':>11} {'std':>8} {'solved':>7}")
    for label, row in table.items():
        print(f"{label:40} {row['runs']:>5} {row['final_mean']:>11.1f} {row['final_std']:>8.1f} {row['solved']:>7}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
