"""``normalizer_updates=step``: observation and reward statistics that change at every env step, as SB3's
``VecNormalize``, while training still takes the gradient of the policy that acted."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_configs import compose_with
from test_normalization import RecordingReduction, Recorder, reference_discounted_returns, reward_batch

from pg_lightning import estimators as E
from pg_lightning.normalization import NormalizedObservations, RewardScaler, inputs_normalized
from pg_lightning.off_policy import OffPolicy
from pg_lightning.recurrent import action_distribution, recurrent_policy
from pg_lightning.run import ConfigError, train


def per_step_module(**kwargs):
    from pg_lightning import PolicyGradientModule

    settings = dict(estimator=E.gae(), steps_per_env=64, normalize_observations=True, scale_rewards=True,
                    normalizer_updates="step", off_policy=OffPolicy(kind="clipped", updates_per_batch=2, minibatches=2),
                    seed=3)
    settings.update(kwargs)
    module = PolicyGradientModule("Pendulum-v1", **settings)
    module.setup("fit")
    return module


@pytest.mark.parametrize("policy", [None, recurrent_policy], ids=["mlp", "gru"])
def test_training_reads_every_input_as_the_policy_saw_it_when_it_acted(policy):
    """The behaviour log-probs of two batches equal π's log-probs on the batch training reads, to float
    precision: the first importance ratio is 1 (a recurrent policy replays its sequences over these inputs).
    Reading the raw observations through the statistics at the batch's end (the inputs of
    ``normalizer_updates=batch``) gives other log-probs: the case that fails."""
    module = per_step_module(policy=policy)
    for _ in range(2):  # the second batch starts from statistics the first one left
        batch = module.collect_batch()
        acted = module._as_acted(batch)
        with torch.no_grad(), inputs_normalized(module.policy, module.value_fn):
            logp = action_distribution(module.policy, acted).log_prob(acted.act)
        valid = batch.valid
        torch.testing.assert_close(logp[valid], batch.logp_behavior[valid], rtol=0, atol=1e-5)
        with torch.no_grad():
            logp_final_statistics = action_distribution(module.policy, batch).log_prob(batch.act)
        assert not torch.allclose(logp_final_statistics[valid], batch.logp_behavior[valid], rtol=0, atol=1e-5)
        next(module.policy.parameters()).data += 0.1  # an update between batches


def test_each_step_is_normalised_with_the_statistics_of_every_observation_up_to_it():
    module = per_step_module()
    seen = []
    for _ in range(2):
        batch = module.collect_batch()
        obs, valid = batch.obs.double(), batch.valid
        for t in range(batch.num_steps):
            seen.extend(obs[t][valid[t]])
            rows = torch.stack(seen)
            mean, var = rows.mean(0), rows.var(0, unbiased=False)
            recorded_mean, recorded_scale = module.policy._rows[t]
            torch.testing.assert_close(recorded_mean.double(), mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(recorded_scale.double(), (var + 1e-8).sqrt(), rtol=1e-5, atol=1e-6)
        module._as_acted(batch)
        # After the batch: the statistics of every valid observation so far, in the policy and V_φ alike.
        every = torch.stack(seen)
        for model in (module.policy, module.value_fn):
            assert model.normalizer.count.item() == len(every)
            torch.testing.assert_close(model.normalizer.mean, every.mean(0))
    # Statistics one step late (the step's own observation left out) differ: what the check above catches.
    late = torch.stack(seen[:-1]).mean(0)
    assert not torch.allclose(late, every.mean(0), rtol=1e-6, atol=1e-6)


def test_a_checkpoint_written_mid_batch_keeps_the_statistics_of_the_batches_trained_on():
    module = per_step_module()
    module._as_acted(module.collect_batch())
    trained_on = module.policy.normalizer.statistics()
    module.collect_batch()  # then an env error, say: on_exception writes last.ckpt before the batch is trained on
    assert module.policy.normalizer.count > trained_on[2], "the rollout moved this rank's statistics"
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    for name, value in zip(("mean", "var", "count"), trained_on):
        torch.testing.assert_close(checkpoint["state_dict"][f"policy.normalizer.{name}"], value)


def test_each_reward_is_scaled_by_the_return_statistics_of_every_step_up_to_it():
    scaler = RewardScaler(num_envs=3, gamma=0.9)
    rew, valid, done = reward_batch(5)
    rew = rew * valid  # as the collector gives them
    scaled = torch.cat([scaler.scale_per_step(rew[:25], valid[:25], done[:25]),
                        scaler.scale_per_step(rew[25:], valid[25:], done[25:])])  # G carries across the cut
    expected = torch.empty_like(rew)
    for t in range(40):  # G of every valid step up to t, one step at a time
        returns = reference_discounted_returns(rew[: t + 1].numpy(), valid[: t + 1].numpy(), done[: t + 1].numpy(), 0.9)
        scale = np.sqrt(np.var(returns) + 1e-8) if returns else 1.0
        expected[t] = (rew[t] / scale).clamp(-10, 10)
    torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-6)
    assert scaler.stats.var.item() == pytest.approx(np.var(returns), rel=1e-9)
    # Scaling by the statistics from before the batch (``normalizer_updates=batch``) gives other rewards.
    assert not torch.allclose(RewardScaler(3, 0.9).scale(rew[:25]), expected[:25], rtol=1e-3)


def test_two_ranks_agree_on_the_statistics_after_a_batch_each_saw_only_in_part():
    """During the rollout each rank's statistics hold its own steps; at the batch's end both hold the whole
    batch's, merged from the statistics before it."""
    generator = torch.Generator().manual_seed(6)
    obs = [3.0 + 2.0 * torch.randn(9, 2, 3, generator=generator) for _ in range(2)]  # [T + 1, B, o] per rank
    valid = torch.ones(8, 2, dtype=torch.bool)

    def rank(index: int, reduction) -> NormalizedObservations:
        model = NormalizedObservations(torch.nn.Identity(), (3,))
        model.update_normalizer(torch.ones(4, 3) * torch.arange(4.0).unsqueeze(1))  # the same earlier batches
        for t in range(8):
            model.observe(obs[index][t], valid[t])
        model.rewind()  # as the module's _as_acted does
        model.update_normalizer(obs[index][:-1][valid], reduction)
        model.acted_inputs(obs[index])
        return model

    recorders = [Recorder(), Recorder()]
    rank(0, recorders[0]), rank(1, recorders[1])  # what each rank contributes to the all-reduce
    ranks = [rank(0, RecordingReduction(recorders[1].seen)), rank(1, RecordingReduction(recorders[0].seen))]
    whole = NormalizedObservations(torch.nn.Identity(), (3,))
    whole.update_normalizer(torch.ones(4, 3) * torch.arange(4.0).unsqueeze(1))
    whole.update_normalizer(torch.cat([obs[0][:-1], obs[1][:-1]]).reshape(-1, 3))
    for model in ranks:
        torch.testing.assert_close(model.normalizer.mean, whole.normalizer.mean)
        torch.testing.assert_close(model.normalizer.var, whole.normalizer.var)
    alone = rank(0, Recorder())  # without the merge a rank keeps only its own steps
    assert not torch.allclose(alone.normalizer.mean, whole.normalizer.mean)


@pytest.mark.slow
def test_a_ppo_mujoco_run_with_per_step_statistics_trains_and_saves_them(tmp_path):
    summary = train(compose_with("+experiment=ppo_mujoco", "env=pendulum", "normalizer_updates=step", "steps_per_env=256",
                       "off_policy.minibatches=4", "total_env_steps=2048", "logger=csv", "stop_on_solve=false",
                       "eval.num_episodes=2", "eval.every_n_env_steps=1024"), tmp_path)
    with (tmp_path / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["loss/policy"]]
    assert len(rows) >= 8 and float(rows[-1]["diag/skipped_updates"]) == 0
    assert float(rows[-1]["loss/value"]) < float(rows[0]["loss/value"])
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    # Every env step's observation and return joined the statistics once (reset steps are not env steps).
    assert state["policy.normalizer.count"] == summary["env_steps"] == state["reward_scaler.stats.count"]
    torch.testing.assert_close(state["policy.normalizer.var"], state["value_fn.normalizer.var"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["normalizer_updates=episode"], "normalizer_updates must be batch or step, got 'episode'"),
        (["normalizer_updates=step"], "normalizer_updates=step with normalize_observations=false and "
                                      "scale_rewards=false: there are no statistics to update"),
        (["normalizer_updates=step", "normalize_observations=true", "off_policy=per_step",
          "off_policy.reuse_batches=2"], "normalizer_updates=step cannot be combined with off_policy.reuse_batches=2"),
    ],
)
def test_per_step_statistics_refuse_what_they_cannot_do_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with(*overrides, "logger=none"), tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
