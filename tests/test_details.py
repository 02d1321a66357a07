"""The continuous-control details, each a config key: orthogonal initialisation, gradient-norm clipping, the
entropy bonus, learning-rate annealing and λ-return targets for V_φ."""

from __future__ import annotations

import csv

import pytest
import torch
from test_configs import compose_with
from torch import nn

from pg_lightning.distributed import LOCAL
from pg_lightning.estimators import Estimator
from pg_lightning.policies import CategoricalMLP, mlp
from pg_lightning.run import ConfigError, train
from pg_lightning.update import GuardedStep, SkipCounter, with_entropy_bonus
from pg_lightning.value import ValueFunction, ValueFunctionConfig


def is_orthogonal(weight: torch.Tensor, gain: float) -> bool:
    """Rows (or columns, whichever are fewer) orthonormal up to ``gain``."""
    w = weight if weight.shape[0] <= weight.shape[1] else weight.T
    return torch.allclose(w @ w.T, gain**2 * torch.eye(w.shape[0]), atol=1e-5)


def test_orthogonal_init_gives_hidden_layers_gain_sqrt2_and_keeps_the_heads():
    torch.manual_seed(0)
    net = mlp(4, [64, 64], 2, "tanh", last_gain=0.01, orthogonal_init=True)
    hidden = [layer for layer in net if isinstance(layer, nn.Linear)][:-1]
    assert all(is_orthogonal(layer.weight, 2**0.5) and not layer.bias.any() for layer in hidden)
    assert is_orthogonal(net[-1].weight, 0.01)
    value = ValueFunction(4, ValueFunctionConfig(orthogonal_init=True))
    assert is_orthogonal(value.net[-1].weight, 1.0)
    # torch's default initialisation is not orthogonal: the check can fail.
    default = mlp(4, [64, 64], 2, "tanh")
    assert not is_orthogonal(default[0].weight, 2**0.5)


def test_gradient_norm_clipping_bounds_each_step():
    def step_size(max_grad_norm):
        model = nn.Linear(3, 1)
        before = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
        step = GuardedStep(torch.optim.SGD(model.parameters(), lr=1.0), model, lambda loss: loss.backward(), LOCAL,
                           SkipCounter(3), max_grad_norm=max_grad_norm)
        assert step(100.0 * model(torch.ones(5, 3)).sum())
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return float((after - before).norm())

    assert step_size(None) > 100  # unclipped, the step is the raw gradient
    assert step_size(0.5) == pytest.approx(0.5, rel=1e-5)


def test_the_entropy_bonus_raises_the_entropy_and_is_nothing_at_zero():
    torch.manual_seed(0)
    policy = CategoricalMLP(2, 3, hidden_sizes=[])
    with torch.no_grad():
        policy.logits[0].bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    obs = torch.zeros(4, 2)
    batch = type("Batch", (), {"valid": torch.ones(4, dtype=torch.bool)})()
    dist = policy(obs)
    zero = torch.zeros(())
    assert with_entropy_bonus(zero, dist, batch, 0.0) is zero
    loss = with_entropy_bonus(zero, dist, batch, 0.1)
    assert loss.item() == pytest.approx(-0.1 * dist.entropy().mean().item())
    loss.backward()
    with torch.no_grad():
        policy.logits[0].bias -= policy.logits[0].bias.grad  # one descent step
    assert policy(obs).entropy().mean() > dist.entropy().mean()


def test_lambda_return_targets_are_the_advantage_plus_v():
    from pg_lightning import VectorEnvFactory, collect, mlp_policy

    factory = VectorEnvFactory("CartPole-v1", num_envs=4)
    batch = collect(mlp_policy(*factory.spaces()), factory, num_steps=200, seed=0, whole_episodes=False)
    values = torch.linspace(0.0, 1.0, (batch.num_steps + 1) * batch.num_envs).reshape(batch.num_steps + 1, -1)
    lam = Estimator(name="gae", baseline="value", gae_lambda=0.9, value=ValueFunctionConfig(targets="lambda_returns"))
    out = lam(batch, values)
    torch.testing.assert_close(out.value_targets[out.mask], (out.weights + values[:-1])[out.mask])
    plain = Estimator(name="gae", baseline="value", gae_lambda=0.9, value=ValueFunctionConfig())(batch, values)
    assert not torch.allclose(plain.value_targets[out.mask], out.value_targets[out.mask])


@pytest.mark.slow
def test_learning_rates_decay_linearly_over_the_budget(tmp_path):
    budget = 4000
    train(compose_with("anneal_lr=true", "estimator=gae", "optimizer.lr=0.01", "logger=csv", "env.num_envs=2",
                       "steps_per_env=200", f"total_env_steps={budget}", "stop_on_solve=false",
                       "eval.num_episodes=2"), tmp_path)
    with (tmp_path / "metrics.csv").open() as f:
        steps = [float(r["rollout/env_steps"]) for r in csv.DictReader(f) if r["loss/policy"]]
    groups = [state["param_groups"][0] for state in torch.load(tmp_path / "last.ckpt", weights_only=True)["optimizer_states"]]
    for group, initial in zip(groups, (0.01, 0.01)):  # the policy's Adam and V_φ's (estimator.value.lr 0.01)
        assert group["initial_lr"] == initial
        # Set before the last update, from the env steps before its batch.
        assert group["lr"] == pytest.approx(initial * (1 - steps[-2] / budget))


def test_a_squashed_policy_trains_with_the_ppo_mujoco_details_and_an_entropy_bonus(tmp_path):
    """The training path of the squashed Gaussian, the shared step, minibatches of steps and the entropy bonus
    together: every update is taken (finite), the first pass starts at ratio 1, V_φ learns."""
    train(compose_with("+experiment=ppo_mujoco", "env=pendulum", "policy.squash=true", "entropy_coef=0.01",
                       "steps_per_env=256", "off_policy.minibatches=4", "total_env_steps=2048", "logger=csv",
                       "stop_on_solve=false", "eval.num_episodes=2", "eval.every_n_env_steps=1024"), tmp_path)
    with (tmp_path / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["loss/policy"]]
    assert len(rows) >= 8 and float(rows[-1]["diag/skipped_updates"]) == 0
    assert all(abs(float(r["diag/entropy"])) < 10 and float(r["diag/ess"]) > 0.5 for r in rows)
    assert float(rows[-1]["loss/value"]) < float(rows[0]["loss/value"])
    assert float(rows[-1]["diag/explained_variance"]) > float(rows[0]["diag/explained_variance"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_grad_norm=0"], "max_grad_norm must be a positive number or null, got 0"),
        (["entropy_coef=-0.1"], "entropy_coef must be a non-negative number, got -0.1"),
        (["optimizer=natural_gradient", "max_grad_norm=0.5"], "max_grad_norm=0.5 cannot be combined with optimizer=natural_gradient"),
        # Every setting the natural gradient cannot take, named in one line with its fix (masked_cartpole sets three).
        (["env=masked_cartpole", "optimizer=natural_gradient"],
         "anneal_lr=true, off_policy.kind=clipped and estimator.value.shared_step_coef=0.5 cannot be combined with "
         "optimizer=natural_gradient"),
        (["anneal_lr=1"], "anneal_lr must be true or false, got 1"),
        (["estimator=gae", "estimator.value.targets=td"], "estimator.value.targets must be returns or lambda_returns, got 'td'"),
    ],
)
def test_bad_detail_values_are_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with(*overrides, "logger=none"), tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_value_minibatches_cover_the_batch_once_per_epoch_and_fit_it():
    from pg_lightning.value import _value_minibatches, fit_value

    torch.manual_seed(0)
    obs = torch.randn(10, 3, 2)
    targets = obs.sum(-1)
    mask = torch.ones(10, 3, dtype=torch.bool)
    mask[0, 0] = False  # a reset step: never fitted
    parts = list(_value_minibatches(obs, targets, mask, steps=6, minibatch_size=7))
    assert [len(t) for _, t, _ in parts] == [7] * 6
    first_epoch = torch.cat([t for _, t, _ in parts[:4]])  # 29 masked steps: 4 minibatches of 7 per order
    assert len(set(first_epoch.tolist())) == 28 and obs[0, 0].sum().item() not in first_epoch.tolist()
    value_fn = ValueFunction(2, ValueFunctionConfig(hidden_sizes=[16]))
    optimizer = torch.optim.Adam(value_fn.parameters(), lr=0.01)
    step = GuardedStep(optimizer, value_fn, lambda loss: loss.backward(), LOCAL, SkipCounter(3))
    before = ((value_fn(obs) - targets) ** 2)[mask].mean()
    fit_value(value_fn, obs, targets, mask, value_fn(obs).detach(), steps=200, step=step, minibatch_size=8)
    assert ((value_fn(obs) - targets) ** 2)[mask].mean() < before / 5


def test_explained_variance_of_fewer_than_two_steps_is_nan_without_a_warning():
    import warnings

    from pg_lightning.value import explained_variance

    targets, values = torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    one_step = torch.tensor([[True, False], [False, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's var() of one element warns: that is what this avoids
        assert torch.isnan(explained_variance(targets, values, one_step))
    every_step = torch.ones(2, 2, dtype=torch.bool)
    torch.testing.assert_close(explained_variance(targets, values, every_step),
                               1 - (targets - values).var() / targets.var())
