"""Env steps/s of 2 DDP processes on the CPU (gloo) against 1 process, same per-rank batch, side by side.

    python benchmarks/ddp_throughput.py [--repeats 3] [--total-env-steps 400000]

Each run is ``train.py`` with the default CartPole config (16 envs x 1024 steps per rank and iteration,
default estimator), no evaluation until the end, no solving stop, ``logger=csv``; the figure is the median of
the per-iteration ``perf/steps_per_s`` (env steps of all ranks per wall second, rollout and update included),
first 2 iterations dropped as warm-up. 1-rank and 2-rank runs alternate. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "1 process": [],
    "2 processes (trainer=ddp, gloo)": ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"],
}


def steps_per_second(overrides: list[str], total_env_steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides, "logger=csv", "stop_on_solve=false",
             f"total_env_steps={total_env_steps}", "eval.every_n_iterations=100000", "eval.num_episodes=2",
             f"hydra.run.dir={run_dir}"],
            check=True, capture_output=True,
        )
        with open(Path(run_dir) / "metrics.csv") as f:
            rates = [float(r["perf/steps_per_s"]) for r in csv.DictReader(f) if r.get("perf/steps_per_s") not in (None, "", "nan")]
    return statistics.median(rates[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--total-env-steps", type=int, default=400_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_throughput.json")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, overrides in CONFIGS.items():
            runs[name].append(steps_per_second(overrides, args.total_env_steps))
    reference = statistics.median(runs["1 process"])
    rows = [{"name": name, "steps_per_s": round(statistics.median(r)), "runs": [round(x) for x in r],
             "vs_1_process": round(statistics.median(r) / reference, 3)} for name, r in runs.items()]
    print(f"{'':34} {'env steps/s':>12} {'vs 1 process':>13}")
    for row in rows:
        print(f"{row['name']:34} {row['steps_per_s']:>12,} {row['vs_1_process']:>13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "total_env_steps": args.total_env_steps}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
