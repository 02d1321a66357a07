"""Whole-process time to solve CartPole-v1: pg_lightning (default and fastest preset) vs SB3 A2C and PPO.

    pip install -e ".[bench]"          # stable-baselines3, for the reference runs
    python benchmarks/time_to_solve.py [--seeds 0 1 2]

Solved = the mean of 20 deterministic evaluation episodes reaches 475 (pg_lightning evaluates every 2
iterations, SB3 every 4096 env steps). Each run is a fresh process timed from start to exit (imports
included); for each seed the commands run one after another, so noise spreads over all of them.
Prints a table (medians over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {
    "pg_lightning default": [],
    "pg_lightning +experiment=fast_cartpole": ["+experiment=fast_cartpole"],
    "pg_lightning +experiment=ppo": ["+experiment=ppo"],
    "pg_lightning +experiment=ppo env.num_envs=8": ["+experiment=ppo", "env.num_envs=8"],
}
SB3 = {"SB3 A2C (rl-zoo)": "a2c", "SB3 PPO (rl-zoo)": "ppo"}


def run_ours(overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides, f"seed={seed}", "logger=none", f"hydra.run.dir={run_dir}"],
            check=True, capture_output=True,
        )
        wall = time.perf_counter() - start
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {"solved": summary["solved"], "env_steps": summary["solved_at_env_steps"] or summary["env_steps"], "wall_s": wall}


def run_sb3(algo: str, seed: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "sb3_cartpole.py"), algo, str(seed)],
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    result = json.loads(out.strip().splitlines()[-1])
    return {"solved": result["solved"], "env_steps": result["env_steps"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_solve.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in [*OURS, *SB3]}
    for seed in args.seeds:
        for name, overrides in OURS.items():
            runs[name].append(run_ours(overrides, seed))
        for name, algo in SB3.items():
            runs[name].append(run_sb3(algo, seed))
        print(f"seed {seed} done", flush=True)
    reference = statistics.median(r["wall_s"] for r in runs["SB3 A2C (rl-zoo)"])
    rows = []
    print(f"{'':40} {'solved':>7} {'median env steps':>17} {'median wall s':>14} {'vs SB3 A2C':>11}")
    for name, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        row = {
            "name": name,
            "solved": sum(r["solved"] for r in results),
            "seeds": len(results),
            "median_env_steps": statistics.median(r["env_steps"] for r in results),
            "median_wall_s": round(wall, 2),
            "wall_vs_sb3_a2c": round(wall / reference, 3),
            "runs": results,
        }
        rows.append(row)
        print(f"{name:40} {row['solved']}/{row['seeds']:<5} {row['median_env_steps']:>17,.0f} {wall:>14.2f} {row['wall_vs_sb3_a2c']:>11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
