"""Rollout throughput: pg_lightning's RolloutCollector vs a minimal hand-written loop, side by side.

Both step CartPole-v1's native vector env with the same 64x64 tanh categorical MLP, sampling actions
under torch.no_grad(), for the same number of steps; runs alternate (hand, ours, hand, ours, ...) in one
process and the median of each is compared, so machine noise hits both alike.

    python benchmarks/rollout_throughput.py [--envs 64 1024 8192] [--repeats 5] [--out results/rollout.json]

Prints a table and writes JSON. The ratio is ours / hand-written (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import gymnasium as gym
import torch

from pg_lightning import CategoricalMLP, RolloutCollector
from pg_lightning.threads import DEFAULT_TORCH_THREADS

# Both loops with the threads a training run uses (pg_lightning/threads.py).
torch.set_num_threads(DEFAULT_TORCH_THREADS)

STEPS_PER_MEASUREMENT = 262_144  # env steps per timed run (T = this / num_envs)


def make_envs(num_envs: int) -> gym.vector.VectorEnv:
    return gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")


@torch.no_grad()
def hand_written_loop(envs: gym.vector.VectorEnv, policy: torch.nn.Module, num_steps: int) -> float:
    """The reference: observe, sample, step. Returns env steps per second."""
    obs, _ = envs.reset(seed=0)
    start = time.perf_counter()
    for _ in range(num_steps):
        action = policy(torch.as_tensor(obs)).sample()
        obs, *_ = envs.step(action.numpy())
    return num_steps * envs.num_envs / (time.perf_counter() - start)


def library_rollout(envs: gym.vector.VectorEnv, policy: torch.nn.Module, num_steps: int) -> float:
    """pg_lightning's collector for one batch of the same size. Returns env steps per second."""
    collector = RolloutCollector(envs, steps_per_env=num_steps, seed=0)
    start = time.perf_counter()
    collector.collect(policy)
    return num_steps * envs.num_envs / (time.perf_counter() - start)


def measure(num_envs: int, repeats: int) -> dict:
    torch.manual_seed(0)
    policy = CategoricalMLP(4, 2, [64, 64])
    num_steps = max(STEPS_PER_MEASUREMENT // num_envs, 16)
    hand, ours = [], []
    for _ in range(repeats):
        hand.append(hand_written_loop(make_envs(num_envs), policy, num_steps))
        ours.append(library_rollout(make_envs(num_envs), policy, num_steps))
    hand_median, ours_median = statistics.median(hand), statistics.median(ours)
    return {
        "num_envs": num_envs,
        "steps_per_env": num_steps,
        "hand_written_steps_per_s": round(hand_median),
        "pg_lightning_steps_per_s": round(ours_median),
        "ratio": round(ours_median / hand_median, 3),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=DEFAULT_TORCH_THREADS, help="both loops use these")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    rows = [measure(n, args.repeats) for n in args.envs]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'envs':>6} {'T':>6} {'hand-written/s':>15} {'pg_lightning/s':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['num_envs']:>6} {r['steps_per_env']:>6} {r['hand_written_steps_per_s']:>15,} "
              f"{r['pg_lightning_steps_per_s']:>15,} {r['ratio']:>6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
