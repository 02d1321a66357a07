"""Training throughput: env steps per second of whole iterations (rollout + update + Lightning), by batch size.

    python benchmarks/training_throughput.py [--num-envs 64] [--batches 1024 4096 16384 65536] [--iterations 12]

For each batch size (num_envs x T), trains CartPole-v1 with the default estimator for a fixed number of
iterations (no logger, no evaluation; the first two iterations are warm-up and not counted) and compares
with the hand-written rollout loop alone (benchmarks/rollout_throughput.py) on the same envs, measured
right before it in the same process. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
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


def training_steps_per_s(num_envs: int, steps_per_env: int, iterations: int) -> tuple[float, float]:
    """(env steps/s, env steps per iteration) over the iterations after the warm-up.

    The default estimator collects whole episodes, so an iteration takes at least ``num_envs x steps_per_env``
    env steps, more as the episodes grow.
    """
    L.seed_everything(0, verbose=False)
    module = PolicyGradientModule(VectorEnvFactory("CartPole-v1", num_envs=num_envs), steps_per_env=steps_per_env)
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
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    args = parser.parse_args()
    rows = []
    for batch in args.batches:
        steps_per_env = batch // args.num_envs
        torch.manual_seed(0)
        hand = hand_written_loop(make_envs(args.num_envs), CategoricalMLP(4, 2, [64, 64]), steps_per_env * 4)
        ours, per_iteration = training_steps_per_s(args.num_envs, steps_per_env, args.iterations)
        rows.append({"batch": batch, "num_envs": args.num_envs, "steps_per_env": steps_per_env,
                     "env_steps_per_iteration": round(per_iteration),
                     "hand_written_rollout_steps_per_s": round(hand), "training_steps_per_s": round(ours),
                     "ratio": round(ours / hand, 3)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'batch':>7} {'envs x T':>10} {'steps/iteration':>16} {'hand rollout/s':>15} {'training/s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>7} {r['num_envs']:>4} x {r['steps_per_env']:<4} {r['env_steps_per_iteration']:>16,} "
              f"{r['hand_written_rollout_steps_per_s']:>15,} {r['training_steps_per_s']:>11,} {r['ratio']:>6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
