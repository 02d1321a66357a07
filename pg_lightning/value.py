"""The learned state-value baseline V_φ(s) and its regression step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from pg_lightning.estimators import ValueFunctionConfig
from pg_lightning.policies import mlp


class ValueFunction(nn.Module):
    """V_φ: ``obs [..., obs_dim] -> [...]``, an MLP with a scalar output."""

    def __init__(self, obs_dim: int, config: ValueFunctionConfig = ValueFunctionConfig()):
        super().__init__()
        self.net = mlp(obs_dim, list(config.hidden_sizes), 1, config.activation, last_gain=1.0)

    @classmethod
    def for_space(cls, observation_space: gym.Space, config: ValueFunctionConfig) -> ValueFunction:
        return cls(int(np.prod(observation_space.shape)), config)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


def value_loss(value_fn: nn.Module, obs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error ½ (V_φ(s_t) - target_t)² over the masked steps; ``obs [T, B, o]``, the rest ``[T, B]``."""
    error = (value_fn(obs) - targets.detach()) ** 2
    return 0.5 * (error * mask).sum() / mask.sum().clamp(min=1)
