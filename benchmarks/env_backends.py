"""How fast each env backend steps a MuJoCo env, and how much of a training step that is.

    python benchmarks/env_backends.py                       # Hopper-v5, 1 and 2 envs, 20,000 env steps each
    python benchmarks/env_backends.py --env-id HalfCheetah-v5 --steps 50000 --repeats 5

Run it alone on the machine: it is a timing. For each number of envs it steps, in turn and ``--repeats`` times:

- ``sync``: ``env.backend=sync``, the library's default (gymnasium's vector env; one env after another, in this
  process), built by ``VectorEnvFactory`` as training builds it;
- ``async``: ``env.backend=async`` (gymnasium's ``AsyncVectorEnv``, one subprocess per env);
- ``envpool``: EnvPool's C++ vector env (``envpool.make_gymnasium``, one worker thread per env), if ``envpool``
  is installed. It is not a backend of the library: this measures whether it would be worth being one.

Actions are uniform in the action box, drawn before the clock starts, so the figure is the env's cost alone
(episodes end and reset as they do in training). It prints the median env steps/s of each, its ratio to
``sync`` with the same number of envs, and the env's share of a training step: µs per env step of the backend
against µs per env step of ``ppo_mujoco`` training as last timed by ``mujoco.py --throughput`` (its record in
``benchmarks/results/mujoco/``), which is what a faster backend could save at most.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this dir comes first on sys.path, and its mujoco.py would be what ``import mujoco`` finds.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

import argparse  # noqa: E402 - after the sys.path fix above
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from pg_lightning.envs import VectorEnvFactory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT_RECORD = REPO / "benchmarks" / "results" / "mujoco" / "throughput_ppo_mujoco_hopper.json"


def make_envs(backend: str, env_id: str, num_envs: int):
    """A vector env of ``num_envs`` copies with the gymnasium API (reset → (obs, info); step → 5-tuple)."""
    if backend == "envpool":
        import envpool

        return envpool.make_gymnasium(env_id, num_envs=num_envs, num_threads=num_envs, seed=0)
    return VectorEnvFactory(id=env_id, num_envs=num_envs, backend=backend).make()


def steps_per_second(backend: str, env_id: str, num_envs: int, steps: int) -> float:
    """Env steps per second over ``steps`` env steps (``steps // num_envs`` vector steps) of random actions."""
    envs = make_envs(backend, env_id, num_envs)
    try:
        envs.reset() if backend == "envpool" else envs.reset(seed=0)  # EnvPool takes its seed at make
        space = getattr(envs, "single_action_space", envs.action_space)  # one env's box (EnvPool's action_space)
        rng = np.random.default_rng(0)
        actions = rng.uniform(space.low, space.high, size=(steps // num_envs, num_envs, *space.shape))
        actions = actions.astype(space.dtype)
        start = time.perf_counter()
        for action in actions:
            envs.step(action)
        return len(actions) * num_envs / (time.perf_counter() - start)
    finally:
        envs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Hopper-v5")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20_000, help="env steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each backend, taken in turn")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "env_backends.json")
    args = parser.parse_args()

    try:
        import envpool  # noqa: F401 - only whether it is there

        backends = ["sync", "async", "envpool"]
    except ImportError:
        backends = ["sync", "async"]
        print("envpool is not installed (pip install envpool): measuring sync and async only")
    training = json.loads(THROUGHPUT_RECORD.read_text()) if THROUGHPUT_RECORD.exists() else None
    training_us = 1e6 / statistics.median(training["ours_steps_per_s"]) if training else None

    record = {"env_id": args.env_id, "steps": args.steps, "repeats": args.repeats, "runs": {}}
    print(f"{args.env_id}, {args.steps} env steps per run, median of {args.repeats}")
    print("| envs | backend | env steps/s | ratio to sync | µs per env step | share of a ppo_mujoco training step |")
    print("|---:|---|---:|---:|---:|---:|")
    for num_envs in args.num_envs:
        runs = {backend: [] for backend in backends}
        for _ in range(args.repeats):
            for backend in backends:
                runs[backend].append(steps_per_second(backend, args.env_id, num_envs, args.steps))
        sync = statistics.median(runs["sync"])
        for backend in backends:
            median = statistics.median(runs[backend])
            share = f"{1e6 / median / training_us:.1%}" if training_us else "n/a"
            print(f"| {num_envs} | {backend} | {median:.0f} | {median / sync:.2f} | {1e6 / median:.0f} | {share} |")
        record["runs"][str(num_envs)] = runs
    if training_us:
        print(f"ppo_mujoco training: {training_us:.0f} µs per env step ({THROUGHPUT_RECORD.name}, median of "
              f"{training['ours_steps_per_s']})")
    record["training_us_per_env_step"] = training_us
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
