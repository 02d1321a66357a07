"""The learned state-value baseline V_φ(s) (lecture §5.2, learned): its settings, network, loss and fit.

V_φ is fitted by regression on the bootstrapped reward-to-go Q̂_t of each batch (the estimator's
``value_targets``), after Ψ was computed with the V_φ of before the batch, so that the baseline does not
depend on the actions it weights. It has its own Adam optimizer; the policy's optimizer never sees φ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from pg_lightning.encoders import image_encoder, is_image_space
from pg_lightning.policies import is_recurrent, mlp
from pg_lightning.validation import positive_int, positive_number, require


@dataclass(frozen=True)
class ValueFunctionConfig:
    """The learned baseline V_φ(s): an MLP fitted by regression on the bootstrapped reward-to-go.

    Args:
        hidden_sizes: MLP hidden layer sizes.
        activation: ``tanh``, ``relu`` or ``elu``.
        lr: Adam learning rate of V_φ (its own optimizer, separate from the policy's).
        steps: full-batch regression steps per iteration (the course homework's ``baseline_gradient_steps``).
        orthogonal_init: hidden layers orthogonal with gain √2, the output layer with gain 1 (PPO's detail).
        minibatch_size: ``None``: every step is on the whole batch; else each step takes the next
            ``minibatch_size`` steps of a shuffled order of the batch (reshuffled when used up), as CleanRL and
            SB3 fit V (far cheaper per step on large batches).
        targets: what V_φ regresses on: ``returns``, the bootstrapped reward-to-go Q̂_t (GAE with λ = 1);
            ``lambda_returns``, the estimator's advantage plus V_φ(s_t), as SB3 and CleanRL fit it.
        shared_step_coef: ``None``: V_φ is fitted after the policy update, ``steps`` steps of its own. A number
            c: V_φ shares the policy's steps instead: each step's loss is the policy's plus c · L_V on the
            same minibatch (one backward, both optimizers step, the gradient norm clipped over both), as
            CleanRL's and SB3's PPO and A2C train (their ``vf_coef``); ``steps`` and ``minibatch_size`` are
            then not used.
    """

    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"
    lr: float = 1e-2
    steps: int = 25
    orthogonal_init: bool = False
    targets: str = "returns"
    minibatch_size: int | None = None
    shared_step_coef: float | None = None

    def __post_init__(self) -> None:
        require("estimator.value.lr", self.lr, positive_number, "a positive number")
        require("estimator.value.steps", self.steps, positive_int, "a positive integer")
        if self.minibatch_size is not None:
            require("estimator.value.minibatch_size", self.minibatch_size, positive_int, "a positive integer or null")
        if self.shared_step_coef is not None:
            require("estimator.value.shared_step_coef", self.shared_step_coef, positive_number, "a positive number or null")
        if self.targets not in ("returns", "lambda_returns"):
            raise ValueError(f"estimator.value.targets must be returns or lambda_returns, got {self.targets!r}")
        if not all(positive_int(size) for size in self.hidden_sizes):
            raise ValueError(f"estimator.value.hidden_sizes must be a list of positive integers, got {list(self.hidden_sizes)}")


class ValueFunction(nn.Module):
    """V_φ: ``inputs [..., input_dim] -> [...]``, an MLP with a scalar output, after ``encoder`` if one is given (a
    CNN of its own for image observations). Its inputs are the observations, or with a recurrent policy that
    policy's features (``recurrent.value_inputs``)."""

    def __init__(self, input_dim: int, config: ValueFunctionConfig = ValueFunctionConfig(),
                 encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()
        width = int(encoder.out_features) if encoder is not None else input_dim
        self.net = mlp(width, list(config.hidden_sizes), 1, config.activation, last_gain=1.0,
                       orthogonal_init=config.orthogonal_init)

    @classmethod
    def for_policy(cls, policy: nn.Module, observation_space: gym.Space, config: ValueFunctionConfig) -> ValueFunction:
        """V_φ for the inputs ``recurrent.value_inputs(policy, batch)`` gives (the one place that decides their
        width): a recurrent policy's features h_t ``[..., feature_size]``; otherwise the observation, through a
        CNN of V_φ's own when it is an image, flattened when it is a vector."""
        if is_recurrent(policy):
            return cls(int(policy.feature_size), config)
        if is_image_space(observation_space):
            encoder = image_encoder(observation_space)
            return cls(encoder.out_features, config, encoder)
        return cls(int(np.prod(observation_space.shape)), config)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(self.encoder(inputs)).squeeze(-1)


def value_optimizer(value_fn: nn.Module, config: ValueFunctionConfig) -> torch.optim.Optimizer:
    """V_φ's own optimizer: Adam with ``config.lr``."""
    return torch.optim.Adam(value_fn.parameters(), lr=config.lr, foreach=True)  # same numbers, faster on CPU


def value_loss(value_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error ½ (V_φ(s_t) - target_t)² over the masked steps; ``inputs [T, B, i]`` (``value_inputs``),
    the rest ``[T, B]``."""
    error = (value_fn(inputs) - targets.detach()) ** 2
    return 0.5 * (error * mask).sum() / mask.sum().clamp(min=1)


def fit_value(
    value_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    values_before: torch.Tensor,
    steps: int,
    step: Callable[[torch.Tensor], bool],
    minibatch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """``steps`` regression steps of V_φ on ``targets``; stops at the first skipped step.

    Args:
        inputs: ``[T, B, i]``, what V_φ reads at the batch's steps (``recurrent.value_inputs`` without the last row).
        targets: ``[T, B]`` the bootstrapped reward-to-go Q̂_t.
        mask: ``[T, B]`` the steps to fit.
        values_before: ``[T, B]`` V_φ(s_t) before the fit, for the explained variance 1 - Var(Q̂ - V) / Var(Q̂).
        step: takes one optimizer step on a loss; False when it was skipped (``update.GuardedStep``).
        minibatch_size: ``None``, full-batch steps; else minibatches of a shuffled order (torch's stream).

    Returns ``loss/value`` (the last step's loss) and ``diag/explained_variance``.
    """
    for part_inputs, part_targets, part_mask in _value_minibatches(inputs, targets, mask, steps, minibatch_size):
        loss = value_loss(value_fn, part_inputs, part_targets, part_mask)
        if not step(loss):
            break
    return {"loss/value": loss.detach(), "diag/explained_variance": explained_variance(targets, values_before, mask)}


def explained_variance(targets: torch.Tensor, values_before: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - V) / Var(target) over the masked steps: 1 when V_φ (before the fit) predicted the
    targets exactly, 0 when it did no better than their mean. ``[T, B]`` inputs. NaN when fewer than two steps
    are masked in: a variance needs two (torch would warn and give NaN)."""
    if int(mask.sum()) < 2:
        return targets.new_tensor(float("nan"))
    residual = (targets - values_before)[mask]
    return 1.0 - residual.var() / targets[mask].var().clamp(min=1e-8)


def _value_minibatches(inputs, targets, mask, steps: int, minibatch_size: int | None):
    """``steps`` (inputs, targets, mask) triples: the whole batch each time, or minibatches of the masked steps."""
    if minibatch_size is None:
        for _ in range(steps):
            yield inputs, targets, mask
        return
    flat_inputs, flat_targets = inputs[mask], targets[mask]
    ones = torch.ones(len(flat_targets), dtype=torch.bool, device=flat_targets.device)
    order, position = torch.randperm(len(flat_targets), device=flat_targets.device), 0
    for _ in range(steps):
        if position + minibatch_size > len(order):  # an epoch is used up: a new order
            order, position = torch.randperm(len(flat_targets), device=flat_targets.device), 0
        index = order[position : position + minibatch_size]
        position += minibatch_size
        yield flat_inputs[index], flat_targets[index], ones[: len(index)]
