"""Deterministic evaluation: run the policy's mode for whole episodes on separate envs."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import nn

from pg_lightning.envs import to_env_action


@torch.no_grad()
def evaluate(policy: nn.Module, envs: VectorEnv, seed: int | None = None, max_steps: int = 100_000) -> np.ndarray:
    """Returns of one deterministic episode per env of ``envs`` (``[num_envs]``, undiscounted).

    The action is the mode of π(·|s) (argmax for a categorical, the mean for a Gaussian). Every env is
    reset at the start, so the episodes are whole; an env that finishes early keeps stepping (its
    autoreset steps are ignored) until all are done.
    """
    device = next(policy.parameters()).device
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(envs.num_envs)
    running = np.ones(envs.num_envs, dtype=bool)
    for _ in range(max_steps):
        action = policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).mode
        obs, reward, terminated, truncated, _ = envs.step(to_env_action(action.cpu().numpy(), envs.single_action_space))
        returns += np.where(running, reward, 0.0)
        running &= ~(terminated | truncated)
        if not running.any():
            return returns
    raise RuntimeError(f"evaluation episodes did not end within {max_steps} steps")
