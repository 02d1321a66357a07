"""Load, evaluate and render a trained policy: PolicyGradientModule.from_run and python -m pg_lightning.evaluate."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_train import REPO

from pg_lightning import PolicyGradientModule
from pg_lightning import evaluate as evaluate_cli


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """A short train.py run with the linear policy (its saved config is what rebuilds it)."""
    root = tmp_path_factory.mktemp("evaluate")
    run_dir = root / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "logger=none", "policy=linear", "env.num_envs=2", "steps_per_env=50",
         "total_env_steps=2000", "stop_on_solve=false", f"hydra.run.dir={run_dir}"],
        cwd=root, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_from_run_rebuilds_the_trained_policy_with_its_weights(linear_run):
    module = PolicyGradientModule.from_run(linear_run)
    saved = torch.load(linear_run / "last.ckpt", weights_only=True)["state_dict"]
    weights = {name: value for name, value in module.state_dict().items()}
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[name], saved[name]) for name in saved)
    assert sum(p.numel() for p in module.policy.parameters()) == 4 * 2 + 2, "the linear policy, not the default MLP"
    assert not module.training
    # A checkpoint file works as well as its run dir.
    same = PolicyGradientModule.from_run(linear_run / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(same.policy.parameters(), module.policy.parameters()))


def test_the_evaluate_command_prints_the_return_and_writes_a_video(linear_run, tmp_path, capsys):
    video = tmp_path / "episode.mp4"
    assert evaluate_cli.main([str(linear_run), "--episodes", "3", "--video", str(video)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CartPole-v1: deterministic return ") and "over 3 episodes" in out
    assert video.is_file() and video.stat().st_size > 1000


def test_the_evaluate_command_refuses_a_dir_without_a_run_in_one_line(tmp_path, capsys):
    assert evaluate_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: no checkpoint") and err.count("\n") == 1


def test_lightnings_model_checkpoint_and_early_stopping_see_the_evaluation(tmp_path):
    """eval/return_mean reaches trainer.callback_metrics: ModelCheckpoint keeps the best policy and EarlyStopping's
    stopping_threshold ends training, as a Lightning user would write them."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from pg_lightning import Evaluation, VectorEnvFactory

    L.seed_everything(0, verbose=False)
    module = PolicyGradientModule(VectorEnvFactory("CartPole-v1", num_envs=4), steps_per_env=64, total_env_steps=50_000,
                                  eval_episodes=4)
    evaluation = Evaluation(every_n_iterations=2, stop_on_solve=False)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="eval/return_mean", mode="max", save_top_k=1)
    # strict=False: before the first evaluation there is nothing to monitor yet.
    early = EarlyStopping(monitor="eval/return_mean", mode="max", stopping_threshold=30.0, patience=10_000, strict=False)
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, callbacks=[evaluation, early, best],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert evaluation.return_mean >= 30.0 and module.env_steps < 50_000, "EarlyStopping stopped it at the threshold"
    assert float(best.best_model_score) == evaluation.return_mean
    assert torch.load(best.best_model_path, weights_only=True)["pg_lightning"]["iterations"] == module.iterations
    # trainer.validate scores a checkpoint with the module's validation loop, which fit left off (the
    # Evaluation callback evaluated) and gave back afterwards.
    assert trainer.limit_val_batches == 1.0
    (scores,) = trainer.validate(module, ckpt_path=best.best_model_path, verbose=False)
    from pg_lightning import evaluate_policy

    best_module = PolicyGradientModule(VectorEnvFactory("CartPole-v1", num_envs=4))
    best_module.load_state_dict(torch.load(best.best_model_path, weights_only=True)["state_dict"])
    envs = best_module.env.make(num_envs=module.eval_episodes)
    expected = evaluate_policy(best_module.policy, envs, seed=module.seed + 10_000)
    envs.close()
    assert scores["eval/return_mean"] == pytest.approx(expected.mean())
    assert scores["eval/return_std"] == pytest.approx(expected.std())


def test_train_keeps_the_best_evaluated_policy_in_best_ckpt_the_final_evaluation_included(tmp_path):
    import csv

    from test_configs import compose_with

    from pg_lightning.run import train

    run_dir = tmp_path / "run"
    train(compose_with("logger=csv", "env.num_envs=4", "steps_per_env=64", "total_env_steps=2500",
                       "stop_on_solve=false", "eval.num_episodes=4", "eval.every_n_iterations=2"), run_dir)
    with (run_dir / "metrics.csv").open() as f:
        evaluations = [(float(r["eval/return_mean"]), int(r["step"])) for r in csv.DictReader(f) if r["eval/return_mean"]]
    checkpoint = torch.load(run_dir / "best.ckpt", weights_only=True)
    best_score, best_step = max(evaluations, key=lambda e: e[0])  # the first of equal scores is kept
    assert float(checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "ModelCheckpoint" in k)]
                 ["best_model_score"]) == best_score
    assert checkpoint["global_step"] == best_step
    # The last iteration is evaluated whatever its number (not only multiples of the period).
    assert evaluations[-1][1] == torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"]
