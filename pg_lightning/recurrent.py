"""Policies with memory (lecture §3.3): π(a_t | o_1, ..., o_t) through a hidden state h_t = f_θ(h_{t-1}, o_t).

In a partially observed task the observations o_t take the place of the states s_t and the policy gradient is
unchanged (§3.3): ∇J = E[Σ_t ∇ log π_θ(a_t | h_t) Ψ_t], where h_t, a function of the whole history, now depends
on θ too, so the score ∇ log π(a_t | h_t) is taken through every earlier step of the episode (backpropagation
through time).

The contract a recurrent policy keeps, beside the memoryless ``policy(obs) -> Distribution``:

- ``recurrent = True``;
- ``initial_state(batch_size) -> [B, S]``: the state before an episode's first observation (zeros here);
- ``step(obs [B, o], state [B, S]) -> (Distribution [B], state [B, S])``: one env step (rollout, evaluation);
- ``forward(obs [T, B, o], state [B, S], first [T, B] bool) -> Distribution [T, B]``: a batch's steps from the
  state before its first step, the state reset to ``initial_state`` before every step that begins an
  episode (``first``). The rollout applies the same resets, so training replays exactly what acted;
- ``features(obs, state, first) -> [T, B, F]`` with ``feature_size`` = F: what V_φ reads at each step.

``action_distribution(policy, batch)`` is the one place training asks for π(·|·) of a batch's steps, and
``value_inputs(policy, batch)`` the one place V_φ's inputs are made.

V_φ with memory. A baseline may depend on anything but the action it weights (§5), so in a POMDP it may
depend on the whole history o_1..o_t, and it must, to be a good one: the expected return after a blank
observation depends on what came before it. Here V_φ is an MLP on the policy's own state, detached:

    V_φ(h_t),   h_t = f_θ(h_{t-1}, enc_θ(o_t))   (no gradient into θ from V_φ's regression)

rather than a second recurrent network. The policy's state already summarises the history, it is carried,
stored and checkpointed once; a recurrent V_φ would need its own state carried through rollouts, batches and
checkpoints beside it. Detaching keeps the policy's update the policy gradient alone (CleanRL's LSTM PPO
instead lets the value loss shape the shared cell). Since h_t moves with θ, V_φ's inputs are made again from
the current policy whenever V_φ is evaluated or fitted.

Where a batch starts mid-episode (value estimators cut episodes), its stored first state is a constant of the
loss: the steps before the batch are not differentiated again (truncated backpropagation through time, as in
sb3-contrib's RecurrentPPO and CleanRL's LSTM PPO). Whole-episode batches (the estimators without V_φ) start
every episode inside the batch, so their gradient is the exact score of §3.3.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from pg_lightning.batch import RolloutBatch
from pg_lightning.encoders import image_encoder, is_image_space
from pg_lightning.envs import check_action_space, require_flat_observations
from pg_lightning.distributions import DISCRETE_SPACES, logits_distribution, logits_size, mask_actions
from pg_lightning.policies import ACTIVATIONS, LOG_STD_MAX, LOG_STD_MIN, is_recurrent
from pg_lightning.validation import positive_int, require

CELLS = ("gru", "lstm")


class RecurrentPolicy(nn.Module):
    """An MLP encoder, a GRU or LSTM cell, and a categorical (``distributions.py``: also multi-discrete and
    multi-binary) or diagonal-Gaussian head.

        x_t = enc(o_t),   h_t = cell(x_t, h_{t-1}),   π(·|h_t) = Categorical(W h_t) or N(W h_t, diag σ²)

    Shapes: ``step``: ``obs [B, obs_dim]``, ``state [B, S]``; ``forward`` and ``features``: ``obs [T, B, obs_dim]``,
    ``first [T, B]``; S = ``hidden_size`` for a GRU, 2 · ``hidden_size`` for an LSTM (h and c side by side,
    one tensor so the rollout, the batch and the checkpoint hold one state); the features are h_t,
    ``[T, B, hidden_size]``. The encoder is an MLP of ``encoder_sizes`` on ``obs_dim`` inputs, or the ``encoder``
    given in its place (``obs_dim`` None; a module with ``out_features``, e.g. a CNN of ``encoders.py``).
    """

    recurrent = True

    def __init__(
        self,
        obs_dim: int | None,
        action_space: gym.Space,
        cell: str = "gru",
        hidden_size: int = 64,
        encoder_sizes: Sequence[int] = (64,),
        activation: str = "tanh",
        log_std_init: float = -0.5,
        orthogonal_init: bool = False,
        encoder: nn.Module | None = None,
    ):
        require("policy.cell", cell, lambda value: value in CELLS, "gru or lstm")
        require("policy.hidden_size", hidden_size, positive_int, "a positive integer")
        super().__init__()
        if (encoder is None) == (obs_dim is None):
            raise ValueError(f"RecurrentPolicy takes obs_dim (for its MLP encoder) or an encoder, not both nor "
                             f"neither: obs_dim={obs_dim}, encoder={type(encoder).__name__}")
        if encoder is not None:  # e.g. a CNN (encoders.py) with ``out_features``; encoder_sizes do not apply
            self.encoder, width = encoder, int(encoder.out_features)
        else:
            layers: list[nn.Module] = []
            width = obs_dim
            for size in encoder_sizes:
                layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
                width = size
            self.encoder = nn.Sequential(*layers)
        self.cell_type = cell
        self.cell = nn.GRUCell(width, hidden_size) if cell == "gru" else nn.LSTMCell(width, hidden_size)
        self.hidden_size = hidden_size
        self.feature_size = hidden_size  # h_t
        self.state_size = hidden_size * (2 if cell == "lstm" else 1)
        self.action_space = action_space
        self.discrete = isinstance(action_space, DISCRETE_SPACES)
        out = logits_size(action_space) if self.discrete else int(np.prod(action_space.shape))
        self.head = nn.Linear(hidden_size, out)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((out,), float(log_std_init)))
        if orthogonal_init and encoder is None:  # PPO's detail: hidden layers gain √2, the head 0.01
            for layer in self.encoder:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, gain=np.sqrt(2))
                    nn.init.zeros_(layer.bias)
        nn.init.orthogonal_(self.head.weight, gain=0.01)
        nn.init.zeros_(self.head.bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """``[B, S]`` zeros on the parameters' device: the state before an episode begins."""
        return self.head.weight.new_zeros(batch_size, self.state_size)

    def step(self, obs: torch.Tensor, state: torch.Tensor) -> tuple[Distribution, torch.Tensor]:
        """π(·|h_t) and h_t for one step of B envs, from ``obs [B, o]`` and ``state`` = h_{t-1} ``[B, S]``."""
        hidden, state = self._cell(self.encoder(obs), state)
        return self._distribution(hidden), state

    def forward(self, obs: torch.Tensor, state: torch.Tensor, first: torch.Tensor) -> Distribution:
        """π(·|h_t) for every step of ``obs [T, B, o]`` from ``state`` ``[B, S]``, reset where ``first [T, B]``."""
        return self._distribution(self._unroll(obs, state, first)[1])

    def features(self, obs: torch.Tensor, state: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """h_t ``[T, B, hidden_size]`` (V_φ's inputs) for the steps ``forward`` takes."""
        return self._unroll(obs, state, first)[1]

    def _unroll(self, obs, state, first) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and h_t, ``[T, B, ·]`` each: the cell over ``obs [T, B, o]`` from ``state`` ``[B, S]``, the state
        reset to the initial one where ``first [T, B]``."""
        encoded = self.encoder(obs)  # all steps at once: only the cell runs step by step
        initial = self.initial_state(obs.shape[1])
        hidden = []
        for t in range(obs.shape[0]):
            state = torch.where(first[t].unsqueeze(-1), initial, state)
            h, state = self._cell(encoded[t], state)
            hidden.append(h)
        return encoded, torch.stack(hidden)

    def _cell(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's input h_t, the next state) from x_t and the state."""
        if self.cell_type == "gru":
            h = self.cell(x, state)
            return h, h
        h, c = self.cell(x, tuple(state.chunk(2, dim=-1)))
        return h, torch.cat([h, c], dim=-1)

    def _distribution(self, hidden: torch.Tensor) -> Distribution:
        out = self.head(hidden)
        if self.discrete:
            return logits_distribution(self.action_space, out)
        std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp().expand_as(out)
        return Independent(Normal(out, std, validate_args=False), 1, validate_args=False)


def recurrent_policy(
    observation_space: gym.Space,
    action_space: gym.Space,
    cell: str = "gru",
    hidden_size: int = 64,
    encoder_sizes: Sequence[int] = (64,),
    activation: str = "tanh",
    log_std_init: float = -0.5,
    orthogonal_init: bool = False,
) -> RecurrentPolicy:
    """The shipped recurrent policy (``policy=gru``, ``policy=lstm``): an MLP encoder for a flat Box observation
    space, a CNN (``encoders.image_encoder``) for images; the heads of ``distributions.py`` or a Gaussian."""
    check_action_space(action_space)
    if is_image_space(observation_space):
        encoder = image_encoder(observation_space)
        return RecurrentPolicy(None, action_space, cell, hidden_size, (), activation, log_std_init,
                               orthogonal_init, encoder=encoder)
    require_flat_observations(observation_space, "recurrent policies")
    return RecurrentPolicy(int(observation_space.shape[0]), action_space, cell, hidden_size, list(encoder_sizes),
                           activation, log_std_init, orthogonal_init)


def action_distribution(policy: nn.Module, batch: RolloutBatch) -> Distribution:
    """π(·|·) of every step of ``batch`` (batch shape ``[T, B]``): ``policy(obs)`` for a memoryless policy; a
    recurrent one replays the batch's sequences from its stored first state with its episode starts. Where the
    env gave action masks, π restricted to the allowed actions, as the rollout sampled from it."""
    if not is_recurrent(policy):
        return mask_actions(policy(batch.obs[:-1]), batch.action_mask)
    _check_sequences(batch)
    return mask_actions(policy(batch.obs[:-1], batch.policy_state, batch.first[:-1]), batch.action_mask)


def value_inputs(policy: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """What V_φ reads at each of the batch's T + 1 observations: ``obs [T + 1, B, o]`` with a memoryless policy;
    with a recurrent one the policy's features h_t ``[T + 1, B, F]`` over the batch's sequences (see the module
    doc), without a graph: V_φ's regression does not reach θ."""
    if not is_recurrent(policy):
        return batch.obs
    _check_sequences(batch)
    with torch.no_grad():
        return policy.features(batch.obs, batch.policy_state, batch.first)


def _check_sequences(batch: RolloutBatch) -> None:
    if batch.policy_state is None or batch.first is None:
        raise ValueError(
            "a recurrent policy needs the batch's first state and episode starts (policy_state, first): collect "
            "the batch with RolloutCollector and this policy"
        )
