"""Gradient diagnostics and the estimator-comparison tool."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from test_configs import CONF_DIR, compose_with

from pg_lightning import estimators as E
from pg_lightning.diagnostics import cosine_similarity, gradient_statistics, sub_batch_gradients
from pg_lightning.mdps import chain
from pg_lightning.policies import mlp_policy
from pg_lightning.analysis import collect
from pg_lightning.run import train
from pg_lightning.variance import compare


def test_gradient_statistics_of_known_estimates():
    estimates = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # per-coordinate variances 2 and 2, mean (2, 1)
    stats = gradient_statistics(estimates)
    assert stats["grad_var"] == pytest.approx((2 + 2) / 2)
    assert stats["grad_snr"] == pytest.approx((4 + 1) / 2)
    assert math.isnan(gradient_statistics(estimates[:1])["grad_var"])


def test_cosine_similarity():
    estimates = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert cosine_similarity(estimates, torch.tensor([2.0, 0.0])).tolist() == pytest.approx([1.0, 0.0, -1.0])


def test_sub_batches_split_the_envs():
    mdp = chain()
    policy = mlp_policy(mdp.observation_space, mdp.action_space, hidden_sizes=[])
    import gymnasium as gym

    batch = collect(policy, gym.vector.SyncVectorEnv([chain] * 12), num_episodes=12, seed=0)
    estimates = sub_batch_gradients(policy, batch, E.reward_to_go(1.0), None, groups=4)
    assert estimates.shape == (4, sum(p.numel() for p in policy.parameters()))
    assert not torch.equal(estimates[0], estimates[1])


@pytest.mark.slow
def test_training_logs_gradient_variance(tmp_path):
    cfg = compose_with("logger=csv", "total_env_steps=2000", "steps_per_env=100", "diagnostics.grad_variance=true")
    summary = train(cfg, tmp_path)
    with open(summary["metrics_csv"]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/grad_var")]
    assert rows and all(float(r["diag/grad_var"]) > 0 and float(r["diag/grad_snr"]) > 0 for r in rows)


@pytest.mark.slow
def test_variance_tool_writes_table_and_chart(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="variance",
            overrides=[
                "variance.snapshots=[0,1]", "variance.num_batches=4", "variance.episodes_per_batch=4",
                "variance.reference_episodes=32", "variance.value_fit_steps=5", "steps_per_env=64",
                "variance.estimators=[reinforce,baseline,optimal_baseline,gae]",
            ],
        )
    rows = compare(cfg, tmp_path)
    assert [(r["snapshot"], r["estimator"]) for r in rows] == [
        (s, n) for s in (0, 1) for n in ("reinforce", "baseline", "optimal_baseline", "gae")
    ]
    assert all(r["grad_var"] > 0 and -1 <= r["cosine_to_reference"] <= 1 for r in rows)
    # Snapshot 1 is after one whole-episode batch: at least 64 steps of episodes per env, x 16 envs, plus the
    # end of each env's last episode and its wait for the others (short episodes at the start: < 2x).
    assert rows[0]["env_steps"] == 0 and 64 * 16 <= rows[4]["env_steps"] < 2 * 64 * 16
    table = (tmp_path / "variance.md").read_text()
    assert table.count("| optimal_baseline |") == 2
    assert (tmp_path / "variance.png").stat().st_size > 10_000
    with open(tmp_path / "variance.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
