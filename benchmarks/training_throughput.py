"""Training throughput: env steps per second of whole iterations (rollout + update + Lightning), by batch size.

    python benchmarks/training_throughput.py [--num-envs 64] [--batches 1024 4096 16384 65536] [--iterations 12]

For each batch size (num_envs x T), trains CartPole-v1 with the default estimator for a fixed number of
iterations (no logger, no evaluation; the first two iterations are warm-up and not counted) and compares
with the hand-written rollout loop alone (benchmarks/rollout_throughput.py) on the same envs, measured
right before it in the same process; ``--repeats`` alternating pairs, medians compared. Prints a table and
writes JSON.

The default estimator collects whole episodes, so an iteration is at least num_envs x T env steps and grows as
the policy learns to balance (the table prints the mean). ``--episode-cap`` caps episodes at T steps (the
env's time limit), so that iterations stay near num_envs x T: the way to measure 1k-step iterations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback

from pg_lightning import CategoricalMLP, PolicyGradientModule, VectorEnvFactory
from pg_lightning.threads import DEFAULT_TORCH_THREADS
from rollout_throughput import hand_written_loop, make_envs

WARMUP = 2
# The hand loop with the threads the training run sets for itself (pg_lightning/threads.py).
torch.set_num_threads(DEFAULT_TORCH_THREADS)


class IterationTimer(Callback):
    def __init__(self):
        self.stamps: list[tuple[float, int]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stamps.append((time.perf_counter(), pl_module.env_steps))


def training_steps_per_s(
    num_envs: int, steps_per_env: int, iterations: int, max_episode_steps: int | None = None
) -> tuple[float, float]:
    """(env steps/s, env steps per iteration) over the iterations after the warm-up.

    The default estimator collects whole episodes, so an iteration takes at least ``num_envs x steps_per_env``
    env steps, more as the episodes grow.
    """
    L.seed_everything(0, verbose=False)
    env = VectorEnvFactory("CartPole-v1", num_envs=num_envs, max_episode_steps=max_episode_steps)
    module = PolicyGradientModule(env, steps_per_env=steps_per_env)
    timer = IterationTimer()
    trainer = L.Trainer(max_epochs=iterations, accelerator="cpu", logger=False, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    (t0, steps0), (t1, steps1) = timer.stamps[WARMUP - 1], timer.stamps[-1]
    return (steps1 - steps0) / (t1 - t0), (steps1 - steps0) / (len(timer.stamps) - WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--iterations", type=int, default=12, help="at least; small batches run 100k steps' worth")
    parser.add_argument("--episode-cap", action="store_true",
                        help="cap episodes at T steps, so that a whole-episode iteration is about num_envs x T steps")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (hand loop, training) pairs; medians")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    args = parser.parse_args()
    rows = []
    for batch in args.batches:
        steps_per_env = batch // args.num_envs
        cap = steps_per_env if args.episode_cap else None
        iterations = max(args.iterations, WARMUP + 100_000 // batch)
        hand, ours = [], []
        for _ in range(args.repeats):  # alternating, so that the shared machine's noise hits both alike
            torch.manual_seed(0)
            hand.append(hand_written_loop(make_envs(args.num_envs), CategoricalMLP(4, 2, [64, 64]),
                                          max(steps_per_env * 4, 131_072 // args.num_envs)))
            steps_per_s, per_iteration = training_steps_per_s(args.num_envs, steps_per_env, iterations, cap)
            ours.append(steps_per_s)
        hand_median, ours_median = statistics.median(hand), statistics.median(ours)
        rows.append({"batch": batch, "num_envs": args.num_envs, "steps_per_env": steps_per_env, "episode_cap": cap,
                     "env_steps_per_iteration": round(per_iteration), "repeats": args.repeats,
                     "hand_written_rollout_steps_per_s": round(hand_median), "training_steps_per_s": round(ours_median),
                     "ratio": round(ours_median / hand_median, 3)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'batch':>7} {'envs x T':>10} {'steps/iteration':>16} {'hand rollout/s':>15} {'training/s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>7} {r['num_envs']:>4} x {r['steps_per_env']:<4} {r['env_steps_per_iteration']:>16,} "
              f"{r['hand_written_rollout_steps_per_s']:>15,} {r['training_steps_per_s']:>11,} {r['ratio']:>6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
