"""Off-policy reuse (lecture §6): the ratio's direction, on-policy equality, numerics, the replay loop.

Unbiasedness, the per-step bias and the variance comparison against exact gradients are in
``test_exact_gradients.py``.
"""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from conftest import collect_cartpole, counting_envs
from test_configs import compose_with

from pg_lightning import functional as F
from pg_lightning.segments import segment_ids, segment_sum
from pg_lightning import estimators as E
from pg_lightning.envs import VectorEnvFactory
from pg_lightning.analysis import estimate_gradient
from pg_lightning.module import PolicyGradientModule
from pg_lightning.off_policy import OffPolicy, importance_loss
from pg_lightning.policies import mlp_policy
from pg_lightning.rollout import RolloutCollector
from pg_lightning.run import ConfigError, train
from pg_lightning.value import ValueFunction

KINDS = {
    "trajectory": OffPolicy(kind="trajectory"),
    "trajectory_truncated": OffPolicy(kind="trajectory", truncate=2.0),
    "trajectory_self_normalized": OffPolicy(kind="trajectory", self_normalize=True),
    "per_step": OffPolicy(kind="per_step"),
    "per_step_kl": OffPolicy(kind="per_step", kl_coef=0.5),
    "clipped": OffPolicy(kind="clipped", clip_ratio=0.1, kl_coef=1.0),
}
PRESETS = {
    "reinforce": E.reinforce(),
    "reward_to_go": E.reward_to_go(),
    "baseline": E.baseline(),
    "reinforce_baseline": E.reinforce_baseline(),
    "value_baseline": E.value_baseline(),
    "gae": E.gae(),
    "baseline_normalized": E.Estimator(name="n", normalize=True),
}


@pytest.fixture(scope="module")
def cartpole_batch():
    """A CartPole batch (8 envs x 200 steps, several whole episodes) and the policy that collected it."""
    return collect_cartpole(steps_per_env=200)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def test_the_ratio_is_current_over_behaviour():
    logp, logp_behavior = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.4]))
    torch.testing.assert_close(F.log_ratio(logp, logp_behavior).exp(), torch.tensor([2.0, 0.5]))


def test_stored_behaviour_log_probs_are_those_of_the_collecting_policy(cartpole_batch):
    policy, batch = cartpole_batch
    with torch.no_grad():
        logp = policy(batch.obs[:-1]).log_prob(batch.act)
    torch.testing.assert_close(logp[batch.valid], batch.logp_behavior[batch.valid])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_with_the_behaviour_policy_every_off_policy_gradient_is_the_on_policy_one(cartpole_batch, kind, preset):
    policy, batch = cartpole_batch
    estimator = PRESETS[preset]
    torch.manual_seed(1)
    value_fn = ValueFunction(batch.obs.shape[-1], estimator.value) if estimator.needs_value else None
    on_policy = flat(estimate_gradient(policy, batch, estimator, value_fn))
    off_policy = flat(estimate_gradient(policy, batch, estimator, value_fn, off_policy=KINDS[kind]))
    assert on_policy.abs().max() > 1e-3
    torch.testing.assert_close(off_policy, on_policy, rtol=1e-4, atol=1e-6)


def test_at_the_behaviour_policy_the_diagnostics_say_on_policy(cartpole_batch):
    policy, batch = cartpole_batch
    estimate = E.baseline()(batch)
    for off_policy in KINDS.values():
        result = importance_loss(policy, batch, estimate, off_policy)
        assert result.ess.item() == pytest.approx(1.0)
        assert abs(result.approx_kl.item()) < 1e-6
        assert result.clip_fraction.item() == 0.0


def test_moved_policy_lowers_ess_raises_kl_and_clips(cartpole_batch):
    policy, batch = cartpole_batch
    moved = copy.deepcopy(policy)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.3 * torch.randn_like(p))
    estimate = E.baseline()(batch)
    clipped = importance_loss(moved, batch, estimate, OffPolicy(kind="clipped"))
    trajectory = importance_loss(moved, batch, estimate, OffPolicy(kind="trajectory"))
    assert clipped.approx_kl.item() > 1e-3
    assert 0 < clipped.clip_fraction.item() < 1
    assert 0 < trajectory.ess.item() < clipped.ess.item() < 1, "products of ratios vary more than single ratios"


def long_episode_batch(log_ratio_per_step: float):
    """4 episodes of 500 steps whose behaviour log-probs differ from the policy's by a fixed amount per step.

    Episode i gets log ρ = ±``log_ratio_per_step`` at every step (signs +, -, +, -): Σ log ρ = ±500 x that.
    """
    envs = counting_envs([500] * 4)
    policy = mlp_policy(envs.single_observation_space, envs.single_action_space, hidden_sizes=[8])
    torch.manual_seed(0)
    batch = RolloutCollector(envs, steps_per_env=500, seed=0).collect(policy)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch.logp_behavior = batch.logp_behavior - log_ratio_per_step * signs
    return policy, batch


def test_products_of_500_ratios_stay_finite_in_log_space():
    policy, batch = long_episode_batch(0.3)  # Σ log ρ = ±150: e^150 overflows float32, e^-150 underflows
    naive = batch.logp_behavior.new_tensor(1.35).pow(500)
    assert not torch.isfinite(naive), "a float32 product of 500 ratios of 1.35 is inf: the test is meaningful"
    log_w = segment_sum(F.log_ratio(policy(batch.obs[:-1]).log_prob(batch.act), batch.logp_behavior).detach(),
                          segment_ids(batch.valid, batch.done), 4)
    torch.testing.assert_close(log_w, torch.tensor([150.0, -150.0, 150.0, -150.0]), atol=1e-2, rtol=0)
    weights = F.trajectory_weights(log_w)
    assert torch.isfinite(weights).all() and weights[0].item() == pytest.approx(math.exp(log_w[0].item()), rel=1e-6)
    normalized = F.trajectory_weights(log_w, self_normalize=True)
    assert torch.isfinite(normalized).all() and normalized.sum().item() == pytest.approx(1.0)
    assert F.effective_sample_size(normalized).item() == pytest.approx(0.5, rel=1e-6), "two equal weights dominate"
    assert F.trajectory_weights(log_w, truncate=10.0).max().item() == pytest.approx(10.0)
    estimate = E.reward_to_go()(batch)
    for kind in (OffPolicy(kind="trajectory", self_normalize=True), OffPolicy(kind="trajectory", truncate=10.0),
                 OffPolicy(kind="per_step", kl_coef=0.1), OffPolicy(kind="clipped")):
        policy.zero_grad()
        result = importance_loss(policy, batch, estimate, kind)
        result.loss.backward()
        assert torch.isfinite(result.loss), kind
        assert all(torch.isfinite(p.grad).all() for p in policy.parameters()), kind
        assert torch.isfinite(result.ess) and torch.isfinite(result.approx_kl), kind


def test_self_normalized_weights_survive_when_every_weight_underflows():
    log_w = torch.tensor([-900.0, -901.0, -905.0])  # e^-900 is 0 even in float64: Σw = 0 and w/Σw = 0/0
    normalized = F.trajectory_weights(log_w, self_normalize=True)
    assert torch.isfinite(normalized).all()
    torch.testing.assert_close(normalized, torch.softmax(log_w.double(), 0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "importance"}, "off_policy.kind must be one of none, trajectory, per_step, clipped, got 'importance'"),
        ({"kind": "clipped", "clip_ratio": 0}, "off_policy.clip_ratio must be a positive number, got 0"),
        ({"kind": "per_step", "reuse_batches": -1}, "off_policy.reuse_batches must be a non-negative integer, got -1"),
        ({"kind": "per_step", "minibatches": 0}, "off_policy.minibatches must be a positive integer, got 0"),
        ({"kind": "per_step", "truncate": 5.0}, "off_policy.truncate is only used with off_policy.kind=trajectory"),
        ({"kind": "none", "updates_per_batch": 4}, "off_policy.updates_per_batch=4 needs an importance-sampled"),
    ],
)
def test_bad_off_policy_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        OffPolicy(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["off_policy.reuse_batches=2"], "off_policy.reuse_batches=2 needs an importance-sampled off_policy.kind"),
        (["off_policy=per_step", "off_policy.truncate=5"], "off_policy.truncate is only used with off_policy.kind=trajectory"),
        (["off_policy=clipped", "off_policy.minibatches=64"], "off_policy.minibatches=64 is more than env.num_envs=16"),
        (["off_policy=per_step", "estimator=optimal_baseline"], "cannot be combined with estimator.baseline=optimal"),
        (["off_policy=clipped", "optimizer=natural_gradient"], "cannot be combined with optimizer=natural_gradient"),
        (["off_policy=clipped", "off_policy.kl_coef=-1"], "off_policy.kl_coef must be a non-negative number, got -1"),
        (["off_policy=trajectory", "off_policy.truncate=0"], "off_policy.truncate must be a positive number or null, got 0"),
    ],
)
def test_bad_off_policy_configs_give_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with(*overrides, "logger=none"), tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):
        CountingAdam.steps += 1
        return super().step(closure)


def test_the_replay_keeps_reuse_batches_and_takes_the_configured_number_of_steps():
    off_policy = OffPolicy(kind="per_step", reuse_batches=2, updates_per_batch=3, minibatches=4)
    module = PolicyGradientModule(
        VectorEnvFactory("CartPole-v1", num_envs=5),  # 5 envs in 4 minibatches: 2 + 1 + 1 + 1 estimator=E.gae(), steps_per_env=64,
        optimizer=lambda params: CountingAdam(params, lr=1e-3), off_policy=off_policy,
    )
    from lightning.pytorch import Trainer

    CountingAdam.steps = 0
    trainer = Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module)
    assert len(module.replay) == 3
    kept = [1, 2, 3, 3, 3]  # batches in the replay at iterations 1..5
    assert CountingAdam.steps == sum(k * 3 * 4 for k in kept)
    behaviour = [batch.logp_behavior for batch in module.replay]
    assert not torch.equal(behaviour[0], behaviour[-1]), "each kept batch has its own behaviour log-probs"


@pytest.mark.slow
def test_off_policy_run_logs_its_diagnostics_and_resumes_with_its_replay(tmp_path):
    small = ["logger=csv", "off_policy=per_step", "env.num_envs=4", "steps_per_env=64", "eval.num_episodes=2",
             "stop_on_solve=false"]
    summary = train(compose_with(*small, "total_env_steps=2000"), tmp_path / "first")
    assert summary["status"] == "finished" and summary["off_policy"] == "per_step"
    with open(summary["metrics_csv"]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/ess")]
    assert len(rows) == summary["iterations"] >= 5
    for row in rows:
        assert 0 < float(row["diag/ess"]) <= 1 and float(row["diag/approx_kl"]) >= 0
    assert any(float(row["diag/ess"]) < 1 for row in rows[1:]), "replayed batches come from older policies"
    checkpoint = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    assert len(checkpoint["pg_lightning"]["replay"]) == 4  # reuse_batches = 3, plus the newest
    restored = PolicyGradientModule("CartPole-v1", off_policy=OffPolicy(kind="per_step", reuse_batches=3))
    restored.on_load_checkpoint(checkpoint)
    # Whole-episode batches: at least 64 steps of each of the 4 envs, the rows until the last episode ends.
    assert len(restored.replay) == 4
    assert all(b.logp_behavior.shape[1] == 4 and b.logp_behavior.shape[0] >= 64 for b in restored.replay)
    last = tmp_path / "first" / "last.ckpt"
    resumed = train(compose_with(*small, f"ckpt_path={last}", "total_env_steps=2500"), tmp_path / "second")
    assert resumed["iterations"] > summary["iterations"] and resumed["env_steps"] >= 2500
