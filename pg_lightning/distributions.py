"""Action distributions for the discrete action spaces, made from one logits vector per observation.

- ``Discrete(n)``: π(a|s) = softmax(z)_a, ``n`` logits (``GatherCategorical``).
- ``MultiDiscrete(nvec)``: K independent categoricals, one per component, ``Σ_k nvec[k]`` logits:

      π(a|s) = Π_k softmax(z_k)_{a_k},   log π(a|s) = Σ_k log softmax(z_k)_{a_k}

  (``MultiCategorical``). Entropy and KL are the sums of the components' too, so the natural gradient's Fisher
  is the sum of the components' Fishers.
- ``MultiBinary(shape)``: independent Bernoullis, one logit per bit, log π(a|s) = Σ_i log Bernoulli(a_i; σ(z_i))
  (``BernoulliVector``).

``logits_size(space)`` says how many outputs a policy's head needs, ``logits_distribution(space, logits)`` makes
the distribution from them; the MLP and recurrent policies share both.

Invalid-action masks (``mask_actions``): where an env says which actions are valid, π is restricted to them,

    π_m(a|s) = π(a|s) 1[m_a] / Σ_b π(b|s) 1[m_b]   (logits of invalid actions set to -inf),

per component for ``MultiDiscrete`` (its mask is the components' masks side by side, ``[Σ nvec]``). The policy
itself returns the unmasked π; the rollout, training and evaluation apply the same mask to it, so the stored
and recomputed log-probs are those of π_m, and ∇ log π_m is the score the policy gradient needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch.distributions import Bernoulli, Categorical, Distribution, Independent

DISCRETE_SPACES = (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class GatherCategorical(Categorical):
    """torch's ``Categorical`` with the per-step calls of the rollout and the evaluation made lighter; the
    same numbers, fewer tensor ops (each op on a small ``[B, n]`` tensor costs about as much as a layer of the MLP):

    - ``log_prob`` of actions shaped like the batch: one gather of the normalised logits, no ``broadcast_tensors``;
    - ``sample()``: the draw ``Categorical.sample`` makes (``multinomial`` with replacement on π(·|s)) without
      its reshapes to a sample shape;
    - ``mode``: argmax of the logits (log π has the argmax of π; torch computes π first).

    Other shapes go through torch's own methods.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape != self.batch_shape:
            return super().log_prob(value)
        return self.logits.gather(-1, value.long().unsqueeze(-1)).squeeze(-1)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        if sample_shape != torch.Size() or self.logits.dim() != 2:
            return super().sample(sample_shape)
        return torch.multinomial(self.probs, 1, True).squeeze(-1)

    @property
    def mode(self) -> torch.Tensor:
        return self.logits.argmax(-1)


class MultiCategorical(Independent):
    """K independent categoricals with ``nvec[k]`` classes each, from ``logits [..., Σ nvec]``.

    The components' logits are laid side by side in a ``[..., K, max(nvec)]`` tensor; a component with fewer
    classes has its extra entries at -inf, which torch's ``Categorical`` treats as probability 0 (never
    sampled, no entropy, no KL). Shapes: ``batch_shape [...]``, ``event_shape [K]``; actions are int64.
    """

    def __init__(self, logits: torch.Tensor, nvec: np.ndarray):
        self.flat_logits, self.nvec = logits, nvec  # what ``mask_actions`` masks
        widths = tuple(int(n) for n in nvec)
        if len(set(widths)) == 1:  # equal components: a reshape, no padding
            padded = logits.reshape(*logits.shape[:-1], len(widths), widths[0])
        else:  # one indexed copy into the -inf grid (not a Python loop over components at every env step)
            grid = logits.new_full((*logits.shape[:-1], len(widths) * max(widths)), float("-inf"))
            padded = grid.index_copy(-1, _grid_positions(widths).to(logits.device), logits)
            padded = padded.reshape(*logits.shape[:-1], len(widths), max(widths))
        super().__init__(GatherCategorical(logits=padded, validate_args=False), 1, validate_args=False)


@functools.lru_cache(maxsize=None)
def _grid_positions(widths: tuple[int, ...]) -> torch.Tensor:
    """Where each of the Σ widths flat logits goes in the flattened ``[K, max(widths)]`` grid: entry j of
    component k at k · max(widths) + j. Made outside inference mode: the cached index is used in training too."""
    with torch.inference_mode(False):
        return torch.tensor([k * max(widths) + j for k, width in enumerate(widths) for j in range(width)])


class ModeBernoulli(Bernoulli):
    """torch's ``Bernoulli`` whose ``mode`` is 1 where the logit is > 0 and 0 elsewhere (torch's is NaN at p = ½,
    which is where a policy starts)."""

    @property
    def mode(self) -> torch.Tensor:
        return (self.logits > 0).to(self.logits.dtype)


class BernoulliVector(Independent):
    """Independent bits of a ``MultiBinary(shape)`` action from ``logits [..., prod(shape)]``: ``batch_shape
    [...]``, ``event_shape`` = ``shape``; actions are 0./1. floats (cast to the env's int8 when sent)."""

    def __init__(self, logits: torch.Tensor, shape: tuple[int, ...]):
        bits = ModeBernoulli(logits=logits.reshape(*logits.shape[:-1], *shape), validate_args=False)
        super().__init__(bits, len(shape), validate_args=False)


def mask_actions(dist: Distribution, mask: torch.Tensor | None) -> Distribution:
    """``dist`` restricted to the actions where ``mask`` (bool, ``[..., n]`` or ``[..., Σ nvec]``) is True;
    ``dist`` itself when ``mask`` is None. The logits of masked actions become -inf: never sampled, probability
    0, no share of the entropy or the KL."""
    if mask is None:
        return dist
    if isinstance(dist, MultiCategorical):
        return MultiCategorical(dist.flat_logits.masked_fill(~mask, float("-inf")), dist.nvec)
    if isinstance(dist, Categorical):
        return GatherCategorical(logits=dist.logits.masked_fill(~mask, float("-inf")), validate_args=False)
    raise ValueError(
        f"the env gives action masks, which apply to categorical policies (Discrete, MultiDiscrete actions); the "
        f"policy returned a {type(dist).__name__}"
    )


class ActionMaskReader:
    """Reads the ``info["action_mask"]`` of a vector env of ``num_envs`` envs whose actions are ``space``, as a
    ``[num_envs, n]`` bool array (``n`` = ``logits_size(space)``), and checks it: the one reader the rollout and
    the evaluation share. The width and the MultiDiscrete components' split points are worked out once here,
    not at every env step."""

    def __init__(self, space: gym.Space, num_envs: int) -> None:
        self.space, self.num_envs = space, num_envs
        self.width = logits_size(space) if isinstance(space, DISCRETE_SPACES) else None
        self.splits = np.cumsum(space.nvec)[:-1] if isinstance(space, gym.spaces.MultiDiscrete) else []

    def read(self, info: dict, where_of: Callable[[], str]) -> np.ndarray | None:
        """The mask in ``info`` (None where it has none); one line starting with ``where_of()`` when only some envs
        give one, or it has the wrong width, or it allows no action for some env (the place is formatted only
        then, not at every env step)."""
        if "action_mask" not in info:
            return None
        if "_action_mask" in info and not np.all(info["_action_mask"]):
            raise ValueError(f"{where_of()}: some envs gave no info['action_mask'] (give it at every reset and step)")
        if self.width is None:
            raise ValueError(f"{where_of()}: the env gives info['action_mask'], which applies to discrete action spaces; "
                             f"the action space is {self.space}")
        mask = np.asarray(info["action_mask"], dtype=bool).reshape(self.num_envs, -1)
        if mask.shape[1] != self.width:
            raise ValueError(f"{where_of()}: info['action_mask'] has {mask.shape[1]} entries per env, the action space "
                             f"{self.space} needs {self.width}")
        if not all(part.any(axis=1).all() for part in np.split(mask, self.splits, axis=1)):
            raise ValueError(f"{where_of()}: info['action_mask'] allows no action (every entry False) for some env")
        return mask


def logits_size(space: gym.Space) -> int:
    """How many logits a policy's head outputs for the discrete action space ``space``."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return int(space.nvec.sum())
    if isinstance(space, gym.spaces.MultiBinary):
        return int(np.prod(space.shape))
    raise ValueError(f"action space {space} has no logits distribution: use Discrete, MultiDiscrete or MultiBinary")


def logits_distribution(space: gym.Space, logits: torch.Tensor) -> Distribution:
    """π(·|s) for the discrete action space ``space`` from ``logits [..., logits_size(space)]``."""
    if isinstance(space, gym.spaces.Discrete):
        return GatherCategorical(logits=logits, validate_args=False)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return MultiCategorical(logits, space.nvec)
    return BernoulliVector(logits, tuple(space.shape))
