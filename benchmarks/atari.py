"""Atari throughput: how much of the env's own speed training keeps (``env=atari_pong``, the Nature CNN on CPU).

    pip install -e ".[envs]"
    python benchmarks/atari.py --steps 16384        # alone on the machine: it times

Two runs, one after the other, on the same vector env (``env=atari_pong``: ALE's native vectorised Pong, 8 envs,
(4, 84, 84) uint8 frame stacks):

- the reference: the env alone, stepped with random actions for ``--steps`` env steps;
- ours: ``python train.py env=atari_pong total_env_steps=<steps>`` (the config's PPO settings), its env steps per
  second of training (``summary.json``'s wall time less its evaluation).

It prints both rates, their ratio (training / env alone) and the return of the final deterministic episode, and
writes ``benchmarks/results/atari/throughput.json``. Also the bytes of one batch's observations, as stored
(uint8) and as float32 would be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env_alone(steps: int, num_envs: int) -> float:
    """Env steps per second of ALE's vector env under random actions (the reference)."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["env=atari_pong", f"env.num_envs={num_envs}"])
    envs = instantiate(cfg.env).make()
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        envs.step(rng.integers(envs.single_action_space.n, size=num_envs))
    rate = (steps // num_envs) * num_envs / (time.perf_counter() - start)
    envs.close()
    return rate


def train_rate(steps: int, run_dir: Path) -> dict:
    """Our training's env steps per second (evaluation excluded) and its final evaluation."""
    command = [sys.executable, str(REPO / "train.py"), "env=atari_pong", f"total_env_steps={steps}",
               "eval.num_episodes=1", f"eval.every_n_env_steps={10 * steps}", "logger=csv", "stop_on_solve=false",
               "checkpoint.every_n_iterations=1000000", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    training_s = summary["wall_s"] - summary["eval_s"]
    return {"env_steps": summary["env_steps"], "env_steps_per_s": summary["env_steps"] / training_s,
            "eval_return": summary["eval_return_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16_384, help="env steps per run")
    parser.add_argument("--num-envs", type=int, default=8, help="the config's env.num_envs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "atari")
    args = parser.parse_args()
    reference = env_alone(args.steps, args.num_envs)
    ours = train_rate(args.steps, REPO / "outputs" / "atari" / "throughput")
    batch_steps = 128 * args.num_envs  # the config's steps_per_env x env.num_envs
    pixels = (128 + 1) * args.num_envs * 4 * 84 * 84  # obs rows T + 1
    record = {"steps": args.steps, "env_alone_steps_per_s": reference, "training_steps_per_s": ours["env_steps_per_s"],
              "ratio": ours["env_steps_per_s"] / reference, "eval_return": ours["eval_return"],
              "batch_env_steps": batch_steps, "batch_obs_bytes_uint8": pixels, "batch_obs_bytes_float32": 4 * pixels}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(record, indent=1))
    print(f"env alone: {reference:.0f} env steps/s; training: {ours['env_steps_per_s']:.0f} env steps/s; "
          f"ratio {record['ratio']:.3f}; final eval return {ours['eval_return']:.1f}")
    print(f"one batch ({batch_steps} env steps): observations {pixels / 2**20:.1f} MiB as uint8 "
          f"({4 * pixels / 2**20:.1f} MiB as float32)")


if __name__ == "__main__":
    main()
