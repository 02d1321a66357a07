"""The performance targets, measured in one run, side by side.

    pip install torch==2.13.0 -e ".[bench]"   # stable-baselines3, for the time-to-solve reference
    python benchmarks/targets.py [--seeds 0 1 2] [--repeats 11]

Runs the benchmark scripts one after another (never two at once: on 2 cores two torch processes slow each
other many times over), each in its own process, reads the JSON each writes to ``benchmarks/results/``
and prints one line per target: the measured figure, the target and whether it is met. Writes
``benchmarks/results/targets.json``. Exit status 1 if a target is missed. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> dict | list:
    """Run ``benchmarks/<script>`` with ``args`` (its table goes to our stdout) and return the JSON it wrote.

    A script may exit 1 for a missed goal of its own; only a script that wrote no JSON is an error here.
    """
    out = RESULTS / f"targets_{Path(script).stem}.json"
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(HERE / script), *args, "--out", str(out)], check=False)
    if not out.exists():
        raise RuntimeError(f"benchmarks/{script} failed before writing {out}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--repeats", default="11", help="alternating runs per side of the rollout comparison")
    args = parser.parse_args()

    rollout = run("rollout_throughput.py", "--envs", "1024", "--repeats", args.repeats)["rows"][0]
    training = run("training_throughput.py", "--batches", "16384")[0]
    solve = {row["name"]: row for row in run("time_to_solve.py", "--seeds", *args.seeds)}
    memory = run("memory.py", "--iterations", "1000")
    shared = run("shared_machine.py")
    pair = next(row for row in shared["rows"] if row["case"] == "two started together")

    # Our fastest preset among those that solved every seed.
    ours = [row for name, row in solve.items() if name.startswith("pg_lightning") and row["solved"] == row["seeds"]]
    fastest = min(ours, key=lambda row: row["median_wall_s"])
    a2c = solve["SB3 A2C (rl-zoo)"]
    targets = [
        ("rollout collection / hand-written loop, 1024 envs", rollout["ratio"], ">=", 0.9),
        ("training steps/s / hand-written rollout, 16k batch", training["ratio"], ">=", 0.5),
        (f"time to solve, {fastest['name']} / SB3 A2C", fastest["wall_vs_sb3_a2c"], "<=", 1.0),
        ("peak RSS after 1000 / after 100 iterations", memory["peak_growth_1000_vs_100"], "<=", 1.05),
        ("two runs started together: slower one / solo env steps/s", pair["vs_solo"], ">=", 0.4),
    ]
    print(f"\n{'target':62} {'measured':>9} {'goal':>8}  met")
    report = []
    for name, value, op, goal in targets:
        met = value >= goal if op == ">=" else value <= goal
        report.append({"target": name, "measured": value, "goal": f"{op} {goal}", "met": met})
        print(f"{name:62} {value:>9.3f} {op:>3} {goal:<4}  {'yes' if met else 'NO'}")
    print(f"(time to solve: {fastest['name']} median {fastest['median_wall_s']} s, "
          f"SB3 A2C {a2c['median_wall_s']} s; solved {fastest['solved']}/{fastest['seeds']} "
          f"and {a2c['solved']}/{a2c['seeds']})")
    (RESULTS / "targets.json").write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(row["met"] for row in report) else 1)


if __name__ == "__main__":
    main()
