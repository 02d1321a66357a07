"""Shipped policies: distributions, shapes, linear case, clipping, and user-defined policies."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from lightning import Trainer
from torch import nn

from pg_lightning import CategoricalMLP, GaussianMLP, PolicyGradientModule, mlp_policy
from pg_lightning.envs import to_env_action

BOX_OBS = gym.spaces.Box(-1, 1, shape=(3,), dtype=np.float32)


def test_categorical_policy_for_discrete_actions():
    policy = mlp_policy(BOX_OBS, gym.spaces.Discrete(4))
    assert isinstance(policy, CategoricalMLP)
    dist = policy(torch.zeros(5, 7, 3))
    assert dist.batch_shape == (5, 7)
    assert dist.sample().shape == (5, 7)
    assert dist.probs.shape == (5, 7, 4)


def test_gaussian_policy_has_state_independent_log_std():
    policy = mlp_policy(BOX_OBS, gym.spaces.Box(-1, 1, shape=(2,)), log_std_init=-0.3)
    assert isinstance(policy, GaussianMLP)
    dist = policy(torch.randn(6, 3))
    assert dist.batch_shape == (6,) and dist.event_shape == (2,)
    torch.testing.assert_close(dist.stddev, torch.full((6, 2), float(np.exp(-0.3))))
    a = dist.sample()
    expected = torch.distributions.Normal(dist.mean, dist.stddev).log_prob(a).sum(-1)
    torch.testing.assert_close(dist.log_prob(a), expected)


def test_empty_hidden_sizes_gives_a_linear_softmax_policy():
    policy = mlp_policy(BOX_OBS, gym.spaces.Discrete(2), hidden_sizes=[])
    linears = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (2, 3)
    assert not any(isinstance(m, (nn.Tanh, nn.ReLU)) for m in policy.modules())


def test_box_actions_are_clipped_only_when_sent_to_the_env():
    space = gym.spaces.Box(-2.0, 2.0, shape=(1,), dtype=np.float32)
    sampled = np.array([[3.5], [-0.5], [-9.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_env_action(sampled, space), [[2.0], [-0.5], [-2.0]])
    assert sampled[0, 0] == 3.5, "the stored sample is not modified"


@pytest.mark.parametrize(
    "space", [gym.spaces.MultiDiscrete([[2, 3], [2, 2]]), gym.spaces.Dict({"a": gym.spaces.Discrete(2)}),
              gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(2)))]
)
def test_unsupported_action_spaces_are_refused(space):
    with pytest.raises(ValueError, match="action space"):
        mlp_policy(BOX_OBS, space)


class UserPolicy(nn.Module):
    """A user's own network: anything returning a Distribution plugs in."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(2))

    def forward(self, obs):
        return torch.distributions.Categorical(logits=self.table.expand(*obs.shape[:-1], 2))


def test_a_user_policy_plugs_into_the_module():
    policy = UserPolicy()
    module = PolicyGradientModule("CartPole-v1", policy=policy, steps_per_env=64)
    assert module.policy is policy
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module)
    assert module.iterations == 2
    assert not torch.equal(policy.table.detach(), torch.zeros(2)), "the optimizer updated the user's parameters"


class LogitsPolicy(nn.Module):
    """Returns the logits, not a distribution."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, obs):
        return self.linear(obs)


class PlainNormalPolicy(nn.Module):
    """A Normal over a 1-D action vector without Independent: log_prob is [B, 1], not [B]."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Linear(3, 1)

    def forward(self, obs):
        return torch.distributions.Normal(self.mean(obs), 1.0)


@pytest.mark.parametrize(
    ("env_id", "policy", "message"),
    [
        ("CartPole-v1", LogitsPolicy(), "policy LogitsPolicy: forward(obs) must return a torch.distributions.Distribution, "
                                        "got Tensor (e.g. return Categorical(logits=logits) instead of the logits)"),
        ("Pendulum-v1", PlainNormalPolicy(), "policy PlainNormalPolicy: log_prob(actions) on a batch of 2 has shape (2, 1), "
                                             "expected (2,): one log-probability per observation"),
    ],
)
def test_a_policy_that_breaks_the_contract_is_refused_in_one_line(env_id, policy, message):
    with pytest.raises(ValueError) as info:
        PolicyGradientModule(env_id, policy=policy)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_gather_categorical_equals_torch_categorical():
    """The rollout's and the evaluation's lighter calls give torch's numbers: log_prob, mode, and sample()
    (the same multinomial draw, so the same actions from the same RNG state)."""
    from torch.distributions import Categorical

    from pg_lightning.distributions import GatherCategorical

    logits = torch.randn(5, 3, 4)
    fast, reference = GatherCategorical(logits=logits), Categorical(logits=logits)
    actions = reference.sample()
    torch.testing.assert_close(fast.log_prob(actions), reference.log_prob(actions), rtol=0, atol=0)
    every_action = torch.arange(4).view(4, 1, 1)  # broadcast against the batch: torch's own path
    torch.testing.assert_close(fast.log_prob(every_action), reference.log_prob(every_action), rtol=0, atol=0)
    torch.testing.assert_close(fast.mode, reference.mode, rtol=0, atol=0)
    assert fast.sample((2,)).shape == reference.sample((2,)).shape == (2, 5, 3)  # sample shapes: torch's path

    flat_logits = torch.randn(64, 3)  # [B, n]: the rollout's shape, where sample() takes the short path
    fast, reference = GatherCategorical(logits=flat_logits), Categorical(logits=flat_logits)
    torch.manual_seed(0)
    drawn = fast.sample()
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, reference.sample(), rtol=0, atol=0)
    assert drawn.shape == (64,) and drawn.dtype == torch.int64


SQUASH_SPACE = gym.spaces.Box(low=np.array([-1.0, 0.0], dtype=np.float32), high=np.array([1.0, 4.0], dtype=np.float32))


def test_the_squashed_gaussian_stays_in_bounds_and_its_log_prob_is_the_change_of_variables():
    """log π(a) = log N(u; μ, σ) - Σ log(1 - tanh² u) - Σ log h, u = atanh((a - m) / h), for the bounds
    [-1, 1] x [0, 4] (m = (0, 2), h = (1, 2)); the mode is m + h tanh(μ)."""
    torch.manual_seed(0)
    policy = mlp_policy(BOX_OBS, SQUASH_SPACE, log_std_init=0.5, squash=True)
    obs = torch.randn(4000, 3)
    dist = policy(obs)
    actions = dist.sample()
    low, high = torch.as_tensor(SQUASH_SPACE.low), torch.as_tensor(SQUASH_SPACE.high)
    assert ((actions > low) & (actions < high)).all()
    middle, half = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0])
    u = torch.atanh((actions - middle) / half)
    mean, std = policy.mean(obs), policy.log_std.exp()
    manual = (torch.distributions.Normal(mean, std).log_prob(u) - torch.log1p(-torch.tanh(u) ** 2)).sum(-1)
    manual = manual - torch.log(half).sum()
    torch.testing.assert_close(dist.log_prob(actions), manual, rtol=1e-4, atol=1e-4)
    # Without the Jacobian terms the log-prob would be another number: the check can fail.
    assert not torch.allclose(dist.log_prob(actions), torch.distributions.Normal(mean, std).log_prob(u).sum(-1), atol=0.1)
    torch.testing.assert_close(dist.mode, middle + half * torch.tanh(mean))
    # The density integrates to 1 over the box (a Monte-Carlo check: E_a[1/π(a)] over uniform a = area).
    uniform = low + (high - low) * torch.rand(200_000, 2)
    with torch.no_grad():
        density = policy(torch.zeros(200_000, 3)).log_prob(uniform).exp()
    assert float(density.mean() * (high - low).prod()) == pytest.approx(1.0, abs=0.03)


def test_the_squashed_gaussian_gives_ratio_one_for_its_own_saturated_actions():
    """The rollout's log-prob of a sampled action and training's of the stored one are the same number, even
    when tanh(u) rounds to the bound (σ large): importance ratios start at exactly 1."""
    torch.manual_seed(0)
    policy = mlp_policy(BOX_OBS, SQUASH_SPACE, log_std_init=2.0, squash=True)
    with torch.no_grad():
        dist = policy(torch.randn(2000, 3))
        actions = dist.sample()
        behaviour = dist.log_prob(actions)
        stored = torch.from_numpy(actions.numpy().copy())  # what the rollout keeps
        relearned = dist.log_prob(stored)
    assert (actions.abs() >= torch.tensor([1.0, 4.0]) - 1e-6).any(), "some actions are saturated"
    assert torch.isfinite(behaviour).all()
    torch.testing.assert_close(relearned, behaviour, rtol=0, atol=0)


def test_squash_needs_finite_box_bounds():
    with pytest.raises(ValueError, match=r"^policy.squash=true needs a Box action space with finite bounds"):
        mlp_policy(BOX_OBS, gym.spaces.Discrete(3), squash=True)
    with pytest.raises(ValueError, match=r"^policy.squash must be true or false, got 1"):
        mlp_policy(BOX_OBS, SQUASH_SPACE, squash=1)
