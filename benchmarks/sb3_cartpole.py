"""Stable-Baselines3 on CartPole-v1 with rl-zoo hyperparameters, stopped at the same solve criterion as ours.

    python benchmarks/sb3_cartpole.py {a2c,ppo} SEED

Every ``EVAL_EVERY`` env steps: 20 deterministic episodes on separate envs; stop when their mean ≥ 475.
Prints one JSON line: algo, seed, solved, env_steps, train_s. Needs the ``bench`` extra
(``pip install -e ".[bench]"``); never imported by pg_lightning itself.
"""

from __future__ import annotations

import json
import sys
import time

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

EVAL_EVERY = 4096
# One torch thread, as pg_lightning's runs use by default (pg_lightning/threads.py): like for like.
torch.set_num_threads(1)
THRESHOLD = 475.0


def linear(start: float):
    return lambda progress_remaining: progress_remaining * start


# rl-baselines3-zoo hyperparams/{a2c,ppo}.yml, CartPole-v1 entries.
ZOO = {
    "a2c": (A2C, dict(ent_coef=0.0), 8, 500_000),
    "ppo": (PPO, dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                      learning_rate=linear(0.001), clip_range=linear(0.2)), 8, 100_000),
}


class SolveCheck(BaseCallback):
    def __init__(self, seed: int):
        super().__init__()
        self.eval_envs = gym.make_vec("CartPole-v1", num_envs=20, vectorization_mode="vector_entry_point")
        self.seed, self.next_eval, self.solved_at = seed, EVAL_EVERY, None

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True
        self.next_eval += EVAL_EVERY
        obs, _ = self.eval_envs.reset(seed=self.seed + 10_000)
        returns, running = np.zeros(20), np.ones(20, dtype=bool)
        while running.any():
            action, _ = self.model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = self.eval_envs.step(action)
            returns += reward * running
            running &= ~(terminated | truncated)
        if returns.mean() >= THRESHOLD:
            self.solved_at = self.num_timesteps
            return False
        return True


def main() -> None:
    algo, seed = sys.argv[1], int(sys.argv[2])
    cls, kwargs, n_envs, budget = ZOO[algo]
    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)
    model = cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **kwargs)
    check = SolveCheck(seed)
    start = time.perf_counter()
    model.learn(total_timesteps=budget, callback=check)
    print(json.dumps({"algo": algo, "seed": seed, "solved": check.solved_at is not None,
                      "env_steps": check.solved_at or model.num_timesteps, "train_s": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
