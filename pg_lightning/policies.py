"""Policies: any ``nn.Module`` whose ``forward(obs)`` returns a ``torch.distributions.Distribution``.

The library only ever calls ``policy(obs)`` and then ``.sample()``, ``.log_prob(act)``, ``.entropy()``
and ``.mode`` on the result, so a user's own network plugs in unchanged (a policy with memory keeps the
contract of ``recurrent.py`` instead). Two are shipped here:

- ``CategoricalMLP`` for ``Discrete`` actions: π(a|s) = softmax(f_θ(s))_a; for ``MultiDiscrete`` and
  ``MultiBinary`` actions independent categoricals or Bernoullis on the same logits (``distributions.py``).
- ``GaussianMLP`` for ``Box`` actions: π(a|s) = N(μ_θ(s), diag(σ²)) with a state-independent log σ; with
  ``squash=True`` the sample u goes through a = m + h · tanh(u), m and h the middle and half-width of the
  action bounds (``SquashedGaussian``, the change of variables in its log-prob).

``hidden_sizes=[]`` makes f_θ linear; with one-hot observations that is a tabular softmax policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, TransformedDistribution
from torch.distributions.transforms import AffineTransform, TanhTransform

from pg_lightning.encoders import image_encoder, is_image_space
from pg_lightning.envs import UnsupportedSpace, check_action_space, require_flat_observations
from pg_lightning.distributions import DISCRETE_SPACES, logits_distribution, logits_size
from pg_lightning.validation import boolean, require

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}

# log σ is clamped here: σ ∈ [e^-5, e^2] keeps log-probs finite and exploration alive.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(
    in_features: int,
    hidden_sizes: Sequence[int],
    out_features: int,
    activation: str,
    last_gain: float = 0.01,
    orthogonal_init: bool = False,
) -> nn.Sequential:
    """``in → hidden_sizes… → out`` with ``activation`` between layers; a single Linear if no hidden layer.

    The last layer is initialised orthogonally with ``last_gain``: a small gain starts a policy near
    uniform (or near its initial σ), the usual practice for policy gradients. ``orthogonal_init`` also
    initialises the hidden layers orthogonally with gain √2 and zero bias (Huang et al. 2022, PPO detail 2);
    otherwise they keep torch's default.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"policy.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    sizes = [in_features, *hidden_sizes, out_features]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(fan_in, fan_out))
        if orthogonal_init and i < len(sizes) - 2:
            nn.init.orthogonal_(layers[-1].weight, gain=math.sqrt(2))
            nn.init.zeros_(layers[-1].bias)
    last = layers[-1]
    assert isinstance(last, nn.Linear)
    nn.init.orthogonal_(last.weight, gain=last_gain)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


class CategoricalMLP(nn.Module):
    """π(·|s) from logits z = f_θ(s): a categorical for ``Discrete(n)`` (``num_actions`` = n or the space), and
    for ``MultiDiscrete`` or ``MultiBinary`` spaces independent categoricals or Bernoullis (``distributions.py``).

    Shapes: ``obs [..., obs_dim] -> Distribution`` with ``batch_shape [...]``.
    """

    def __init__(
        self,
        obs_dim: int,
        num_actions: int | gym.Space,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        orthogonal_init: bool = False,
    ):
        super().__init__()
        self.action_space = num_actions if isinstance(num_actions, gym.Space) else gym.spaces.Discrete(int(num_actions))
        self.logits = mlp(obs_dim, hidden_sizes, logits_size(self.action_space), activation,
                          orthogonal_init=orthogonal_init)

    def forward(self, obs: torch.Tensor) -> Distribution:
        return logits_distribution(self.action_space, self.logits(obs))


class ClampedTanhTransform(TanhTransform):
    """tanh, whose inverse clamps to ±(1 - 1e-6) first: an action stored at the float32 limit ±1 (tanh(u) for
    |u| > 9 rounds to it) still has a finite atanh, so its log-prob stays finite when training re-evaluates it."""

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        bound = 1.0 - 1e-6
        return torch.atanh(y.clamp(-bound, bound))


class SquashedGaussian(TransformedDistribution):
    """a = m + h · tanh(u), u ~ N(μ, diag σ²): a Gaussian squashed into the box [m - h, m + h].

    log π(a|s) = log N(u; μ, σ²) - Σ_i log(1 - tanh²(u_i)) - Σ_i log h_i,   u = atanh((a - m) / h)

    (the change of variables; torch's ``TransformedDistribution`` sums the log-Jacobians over the action
    vector). ``mode`` is m + h · tanh(μ), the image of the Gaussian's mode (not the mode of the squashed density,
    which has no closed form; the usual choice for deterministic evaluation). The entropy has no closed form
    either: ``entropy()`` is the one-sample estimate -log π(a|s) at a reparameterised sample, so an entropy
    bonus still has a gradient (it draws from torch's random stream). Shapes as ``Independent(Normal)``:
    ``batch_shape [...]``, ``event_shape [act_dim]``.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, middle: torch.Tensor, half_width: torch.Tensor):
        base = Independent(Normal(mean, std, validate_args=False), 1, validate_args=False)
        # No cache: log π(a) is always computed from a itself, so the rollout's log-prob of a stored action and
        # training's are the same computation (ρ = 1 exactly at θ = θ_b, even for saturated actions).
        squash = [ClampedTanhTransform(), AffineTransform(middle, half_width, event_dim=1)]
        super().__init__(base, squash, validate_args=False)

    @property
    def mode(self) -> torch.Tensor:
        value = self.base_dist.mean
        for transform in self.transforms:
            value = transform(value)
        return value

    def entropy(self) -> torch.Tensor:
        return -self.log_prob(self.rsample())


class GaussianMLP(nn.Module):
    """π(·|s) = N(μ_θ(s), diag(exp(2 log σ))) with a learned, state-independent ``log_std``.

    Shapes: ``obs [..., obs_dim] -> Independent(Normal)`` with ``batch_shape [...]``,
    ``event_shape [act_dim]``. Samples are unbounded; the rollout clips them to the action space
    only when sending them to the env, and log-probs are of the unclipped sample.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        log_std_init: float = -0.5,
        orthogonal_init: bool = False,
        squash_bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        super().__init__()
        self.mean = mlp(obs_dim, hidden_sizes, act_dim, activation, orthogonal_init=orthogonal_init)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))
        self.squash = squash_bounds is not None
        if squash_bounds is not None:  # buffers: they follow the module to its device and into checkpoints
            low, high = (torch.as_tensor(np.asarray(bound, dtype=np.float32)) for bound in squash_bounds)
            self.register_buffer("action_middle", (high + low) / 2)
            self.register_buffer("action_half_width", (high - low) / 2)

    def forward(self, obs: torch.Tensor) -> Distribution:
        mean = self.mean(obs)
        std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp().expand_as(mean)
        if self.squash:
            return SquashedGaussian(mean, std, self.action_middle, self.action_half_width)
        return Independent(Normal(mean, std, validate_args=False), 1, validate_args=False)


class EncodedPolicy(nn.Module):
    """``head(encoder(obs))``: an encoder (a CNN for images, ``encoders.py``) in front of an MLP policy on its
    features. Shapes: ``obs [..., *observation_shape] -> Distribution`` with ``batch_shape [...]``."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, obs: torch.Tensor) -> Distribution:
        return self.head(self.encoder(obs))


def cnn_policy(
    observation_space: gym.Space,
    action_space: gym.Space,
    hidden_sizes: Sequence[int] = (),
    trunk: str | None = None,
    activation: str = "tanh",
    log_std_init: float = -0.5,
    orthogonal_init: bool = False,
    squash: bool = False,
) -> nn.Module:
    """A CNN on image observations (``encoders.image_encoder``; ``trunk`` ``nature``, ``grid`` or None: by the
    image's size), then the MLP head ``mlp_policy`` makes for the action space, with ``hidden_sizes`` ([]: linear,
    as CleanRL's Atari PPO) (``policy=cnn``)."""
    if not is_image_space(observation_space):
        raise UnsupportedSpace(f"observation space {observation_space} is not an image: policy=cnn needs a Box of "
                               "(H, W), (H, W, C) or (C, H, W) with C <= 4; use policy=mlp")
    encoder = image_encoder(observation_space, trunk)
    features = gym.spaces.Box(-np.inf, np.inf, shape=(encoder.out_features,), dtype=np.float32)
    head = mlp_policy(features, action_space, hidden_sizes, activation, log_std_init, orthogonal_init, squash)
    return EncodedPolicy(encoder, head)


def mlp_policy(
    observation_space: gym.Space,
    action_space: gym.Space,
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "tanh",
    log_std_init: float = -0.5,
    orthogonal_init: bool = False,
    squash: bool = False,
) -> nn.Module:
    """The shipped MLP policy that fits the spaces: categorical for ``Discrete`` (and ``MultiDiscrete``,
    ``MultiBinary``: ``CategoricalMLP``), Gaussian for ``Box``; for image observations the same head after a CNN
    (``cnn_policy``, the trunk picked by the image's size).
    ``orthogonal_init``: hidden layers orthogonal with gain √2 (the policy head always has gain 0.01).
    ``squash``: ``Box`` only: tanh-squash the Gaussian into the action bounds (which must be finite) instead
    of clipping its samples when they are sent to the env."""
    require("policy.squash", squash, boolean, "true or false")
    if is_image_space(observation_space):
        return cnn_policy(observation_space, action_space, hidden_sizes, None, activation, log_std_init,
                          orthogonal_init, squash)
    require_flat_observations(observation_space, "MLP policies")
    check_action_space(action_space)
    obs_dim = int(np.prod(observation_space.shape))
    hidden_sizes = list(hidden_sizes)
    if squash and not (isinstance(action_space, gym.spaces.Box) and np.isfinite(action_space.low).all()
                       and np.isfinite(action_space.high).all()):
        raise ValueError(f"policy.squash=true needs a Box action space with finite bounds, got {action_space}")
    if isinstance(action_space, DISCRETE_SPACES):
        return CategoricalMLP(obs_dim, action_space, hidden_sizes, activation, orthogonal_init)
    bounds = (action_space.low, action_space.high) if squash else None
    return GaussianMLP(obs_dim, int(action_space.shape[0]), hidden_sizes, activation, log_std_init,
                       orthogonal_init, squash_bounds=bounds)


def is_recurrent(policy: nn.Module) -> bool:
    """True for a policy with memory (``recurrent.py``'s contract: ``initial_state``, ``step``, sequences)."""
    return bool(getattr(policy, "recurrent", False))


def check_policy(policy: nn.Module, observation_space: gym.Space, action_space: gym.Space) -> None:
    """Refuse, in one line, a policy that breaks the contract the rollout relies on.

    The contract: ``policy(obs)`` on a ``[B, *obs_shape]`` float tensor returns a ``Distribution`` whose
    ``sample()`` is ``[B, *action_shape]`` and whose ``log_prob(actions)`` is ``[B]`` (one log-probability per
    observation: a Normal over an action vector must be wrapped in ``Independent(..., 1)``). A recurrent policy
    (``recurrent.py``) is checked through ``step(obs, initial_state(2))``, which must also return a ``[2, S]``
    state. Checked on a batch of 2 observations sampled from ``observation_space``, without gradients.
    """
    name = type(policy).__name__
    parameter = next(policy.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    obs = torch.as_tensor(np.stack([observation_space.sample() for _ in range(2)]), dtype=torch.float32, device=device)
    with torch.no_grad():
        if is_recurrent(policy):
            dist, state = policy.step(obs, policy.initial_state(2))
            if tuple(state.shape[:1]) != (2,):
                raise ValueError(f"policy {name}: step(obs, state) on a batch of 2 returned a state of shape "
                                 f"{tuple(state.shape)}, expected (2, state_size)")
        else:
            dist = policy(obs)
        if not isinstance(dist, Distribution):
            raise ValueError(
                f"policy {name}: forward(obs) must return a torch.distributions.Distribution, got "
                f"{type(dist).__name__} (e.g. return Categorical(logits=logits) instead of the logits)"
            )
        act = dist.sample()
        expected = (2, *action_space.shape)
        if tuple(act.shape) != expected:
            raise ValueError(
                f"policy {name}: sample() on a batch of 2 observations has shape {tuple(act.shape)}, expected "
                f"{expected} for the action space {action_space}"
            )
        logp = dist.log_prob(act)
        if tuple(logp.shape) != (2,):
            raise ValueError(
                f"policy {name}: log_prob(actions) on a batch of 2 has shape {tuple(logp.shape)}, expected (2,): one "
                "log-probability per observation (wrap a Normal over an action vector in Independent(normal, 1))"
            )
