"""Masked CartPole (velocities hidden): env steps until the deterministic policy solves it, ours and sb3-contrib.

    pip install -e ".[bench]"
    python benchmarks/recurrent.py --ours gru mlp --seeds 0 1 2     # python train.py env=masked_cartpole policy=P
    python benchmarks/recurrent.py --sb3 --seeds 0 1 2              # sb3-contrib RecurrentPPO, RL Zoo settings
    python benchmarks/recurrent.py --aggregate-only

Both sides are scored the same way: every ``--eval-every`` env steps, the mean return of 20 deterministic
episodes (the policy's mode, with its state) on separate envs; a run is solved at the first evaluation with a
mean ≥ 475 (CartPole-v1's threshold) and its score is the env steps taken by then (the budget if never).

Ours: ``python train.py env=masked_cartpole policy=<P> seed=<S> total_env_steps=<budget>`` with
``eval.every_n_env_steps`` set to the same cadence, everything else as shipped.

SB3's side: ``RecurrentPPO("MlpLstmPolicy")`` with rl-baselines3-zoo's hyperparameters for CartPoleNoVel-v1
(8 envs x 32 steps, 20 epochs of one 256-step minibatch, lr and clip range 1e-3 and 0.2 decayed linearly to 0,
γ 0.98, GAE λ 0.8, no entropy bonus, an LSTM of 64 for the actor and another for the critic, ReLU layers of 64,
no orthogonal init, VecNormalize on observations only, 100k steps in the zoo). The observations are CartPole-v1's
with the velocities dropped, as ``env=masked_cartpole`` does (the zoo's CartPoleNoVel env is the same task).

Each run is its own process and writes ``<out>/<method>/seed<k>.json``; the table gives the interquartile mean
over seeds with a 95% stratified-bootstrap interval (``rliable``). Returns do not depend on speed, so runs may
share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
THRESHOLD, EVAL_EPISODES = 475.0, 20


def run_ours(policy: str, seed: int, budget: int, every: int) -> dict:
    run_dir = REPO / "outputs" / "recurrent" / policy / f"seed{seed}"
    command = [sys.executable, str(REPO / "train.py"), "env=masked_cartpole", f"policy={policy}", f"seed={seed}",
               f"total_env_steps={budget}", f"eval.every_n_env_steps={every}", f"eval.num_episodes={EVAL_EPISODES}",
               "logger=csv", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    solved_at = summary["solved_at_env_steps"]
    return {"method": f"ours_{policy}", "seed": seed, "solved": solved_at is not None,
            "env_steps_to_solve": solved_at if solved_at is not None else summary["env_steps"],
            "final_eval": summary["eval_return_mean"], "env_steps": summary["env_steps"], "wall_s": summary["wall_s"]}


def run_sb3(seed: int, budget: int, every: int) -> dict:
    """RecurrentPPO with the zoo's CartPoleNoVel-v1 settings, evaluated every ``every`` env steps."""
    import gymnasium as gym
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)

    def masked():
        env = gym.make("CartPole-v1")
        low, high = env.observation_space.low[[0, 2]], env.observation_space.high[[0, 2]]
        return gym.wrappers.TransformObservation(env, lambda obs: obs[[0, 2]], gym.spaces.Box(low, high))

    def linear(start: float):
        return lambda remaining: remaining * start  # SB3 passes the fraction of training left

    venv = VecNormalize(DummyVecEnv([masked] * 8), norm_obs=True, norm_reward=False, gamma=0.98)
    model = RecurrentPPO(
        "MlpLstmPolicy", venv, n_steps=32, batch_size=256, n_epochs=20, learning_rate=linear(1e-3),
        clip_range=linear(0.2), gamma=0.98, gae_lambda=0.8, ent_coef=0.0, seed=seed, device="cpu", verbose=0,
        policy_kwargs=dict(ortho_init=False, activation_fn=torch.nn.ReLU, lstm_hidden_size=64,
                           enable_critic_lstm=True, net_arch=dict(pi=[64], vf=[64])),
    )
    eval_env = VecNormalize(DummyVecEnv([masked] * EVAL_EPISODES), norm_obs=True, norm_reward=False, training=False)

    def evaluate(eval_seed: int) -> float:
        eval_env.obs_rms = venv.obs_rms  # the training statistics, frozen
        eval_env.seed(eval_seed)
        obs, state = eval_env.reset(), None
        starts = np.ones(EVAL_EPISODES, dtype=bool)
        returns, running = np.zeros(EVAL_EPISODES), np.ones(EVAL_EPISODES, dtype=bool)
        while running.any():
            action, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
            obs, reward, done, _ = eval_env.step(action)
            returns += np.where(running, reward, 0.0)
            running &= ~done
            starts = done
        return float(returns.mean())

    record = {"method": "sb3_recurrent_ppo", "seed": seed, "solved": False, "env_steps_to_solve": budget,
              "final_eval": float("nan")}

    class Scheduled(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next_eval = every

        def _on_step(self) -> bool:
            if self.num_timesteps < self.next_eval:
                return True
            self.next_eval += every
            record["final_eval"] = evaluate(10_000 + seed)
            if record["final_eval"] >= THRESHOLD:
                record.update(solved=True, env_steps_to_solve=int(self.num_timesteps))
                return False  # solved: stop, as ours does (stop_on_solve)
            return True

    model.learn(total_timesteps=budget, callback=Scheduled())
    record["env_steps"] = int(model.num_timesteps)
    return record


def aggregate(out: Path) -> list[str]:
    from rliable import library as rly
    from rliable import metrics

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*.json"))]
    lines = ["| method | seeds solved | env steps to solve, IQM [95% CI] | per seed | final eval, mean |",
             "|---|---:|---|---|---:|"]
    for method in sorted({r["method"] for r in runs}):
        chosen = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        scores = np.array([[r["env_steps_to_solve"]] for r in chosen], dtype=float)
        point, interval = rly.get_interval_estimates({method: scores}, lambda x: np.array([metrics.aggregate_iqm(x)]),
                                                     reps=2000)
        low, high = interval[method][:, 0]
        per_seed = ", ".join(f"{r['env_steps_to_solve'] / 1000:.0f}k{'' if r['solved'] else ' (not solved)'}" for r in chosen)
        lines.append(f"| {method} | {sum(r['solved'] for r in chosen)}/{len(chosen)} | {point[method][0] / 1000:.0f}k "
                     f"[{low / 1000:.0f}k, {high / 1000:.0f}k] | {per_seed} | "
                     f"{np.mean([r['final_eval'] for r in chosen]):.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", nargs="*", default=[], choices=["gru", "lstm", "mlp"], help="our policies to run")
    parser.add_argument("--sb3", action="store_true", help="run sb3-contrib's RecurrentPPO")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=500_000, help="env steps per run at most")
    parser.add_argument("--eval-every", type=int, default=16_384, help="env steps between evaluations")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recurrent")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--sb3-run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sb3_run is not None:
        print(json.dumps(run_sb3(args.sb3_run, args.budget, args.eval_every)))
        return 0
    if not args.aggregate_only:
        for seed in args.seeds:
            for policy in args.ours:
                write(args.out / f"ours_{policy}" / f"seed{seed}.json", run_ours(policy, seed, args.budget, args.eval_every))
            if args.sb3:
                result = subprocess.run([sys.executable, __file__, "--sb3-run", str(seed), "--budget", str(args.budget),
                                         "--eval-every", str(args.eval_every)], capture_output=True, text=True, check=True)
                write(args.out / "sb3_recurrent_ppo" / f"seed{seed}.json", json.loads(result.stdout.splitlines()[-1]))
    print("\n".join(aggregate(args.out)))
    return 0


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
