"""Minibatches of steps, per-minibatch advantage normalisation and V_φ sharing the policy's step: the PPO details
that the MuJoCo presets take from the reference implementations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import collect_cartpole
from test_configs import compose_with
from torch import nn

from pg_lightning import estimators as E
from pg_lightning.distributed import LOCAL
from pg_lightning.off_policy import OffPolicy, importance_loss, normalize_minibatch
from pg_lightning.run import ConfigError, train
from pg_lightning.update import GuardedStep, SkipCounter, minibatches, update_policy
from pg_lightning.value import ValueFunction, value_loss

STEPS = OffPolicy(kind="clipped", minibatches=7, minibatch_unit="steps")


@pytest.fixture(scope="module")
def gae_batch():
    """(policy, batch, GAE estimate, V_φ): 4 CartPole envs x 50 steps cut mid-episode, a fresh V_φ."""
    policy, batch = collect_cartpole(steps_per_env=50, num_envs=4)
    torch.manual_seed(2)
    estimator = E.gae()
    value_fn = ValueFunction(batch.obs.shape[-1], estimator.value)
    with torch.no_grad():
        estimate = estimator(batch, value_fn(batch.obs))
    return policy, batch, estimate, value_fn


def test_minibatches_of_steps_cover_every_used_step_once_per_pass(gae_batch):
    _, batch, estimate, _ = gae_batch
    torch.manual_seed(0)
    parts = list(minibatches(batch, estimate, STEPS, LOCAL))
    assert len(parts) == 7
    sizes = [data.num_envs for data, _ in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == int(estimate.mask.sum())
    # Every (obs, action, Ψ) of the batch's used steps appears once: compare the multisets.
    seen = torch.cat([torch.cat([data.obs[0], data.act[0, :, None].float(), part.weights[0, :, None]], 1)
                      for data, part in parts])
    wanted = torch.cat([batch.obs[:-1][estimate.mask], batch.act[estimate.mask][:, None].float(),
                        estimate.weights[estimate.mask][:, None]], 1)
    assert torch.equal(seen[seen[:, 0].argsort()], wanted[wanted[:, 0].argsort()])
    # Each column's second observation is the step's next observation.
    data, _ = parts[0]
    for j in range(3):
        t, b = (batch.obs[:-1] == data.obs[0, j]).all(-1).nonzero()[0]
        assert torch.equal(data.obs[1, j], batch.obs[t + 1, b])
    # A different stream draws different sets: the split is random.
    torch.manual_seed(1)
    other = next(iter(minibatches(batch, estimate, STEPS, LOCAL)))[0]
    assert not torch.equal(other.obs[0], parts[0][0].obs[0])


def test_a_minibatch_of_steps_is_the_mean_of_its_steps_terms_and_together_they_give_the_lectures_direction(gae_batch):
    """At θ = θ_b (every ρ = 1) the minibatch losses, each a mean over its K_j steps, weighted by K_j and
    summed, are N times the on-policy pseudo-loss (1/N) Σ_t log π Ψ_t in gradient: the lecture's direction."""
    policy, batch, estimate, _ = gae_batch
    off_policy = OffPolicy(kind="per_step", minibatches=5, minibatch_unit="steps")
    torch.manual_seed(0)
    total = 0.0
    for data, part in minibatches(batch, estimate, off_policy, LOCAL):
        total = total + importance_loss(policy, data, part, off_policy).loss * data.num_envs
    policy.zero_grad()
    total.backward()
    summed = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    logp = policy(batch.obs[:-1]).log_prob(batch.act)
    (-(logp * estimate.weights * estimate.mask).sum()).backward()  # N · the on-policy pseudo-loss
    lecture = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert lecture.abs().max() > 1e-3
    torch.testing.assert_close(summed, lecture, rtol=1e-4, atol=1e-6)
    # The check can fail: dividing by N (the env groups' rule) instead of K gives another scale.
    assert not torch.allclose(summed * float(estimate.num_segments) / int(estimate.mask.sum()), lecture)


def test_per_minibatch_normalisation_standardises_each_minibatch(gae_batch):
    _, batch, estimate, _ = gae_batch
    torch.manual_seed(0)
    for _, part in minibatches(batch, estimate, STEPS, LOCAL):
        raw = part.weights[part.mask]
        normalized = normalize_minibatch(part).weights[part.mask]
        assert abs(float(normalized.mean())) < 1e-5
        assert float(normalized.std()) == pytest.approx(1.0, rel=1e-4)
        torch.testing.assert_close(normalized, (raw - raw.mean()) / (raw.std() + 1e-8))
        assert raw.std() > 1.5 or abs(float(raw.mean())) > 0.1  # unnormalised Ψ is not already standard


def test_a_shared_step_moves_the_policy_by_its_loss_and_v_by_c_times_its_loss(gae_batch):
    """One SGD step (lr 1) of both models on L_π + c · L_V: each moves by minus its own part's gradient."""
    policy, batch, estimate, value_fn = gae_batch
    policy, value_fn = copy.deepcopy(policy), copy.deepcopy(value_fn)  # the fixture's stay as they were
    coef = 0.25
    off_policy = OffPolicy(kind="clipped", minibatches=1, minibatch_unit="steps")
    both = nn.ModuleList([policy, value_fn])
    step = GuardedStep(torch.optim.SGD(both.parameters(), lr=1.0), both, lambda loss: loss.backward(), LOCAL,
                       SkipCounter(3))
    torch.manual_seed(0)
    data, part = next(iter(minibatches(batch, estimate, off_policy, LOCAL)))
    expected_policy = torch.autograd.grad(importance_loss(policy, data, part, off_policy).loss, list(policy.parameters()))
    expected_value = torch.autograd.grad(value_loss(value_fn, data.obs[:-1], part.value_targets, part.mask),
                                         list(value_fn.parameters()))
    before = [p.detach().clone() for p in both.parameters()]
    torch.manual_seed(0)  # the same minibatch inside update_policy
    result = update_policy(policy, [(batch, None)], _FixedEstimate(estimate), off_policy, step, LOCAL,
                           value_loss=lambda d, p: value_loss(value_fn, d.obs[:-1], p.value_targets, p.mask),
                           value_coef=coef)
    moved = [b - p.detach() for b, p in zip(before, both.parameters())]
    for got, want in zip(moved, [*expected_policy, *(coef * g for g in expected_value)]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert "loss/value" in result.metrics
    assert any(g.abs().max() > 1e-4 for g in expected_value)  # V_φ really had a gradient to follow


def test_a_shared_step_has_one_optimizer_over_both_models_and_a_separate_fit_two():
    """CleanRL's arrangement: one Adam over the policy and V_φ, V_φ's parameters a group with its own lr."""
    from pg_lightning.module import PolicyGradientModule
    from pg_lightning.value import ValueFunctionConfig

    shared = E.gae(value=ValueFunctionConfig(lr=0.02, shared_step_coef=0.5))
    module = PolicyGradientModule("CartPole-v1", estimator=shared)
    (optimizer,) = module.configure_optimizers()
    policy_group, value_group = optimizer.param_groups
    assert {id(p) for p in policy_group["params"]} == {id(p) for p in module.policy.parameters()}
    assert {id(p) for p in value_group["params"]} == {id(p) for p in module.value_fn.parameters()}
    assert (policy_group["lr"], value_group["lr"]) == (1e-2, 0.02)
    separate = PolicyGradientModule("CartPole-v1", estimator=E.gae(value=ValueFunctionConfig(lr=0.02)))
    assert len(separate.configure_optimizers()) == 2


class _FixedEstimate:
    """An estimator that returns a given estimate (the test fixes Ψ and V_φ's targets)."""

    def __init__(self, estimate):
        self.estimate = estimate

    def __call__(self, batch, values, reduction):
        return self.estimate


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "trajectory", "minibatch_unit": "steps"}, "off_policy.minibatch_unit=steps needs a per-step kind"),
        ({"kind": "clipped", "minibatch_unit": "episodes"}, "off_policy.minibatch_unit must be envs or steps, got 'episodes'"),
        ({"kind": "none", "normalize_minibatch": True}, "off_policy.normalize_minibatch=True needs an importance-sampled"),
        ({"kind": "clipped", "normalize_minibatch": 1}, "off_policy.normalize_minibatch must be true or false, got 1"),
    ],
)
def test_bad_minibatch_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        OffPolicy(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["off_policy=clipped", "off_policy.minibatch_unit=steps", "off_policy.minibatches=100000"],
         "off_policy.minibatches=100000 is more than the batch's env.num_envs x steps_per_env"),
        (["estimator=gae", "estimator.value.shared_step_coef=0"],
         "estimator.value.shared_step_coef must be a positive number or null, got 0"),
        (["estimator=gae", "estimator.value.shared_step_coef=0.5", "optimizer=natural_gradient"],
         "estimator.value.shared_step_coef=0.5 cannot be combined with optimizer=natural_gradient"),
    ],
)
def test_bad_minibatch_configs_give_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with(*overrides, "logger=none"), tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
