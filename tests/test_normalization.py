"""Observation normalisation: the running statistics, their merge over ranks, and their life in a run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_configs import compose_with

from pg_lightning.callbacks import Evaluation
from pg_lightning.distributed import Reduction
from pg_lightning.normalization import NormalizedObservations, RunningNormalizer
from pg_lightning.run import train


def batches(seed: int, sizes=(7, 1, 50, 13)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [3.0 + 2.0 * torch.randn(n, 3, generator=generator) for n in sizes]


def test_running_statistics_equal_those_of_all_observations_at_once():
    normalizer = RunningNormalizer((3,))
    for x in batches(0):
        normalizer.update(x)
    every = torch.cat(batches(0)).double().numpy()
    np.testing.assert_allclose(normalizer.mean.numpy(), every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(normalizer.var.numpy(), every.var(0), rtol=1e-10)
    assert normalizer.count.item() == len(every)
    # The merge term matters: averaging the batches' variances (a tempting shortcut) gives other numbers.
    naive = np.mean([b.double().numpy().var(0) for b in batches(0)], axis=0)
    assert not np.allclose(naive, every.var(0), rtol=1e-3)


def test_normalised_observations_are_standardised_and_clipped():
    normalizer = RunningNormalizer((3,), clip=5.0)
    x = torch.cat(batches(1))
    normalizer.update(x)
    y = normalizer(x)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    assert normalizer(torch.full((1, 3), 1e6)).max().item() == 5.0


class RecordingReduction(Reduction):
    """One rank of two: ``sum`` adds what the other rank contributed (recorded from its own update)."""

    def __init__(self, other: list[torch.Tensor]):
        super().__init__(world_size=2)
        object.__setattr__(self, "other", other)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.other.pop(0)


class Recorder(Reduction):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "seen", [])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.seen.append(tensor.clone())
        return tensor


def test_two_ranks_merge_their_sums_into_the_statistics_of_the_whole_batch():
    rank0, rank1 = batches(2), batches(3)
    recorders = [Recorder(), Recorder()]
    scratch = [RunningNormalizer((3,)), RunningNormalizer((3,))]
    for x0, x1 in zip(rank0, rank1):  # what each rank contributes to each all-reduce
        scratch[0].update(x0, recorders[0])
        scratch[1].update(x1, recorders[1])
    normalizers = [RunningNormalizer((3,)), RunningNormalizer((3,))]
    for x0, x1 in zip(rank0, rank1):
        normalizers[0].update(x0, RecordingReduction([recorders[1].seen.pop(0)]))
        normalizers[1].update(x1, RecordingReduction([recorders[0].seen.pop(0)]))
    whole = RunningNormalizer((3,))
    for x0, x1 in zip(rank0, rank1):
        whole.update(torch.cat([x0, x1]))
    for normalizer in normalizers:  # identical on both ranks, and equal to one process with the whole batch
        torch.testing.assert_close(normalizer.mean, whole.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(normalizer.var, whole.var, rtol=1e-12, atol=1e-12)
    # Each rank alone would have its own statistics.
    assert not torch.allclose(scratch[0].mean, whole.mean)


@pytest.mark.slow
def test_a_run_learns_the_statistics_saves_them_and_a_loaded_policy_uses_them(tmp_path):
    from pg_lightning import PolicyGradientModule

    run_dir = tmp_path / "run"
    cfg = compose_with("normalize_observations=true", "estimator=gae", "logger=csv", "env.num_envs=4",
                       "steps_per_env=64", "total_env_steps=1500", "stop_on_solve=false", "eval.num_episodes=2")
    summary = train(cfg, run_dir)
    assert summary["status"] == "finished"
    (run_dir / ".hydra").mkdir()
    saved = torch.load(run_dir / "last.ckpt", weights_only=True)["state_dict"]
    for name in ("policy", "value_fn"):  # both networks see normalised observations, with the same statistics
        assert saved[f"{name}.normalizer.count"] > 1000
    torch.testing.assert_close(saved["policy.normalizer.mean"], saved["value_fn.normalizer.mean"])
    assert saved["policy.normalizer.var"][1] != 1.0, "the statistics moved from their initial values"
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what train.py's Hydra writes beside the run
    loaded = PolicyGradientModule.from_run(run_dir)
    assert isinstance(loaded.policy, NormalizedObservations)
    torch.testing.assert_close(loaded.policy.normalizer.mean, saved["policy.normalizer.mean"])
    # Evaluating does not change them (they change only after a training update).
    from pg_lightning import evaluate_policy

    envs = loaded.env.make(num_envs=2)
    evaluate_policy(loaded.policy, envs, seed=0)
    envs.close()
    assert loaded.policy.normalizer.count == saved["policy.normalizer.count"]


def test_evaluation_by_env_steps_runs_after_each_multiple_whatever_the_batch():
    evaluation = Evaluation(every_n_iterations=1, every_n_env_steps=500)
    due = []
    for env_steps in (300, 600, 900, 1000, 1490, 1510, 2600):
        module = SimpleNamespace(env_steps=env_steps, iterations=0)
        if evaluation._due(module):
            evaluation.evaluated_at_env_steps = env_steps
            due.append(env_steps)
    assert due == [600, 1000, 1510, 2600]
    with pytest.raises(ValueError, match="eval.every_n_env_steps must be a positive integer or null, got 0"):
        Evaluation(every_n_env_steps=0)


@pytest.mark.slow
def test_a_run_evaluates_by_env_steps_and_reports_what_evaluation_cost(tmp_path):
    import csv

    run_dir = tmp_path / "run"
    summary = train(compose_with("eval.every_n_env_steps=1000", "eval.every_n_iterations=1", "logger=csv",
                                 "env.num_envs=2", "steps_per_env=100", "total_env_steps=3000", "stop_on_solve=false",
                                 "eval.num_episodes=2"), run_dir)
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["eval/return_mean"]]
    steps = [float(r["rollout/env_steps"]) for r in rows]
    # One evaluation per multiple of 1000 passed, plus the final one; not one per iteration.
    assert len(steps) <= 4 < summary["iterations"]
    assert all(float(r["perf/eval_s"]) > 0 for r in rows)
    assert summary["eval_s"] == pytest.approx(sum(float(r["perf/eval_s"]) for r in rows), abs=0.01)


def reference_discounted_returns(rew, valid, done, gamma):
    """G_t = γ G_{t-1} + r_t per env, restarting after each done: one step at a time."""
    num_steps, num_envs = rew.shape
    g, out = [0.0] * num_envs, []
    for t in range(num_steps):
        for b in range(num_envs):
            if valid[t, b]:
                g[b] = gamma * g[b] + float(rew[t, b])
                out.append(g[b])
            if done[t, b]:
                g[b] = 0.0
    return out


def reward_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards, valid steps and episode ends ``[40, 3]``: about a tenth of the steps invalid, a tenth of the
    valid ones ending an episode."""
    generator = torch.Generator().manual_seed(seed)
    rew = 5.0 * torch.randn(40, 3, generator=generator)
    valid = torch.rand(40, 3, generator=generator) > 0.1
    done = valid & (torch.rand(40, 3, generator=generator) < 0.1)
    return rew, valid, done


def test_the_reward_scale_is_the_std_of_the_discounted_return_over_batches():
    from pg_lightning.normalization import RewardScaler

    scaler = RewardScaler(num_envs=3, gamma=0.9)
    rew, valid, done = reward_batch(4)
    assert torch.equal(scaler.scale(rew), rew), "no statistics yet: rewards unchanged"
    scaler.update(rew[:25], valid[:25], done[:25])  # two batches: G carries across the cut
    scaler.update(rew[25:], valid[25:], done[25:])
    expected = np.var(reference_discounted_returns(rew.numpy(), valid.numpy(), done.numpy(), 0.9))
    assert scaler.stats.var.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(scaler.scale(rew), rew / float(np.sqrt(expected + 1e-8)))
    # Restarting G at every batch (forgetting the carried returns) would give another variance.
    fresh = RewardScaler(num_envs=3, gamma=0.9)
    fresh.update(rew[:25], valid[:25], done[:25])
    fresh.returns.zero_()
    fresh.update(rew[25:], valid[25:], done[25:])
    assert fresh.stats.var.item() != pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_a_run_with_scaled_rewards_logs_raw_returns_and_saves_the_scale(tmp_path):
    import csv

    def run(scale: bool):
        run_dir = tmp_path / f"scale_{scale}"
        summary = train(compose_with("env=pendulum", f"scale_rewards={str(scale).lower()}", "estimator=gae",
                                     "logger=csv", "env.num_envs=2", "steps_per_env=200", "total_env_steps=2000",
                                     "stop_on_solve=false", "eval.num_episodes=2"), run_dir)
        with (run_dir / "metrics.csv").open() as f:
            value_loss = [float(r["loss/value"]) for r in csv.DictReader(f) if r["loss/value"]][-1]
        return summary, value_loss, run_dir

    summary, scaled_loss, run_dir = run(True)
    assert summary["train_return_mean"] < -100, "Pendulum's returns, logged in its own units"
    state = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert state["state_dict"]["reward_scaler.stats.var"] > 100  # Pendulum's discounted returns vary by hundreds
    assert state["pg_lightning"]["reward_returns"].shape == (2,)
    _, raw_loss, _ = run(False)
    assert scaled_loss < raw_loss / 10, "V_φ regresses on returns of a far smaller scale"
