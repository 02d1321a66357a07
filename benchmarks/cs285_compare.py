"""pg_lightning's ``cs285_cartpole`` sweep next to the plain peer loop (``cs285_peer.py``), configuration by configuration.

    python train.py -m +experiment=cs285_cartpole estimator=reinforce,reward_to_go \\
        estimator.normalize=false,true steps_per_env=2000,500 seed=0,1,2,3,4 logger=csv hydra.sweep.dir=SWEEP
    python benchmarks/cs285_peer.py --estimator reinforce --batch-size 4000 --seeds 0 1 2 3 4 --out PEER/...json
    python benchmarks/cs285_compare.py SWEEP [SWEEP ...] --peer PEER/*.json

For each configuration (estimator, normalised or not, batch ≥ 1000 or ≥ 4000 steps) it prints, over seeds, the
final deterministic eval (20 episodes) as mean ± standard error and as the interquartile mean with a 95%
percentile-bootstrap interval (rliable's IQM: the mean of the middle 50% of seeds; 2,000 resamples of seeds),
for pg_lightning and for the peer, and the difference of the means in standard errors of the difference
(√(SE₁² + SE₂²)). "used" is the share of pg_lightning's env steps that its whole-episode batches used
(the rest are steps of envs waiting for the others). Writes ``benchmarks/results/cs285_compare.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

RESAMPLES = 2_000


def interquartile_mean(values: np.ndarray) -> float:
    """rliable's IQM, scipy's ``trim_mean(values, 0.25)``: sort, drop ⌊n/4⌋ values at each end, average the rest."""
    values = np.sort(np.asarray(values, dtype=float))
    cut = len(values) // 4
    return float(values[cut : len(values) - cut].mean())


def iqm_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """IQM and its 95% percentile-bootstrap interval over seeds."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=float)
    boot = [interquartile_mean(rng.choice(values, len(values))) for _ in range(RESAMPLES)]
    return interquartile_mean(values), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def sweep_runs(sweep: Path) -> dict[tuple, dict]:
    """(estimator, normalize, batch) -> {"eval": [...], "used": [...]} from a Hydra multirun dir."""
    runs: dict[tuple, dict] = defaultdict(lambda: {"eval": [], "used": [], "seeds": []})
    for summary_path in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        cfg = yaml.safe_load((summary_path.parent / ".hydra" / "config.yaml").read_text())
        key = (cfg["estimator"]["name"], bool(cfg["estimator"]["normalize"]), cfg["steps_per_env"] * cfg["env"]["num_envs"])
        with open(summary_path.parent / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("rollout/used_fraction")]
        steps = np.array([float(r["rollout/env_steps"]) for r in rows])
        taken = np.diff(np.concatenate([[0.0], steps]))
        used = np.array([float(r["rollout/used_fraction"]) for r in rows])
        runs[key]["eval"].append(summary["eval_return_mean"])
        runs[key]["used"].append(float((used * taken).sum() / taken.sum()))
        runs[key]["seeds"].append(cfg["seed"])
    return runs


def peer_runs(paths: list[Path]) -> dict[tuple, dict]:
    runs = {}
    for path in paths:
        data = json.loads(path.read_text())
        s = data["settings"]
        if s.get("baseline", "none") != "none" or s.get("optimizer", "adam") != "adam" or s["lr"] != 0.005 or s["gamma"] != 1.0:
            continue  # only the homework's settings are compared
        key = (s["estimator"], bool(s["normalize"]), s["batch_size"])
        runs[key] = {"eval": [v["final_eval"] for v in data["seeds"].values()], "seeds": [int(k) for k in data["seeds"]]}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="Hydra multirun dirs (their runs are pooled)")
    parser.add_argument("--peer", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cs285_compare.json")
    args = parser.parse_args()
    ours, peer = defaultdict(lambda: {"eval": [], "used": [], "seeds": []}), peer_runs(args.peer)
    for sweep in args.sweeps:
        for key, runs in sweep_runs(sweep).items():
            for field in ("eval", "used", "seeds"):
                ours[key][field] += runs[field]
    report = []
    print(f"{'configuration':34} {'pg_lightning mean±SE':>21} {'IQM [95% CI]':>21} {'used':>5}   "
          f"{'peer mean±SE':>14} {'IQM [95% CI]':>21}  {'diff/SE':>7}")
    for key in sorted(ours, key=lambda k: (k[2], k[0], k[1])):
        name, normalize, batch = key
        label = f"{name}{' + normalise' if normalize else ''}, batch {batch}"
        m, se = mean_se(ours[key]["eval"])
        iqm = iqm_interval(ours[key]["eval"])
        row = {"estimator": name, "normalize": normalize, "batch": batch, "seeds": ours[key]["seeds"],
               "final_eval": ours[key]["eval"], "mean": m, "se": se, "iqm": iqm,
               "used_fraction": float(np.mean(ours[key]["used"]))}
        line = f"{label:34} {m:>10.1f} ± {se:<8.1f} {iqm[0]:>6.1f} [{iqm[1]:.0f}, {iqm[2]:.0f}]".ljust(79)
        line += f" {row['used_fraction']:>5.2f}"
        if key in peer:
            pm, pse = mean_se(peer[key]["eval"])
            piqm = iqm_interval(peer[key]["eval"])
            se_diff = math.sqrt(se**2 + pse**2)
            z = (m - pm) / se_diff if se_diff > 0 else (0.0 if m == pm else math.inf)
            row.update(peer_final_eval=peer[key]["eval"], peer_mean=pm, peer_se=pse, peer_iqm=piqm, diff_in_se=z)
            line += f"   {pm:>6.1f} ± {pse:<5.1f} {piqm[0]:>6.1f} [{piqm[1]:.0f}, {piqm[2]:.0f}]".ljust(40) + f" {z:>+7.2f}"
        print(line)
        report.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
