"""Memory over a long run: resident set size after 100 and after 1,000 iterations must be about equal.

    python benchmarks/memory.py [--iterations 1000] [--num-envs 8] [--steps-per-env 32]

Trains CartPole-v1 with the default estimator for the given iterations (no logger, no evaluation) and
reads the process's RSS from /proc/self/status at checkpoints. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
from lightning.pytorch import Callback

from pg_lightning import PolicyGradientModule, VectorEnvFactory


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class RecordMemory(Callback):
    def __init__(self, at: list[int]):
        self.at, self.rows = set(at), []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.iterations in self.at:
            current, peak = rss_mib()
            self.rows.append({"iteration": pl_module.iterations, "rss_mib": round(current, 1), "peak_rss_mib": round(peak, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--steps-per-env", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    module = PolicyGradientModule(VectorEnvFactory("CartPole-v1", num_envs=args.num_envs), steps_per_env=args.steps_per_env)
    checkpoints = sorted({10, 100, args.iterations // 2, args.iterations})
    recorder = RecordMemory(checkpoints)
    trainer = L.Trainer(max_epochs=args.iterations, accelerator="cpu", logger=False, callbacks=[recorder],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    print(f"{'iteration':>9} {'RSS MiB':>8} {'peak MiB':>9}")
    for row in recorder.rows:
        print(f"{row['iteration']:>9} {row['rss_mib']:>8} {row['peak_rss_mib']:>9}")
    by_iteration = {row["iteration"]: row for row in recorder.rows}
    growth = by_iteration[args.iterations]["peak_rss_mib"] / by_iteration[100]["peak_rss_mib"]
    print(f"peak RSS after {args.iterations} / after 100 iterations: {growth:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": recorder.rows, "peak_growth_1000_vs_100": round(growth, 4)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
