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
    "space", [gym.spaces.MultiDiscrete([2, 3]), gym.spaces.Dict({"a": gym.spaces.Discrete(2)})]
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

    from pg_lightning.policies import GatherCategorical

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
