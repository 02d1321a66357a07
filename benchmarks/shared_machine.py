"""Runs that share a machine: env steps/s of a training run alone, beside another run, and beside pytest.

    python benchmarks/shared_machine.py [--total-env-steps 150000] [--torch-default]

Each run is ``python train.py logger=none stop_on_solve=false total_env_steps=N`` (CartPole-v1, the default
estimator) in its own process; its rate is env_steps / wall_s from its summary.json. Measured, one after
another:

1. one run alone (the reference; measured again at the end, and the two are averaged);
2. two runs started together: each one's rate / the solo rate;
3. one run started while ``python -m pytest tests/test_training_batches.py`` is running (pytest is stopped
   when the run ends): its rate / the solo rate.

With ``--torch-default`` the pair is also run with ``torch_threads=null`` (torch's default: one thread per
core), which is what the runs did before the ``torch_threads`` key. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.4  # each of two runs keeps at least this share of its solo env steps/s


def start_run(run_dir: Path, total_env_steps: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), "logger=none", "stop_on_solve=false",
               f"total_env_steps={total_env_steps}", f"hydra.run.dir={run_dir}", *extra]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # the config decides
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rate(process: subprocess.Popen, run_dir: Path) -> float:
    _, stderr = process.communicate(timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["env_steps"] / summary["wall_s"]


def together(work: Path, name: str, total_env_steps: int, extra: list[str]) -> list[float]:
    dirs = [work / f"{name}_{i}" for i in range(2)]
    processes = [start_run(d, total_env_steps, extra) for d in dirs]
    return [rate(p, d) for p, d in zip(processes, dirs)]


def beside_pytest(work: Path, total_env_steps: int) -> float | None:
    """The rate of a run started while pytest runs; None (with a note) where pytest is not installed."""
    if importlib.util.find_spec("pytest") is None:
        print('pytest is not installed (pip install -e ".[dev]"): the run beside pytest is skipped', flush=True)
        return None
    # -n 0: one pytest process, as measured before the suite ran on a worker per core (pyproject's addopts).
    tests = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "test_training_batches.py")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(8)  # past pytest's imports and collection: its tests are running
        if tests.poll() is not None:
            raise RuntimeError(f"pytest ended before the training run started:\n{tests.stdout.read()[-2000:]}")
        run_dir = work / "beside_pytest"
        return rate(start_run(run_dir, total_env_steps, []), run_dir)
    finally:
        tests.kill()
        tests.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-env-steps", type=int, default=150_000)
    parser.add_argument("--torch-default", action="store_true", help="also the pair with torch_threads=null")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shared_machine.json")
    args = parser.parse_args()
    n = args.total_env_steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        solo_first = rate(start_run(work / "solo_0", n, []), work / "solo_0")
        pair = together(work, "pair", n, [])
        pytest_side = beside_pytest(work, n)
        pair_default = together(work, "pair_default", n, ["torch_threads=null"]) if args.torch_default else None
        solo_default = rate(start_run(work / "solo_d", n, ["torch_threads=null"]), work / "solo_d") if args.torch_default else None
        solo_last = rate(start_run(work / "solo_1", n, []), work / "solo_1")
    solo = (solo_first + solo_last) / 2
    rows = [{"case": "alone", "torch_threads": 1, "env_steps_per_s": [round(solo_first), round(solo_last)], "vs_solo": 1.0}]
    rows.append({"case": "two started together", "torch_threads": 1, "env_steps_per_s": [round(r) for r in pair],
                 "vs_solo": round(min(pair) / solo, 3)})
    if pytest_side is not None:
        rows.append({"case": "beside pytest", "torch_threads": 1, "env_steps_per_s": [round(pytest_side)],
                     "vs_solo": round(pytest_side / solo, 3)})
    if pair_default is not None:
        rows.append({"case": "alone", "torch_threads": "torch default", "env_steps_per_s": [round(solo_default)],
                     "vs_solo": round(solo_default / solo, 3)})
        rows.append({"case": "two started together", "torch_threads": "torch default",
                     "env_steps_per_s": [round(r) for r in pair_default], "vs_solo": round(min(pair_default) / solo, 3)})
    print(f"CartPole-v1, default config, {n:,} env steps per run, {os.cpu_count()} cores")
    print(f"{'case':24} {'torch threads':>14} {'env steps/s':>22} {'min / solo':>11}")
    for row in rows:
        rates = ", ".join(f"{r:,}" for r in row["env_steps_per_s"])
        print(f"{row['case']:24} {str(row['torch_threads']):>14} {rates:>22} {row['vs_solo']:>11.3f}")
    met = all(row["vs_solo"] >= GOAL for row in rows if row["torch_threads"] == 1)
    print(f"goal: each run keeps >= {GOAL:.0%} of its solo rate with the default threads: {'met' if met else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"total_env_steps": n, "rows": rows, "goal": GOAL, "met": met}, indent=2) + "\n")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
