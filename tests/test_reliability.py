"""Reliability: bad input refused early, NaN guards, env failures, determinism, crash-safe checkpoints."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_configs import compose_with
from test_train import REPO

from pg_lightning.update import NonFiniteUpdatesError
from pg_lightning.rollout import EnvStepError
from pg_lightning.run import ConfigError, train

TINY = ["logger=csv", "env.num_envs=2", "steps_per_env=50", "eval.num_episodes=2", "eval.every_n_iterations=1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator.gamma=1.5"], "estimator.gamma must be in [0, 1], got 1.5"),
        (["optimizer.lr=-0.1"], "optimizer.lr must be a positive number, got -0.1"),
        (["optimizer.lr=0"], "optimizer.lr must be a positive number, got 0"),
        (["env.num_envs=0"], "env.num_envs must be a positive integer, got 0"),
        (["steps_per_env=0"], "steps_per_env must be a positive integer, got 0"),
        (["total_env_steps=100"], "total_env_steps=100 is smaller than one batch (steps_per_env=1024 x env.num_envs=16 = 16384)"),
        (["policy.hidden_sizes=[64,0]"], "policy.hidden_sizes must be a list of positive integers, got [64, 0]"),
        (["eval.num_episodes=0"], "eval.num_episodes must be a positive integer, got 0"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["estimator=value_baseline", "estimator.value.lr=-1"], "estimator.value.lr must be a positive number, got -1"),
        (["estimator=value_baseline", "estimator.value=null"], "estimator.value is required for estimator.baseline=value"),
        (["estimator.gae_lambda=0.9"], "estimator.gae_lambda=0.9 needs estimator.baseline=value"),
        (["env.id=CartPole-v9"], "env.id 'CartPole-v9' is not a registered gymnasium environment (did you mean CartPole-v1"),
        (["env.id=PgTest/TupleAction-v0"], "env.id='PgTest/TupleAction-v0': action space Tuple(Discrete(2), Discrete(2)) is not supported"),
        (["env.id=PgTest/OddShape-v0"], "env.id='PgTest/OddShape-v0': observation space Box(0, 255, (16, 8, 16), uint8) is not supported by the MLP policies"),
        (["env.id=PgTest/OddShape-v0", "policy=gru"], "env.id='PgTest/OddShape-v0': observation space Box(0, 255, (16, 8, 16), uint8) is not supported by the recurrent policies"),
        (["env.id=PgTest/Pixels-v0", "policy=cnn", "policy.trunk=nature"], "policy.trunk=nature needs images of at least 36 pixels a side, got 8 x 8; use policy.trunk=grid"),
        (["env.id=PgTest/Pixels-v0", "normalize_observations=true"], "normalize_observations=true with the image observations of env.id='PgTest/Pixels-v0'"),
        (["trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0 is not supported"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path '/nonexistent/last.ckpt' is not a file"),
        (["torch_threads=0"], "torch_threads must be a positive integer or null (torch's default: one per core), got 0"),
        (["verbose=yes"], "verbose must be true or false, got 'yes'"),
        (["env.reward_threshold=abc"], "env.reward_threshold must be a number or null, got 'abc'"),
        (["env.id=HalfCheetah-v3"], "env.id 'HalfCheetah-v3' cannot be made (ImportError: The mujoco v2 and v3 based"),
        (["env.id=HalfCheetah-v3"], "; use HalfCheetah-v5, the current version"),
        (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer (torch.optim.SGD) refuses its arguments: Invalid momentum value: -1"),
        (["env.observation_indices=[0,9]"], "env.observation_indices [0, 9] out of range for observations of size 4"),
    ],
)
def test_bad_config_values_are_refused_with_key_and_value(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with(*overrides, "logger=none"), tmp_path)
    assert message in str(info.value)
    assert "\n" not in str(info.value), "one line"
    assert not (tmp_path / "summary.json").exists(), "refused before the run started"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu: this machine has no CUDA GPU .* use trainer.accelerator=cpu$"):
        train(compose_with("trainer.accelerator=gpu", "logger=none"), tmp_path)


def test_an_integer_budget_written_as_a_float_is_taken_as_an_integer(tmp_path):
    summary = train(compose_with("total_env_steps=2e3", "env.num_envs=2", "steps_per_env=50", "logger=none",
                                 "stop_on_solve=false", "eval.num_episodes=2"), tmp_path)
    assert summary["status"] == "finished" and summary["env_steps"] >= 2000
    with pytest.raises(ConfigError, match=r"^total_env_steps must be a positive integer, got 2500.5$"):
        train(compose_with("total_env_steps=2500.5", "logger=none"), tmp_path / "fractional")


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_an_env_that_raises_stops_the_run_with_its_id_and_step_and_keeps_the_work(tmp_path):
    cfg = compose_with(*TINY, "env.id=PgTest/Faulty-v0", "total_env_steps=5000", "checkpoint.every_n_iterations=1")
    # Each of the 2 envs raises on its 151st step (reset steps are no step calls). A batch is 3 whole 20-step
    # episodes per env (T = 50): rows 0-19, a reset row, 21-40, ... so the 31st step of the 3rd batch is row 31.
    with pytest.raises(EnvStepError, match=r"environment PgTest/Faulty-v0 raised at env step 300 \(step 31 of this batch\).*simulator exploded"):
        train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "PgTest/Faulty-v0" in summary["error"]
    assert "simulator exploded" in summary["traceback"]
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # The 2 finished batches are kept: 2 envs x 3 episodes x 20 steps each.
    assert checkpoint["pg_lightning"]["env_steps"] == summary["env_steps"] == 240
    assert checkpoint["pg_lightning"]["iterations"] == summary["iterations"] == 2


def test_a_nan_reward_skips_one_update_and_training_goes_on(tmp_path):
    cfg = compose_with(*TINY, "env.id=PgTest/Faulty-v0", "+env.kwargs.fault=nan", "total_env_steps=500")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["env_steps"] >= 500
    skipped = [float(r["diag/skipped_updates"]) for r in read_metrics(tmp_path / "metrics.csv") if r.get("diag/skipped_updates")]
    assert skipped[0] == 0 and skipped[-1] == 1, skipped


def test_consecutive_non_finite_updates_stop_with_a_checkpoint(tmp_path):
    cfg = compose_with(
        *TINY, "env.id=PgTest/Faulty-v0", "+env.kwargs.fault=nan", "+env.kwargs.nan_steps=100000",
        "total_env_steps=5000", "max_skipped_updates=3",
    )
    with pytest.raises(NonFiniteUpdatesError, match="3 updates in a row had a non-finite loss or gradient"):
        train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["checkpoint"] == str(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values()), "no NaN reached the weights"


def deterministic_columns(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_same_seed_same_metrics_and_different_seed_different_metrics(tmp_path):
    def run(seed: int, name: str) -> list[dict]:
        cfg = compose_with("logger=csv", "steps_per_env=128", "total_env_steps=8000", f"seed={seed}", "estimator=gae")
        train(cfg, tmp_path / name)
        return deterministic_columns(read_metrics(tmp_path / name / "metrics.csv"))

    first, again, other = run(3, "a"), run(3, "b"), run(4, "c")
    assert len(first) >= 4 and first == again
    assert [r["rollout/return_mean"] for r in first] != [r["rollout/return_mean"] for r in other]


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_leaves_a_loadable_checkpoint_and_the_resumed_run_reaches_the_budget(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    common = ["logger=csv", "stop_on_solve=false", "steps_per_env=256", "checkpoint.every_n_iterations=1000"]
    first_dir = tmp_path / "first"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *common, "total_env_steps=100000000", f"hydra.run.dir={first_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    metrics = first_dir / "metrics.csv"
    wait_for(lambda: metrics.exists() and len(read_metrics(metrics)) >= 3, timeout=120)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    summary = json.loads((first_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", stderr[-2000:]
    # The run says where its work is and how to go on, and exits as a shell reports SIGTERM.
    assert process.returncode == 143, stderr[-2000:]
    assert f"interrupted: saved {first_dir}/last.ckpt" in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"resume: python train.py {' '.join(common)} total_env_steps=100000000 ckpt_path={first_dir}/last.ckpt")
    checkpoint = torch.load(first_dir / "last.ckpt", weights_only=True)
    assert checkpoint["pg_lightning"]["env_steps"] == summary["env_steps"] > 0
    assert not list(first_dir.glob(".*.tmp")), "no temp file left behind"

    # The printed command, with a budget three batches away, continues the run in its run dir.
    budget = summary["env_steps"] + 3 * 256 * 16
    command = stderr.strip().splitlines()[-1].removeprefix("resume: ").replace("total_env_steps=100000000", f"total_env_steps={budget}")
    resumed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *command.split()[2:]], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run dir: {first_dir}" in resumed.stdout
    final = json.loads((first_dir / "summary.json").read_text())
    assert final["status"] == "finished" and final["env_steps"] >= budget
    # One curve in one run dir: every iteration once, in order, and the plot tool sees one run.
    rows = [row for row in read_metrics(metrics) if row.get("loss/policy")]
    steps = [float(row["rollout/env_steps"]) for row in rows]
    assert steps == sorted(set(steps))
    assert len(rows) == final["iterations"]
    # Counters continue from the checkpoint, and the resumed run stops at the first batch that reaches the budget.
    # Its batches are whole episodes (at least 256 x 16 env steps, at most 16 x (255 + 500) with CartPole's
    # episodes of up to 500 steps), so 2 or 3 of them, however long the episodes had grown by the SIGTERM.
    resumed_steps = steps[summary["iterations"]:]
    assert 2 <= len(resumed_steps) <= 3 and all(s < budget for s in resumed_steps[:-1]) and resumed_steps[-1] >= budget
    from pg_lightning.plot import find_runs

    assert find_runs([tmp_path]) == [first_dir]
    # The config that built the weights stays .hydra/config.yaml; the resumed run's is beside it.
    assert "ckpt_path: null" in (first_dir / ".hydra" / "config.yaml").read_text()
    assert "ckpt_path:" in (first_dir / ".hydra" / "resumed" / "config.yaml").read_text()


@pytest.mark.slow
def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "logger=csv", "stop_on_solve=false", "total_env_steps=100000000",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_for(lambda: (run_dir / "metrics.csv").exists() and len(read_metrics(run_dir / "metrics.csv")) >= 2, timeout=120)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].endswith(f"ckpt_path={run_dir}/last.ckpt")


def test_a_ctrl_c_swallowed_by_a_finalizer_is_raised_again_at_the_end_of_the_iteration():
    """Python prints and drops an exception raised inside __del__: a Ctrl-C that lands there must not be lost."""
    from pg_lightning.callbacks import KeepInterrupts

    guard = KeepInterrupts()
    guard.on_train_batch_end(None, None, None, None, 0)  # nothing requested: the iteration ends normally

    class Finalized:
        def __del__(self):
            guard._on_sigint(signal.SIGINT, None)  # the signal arrives while a finalizer runs

    Finalized()  # its KeyboardInterrupt is printed as "Exception ignored" and dropped
    with pytest.raises(KeyboardInterrupt):
        guard.on_train_batch_end(None, None, None, None, 0)


TRAINING_COLUMNS = ("rollout/env_steps", "rollout/return_mean", "rollout/episodes", "loss/policy", "loss/value",
                    "diag/entropy", "diag/ess")


def training_rows(path: Path) -> list[tuple]:
    return [tuple(row.get(c) for c in TRAINING_COLUMNS) for row in read_metrics(path) if row.get("loss/policy")]


@pytest.mark.parametrize("off_policy", ["none", "per_step"])
def test_a_resumed_run_continues_exactly_like_the_uninterrupted_one(tmp_path, off_policy):
    """CartPole's envs are arrays and numbers: the checkpoint holds them mid-episode (as tensors), with the RNG
    stream, V_φ, optimizers, replay and counters, so the iterations after a resume are the uninterrupted run's,
    number for number."""
    common = ["logger=csv", "stop_on_solve=false", "env.num_envs=4", "steps_per_env=64", "estimator=gae",
              f"off_policy={off_policy}", "eval.num_episodes=2", "eval.every_n_iterations=1"]
    whole = train(compose_with(*common, "total_env_steps=1500"), tmp_path / "whole")
    part = train(compose_with(*common, "total_env_steps=700"), tmp_path / "part")
    part_rows = training_rows(tmp_path / "part" / "metrics.csv")
    # Resumed in its own run dir (as train.py does by default), its metrics.csv goes on.
    resumed = train(compose_with(*common, "total_env_steps=1500", f"ckpt_path={tmp_path / 'part' / 'last.ckpt'}"),
                    tmp_path / "part")
    assert part["iterations"] < resumed["iterations"] == whole["iterations"] >= 6
    assert resumed["env_steps"] == whole["env_steps"]
    uninterrupted = training_rows(tmp_path / "whole" / "metrics.csv")
    assert part_rows == uninterrupted[: len(part_rows)]
    assert training_rows(tmp_path / "part" / "metrics.csv") == uninterrupted


def test_the_crash_handler_writes_a_summary_even_when_a_figure_cannot_be_computed(tmp_path):
    """A reward threshold that is not a number (set past validation, from Python) breaks the evaluation's
    comparison; the run fails, and summary.json is still written with the error."""
    import lightning as L

    from pg_lightning import Evaluation, PolicyGradientModule, RunSummary, VectorEnvFactory

    module = PolicyGradientModule(VectorEnvFactory("CartPole-v1", num_envs=2), steps_per_env=32, max_iterations=3)
    module.env.reward_threshold = "abc"
    evaluation = Evaluation(every_n_iterations=1)
    summary = RunSummary(tmp_path / "summary.json", evaluation)
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, callbacks=[evaluation, summary],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError):
        trainer.fit(module)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["status"] == "failed" and "TypeError" in written["error"] and "summary_error" in written


def test_a_resumed_metrics_csv_keeps_the_rows_up_to_the_checkpoint_and_appends(tmp_path):
    """A run killed between two saves logged rows after its last checkpoint: the resumed run replaces them."""
    from pg_lightning.run_dir import RunDirCSVLogger

    (tmp_path / "metrics.csv").write_text("loss/policy,step\n" + "".join(f"{s / 10},{s}\n" for s in range(1, 6)))
    logger = RunDirCSVLogger(tmp_path, resume_step=3)
    logger.log_metrics({"loss/policy": 0.4, "eval/return_mean": 9.0}, step=4)
    logger.save()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert rows[-1]["eval/return_mean"] == "9.0" and rows[0]["loss/policy"] == "0.1"


def test_a_new_run_in_a_dir_with_metrics_keeps_the_old_file_aside(tmp_path):
    from pg_lightning.run_dir import RunDirCSVLogger

    (tmp_path / "metrics.csv").write_text("loss/policy,step\n0.5,1\n")
    logger = RunDirCSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="moved to metrics.previous.csv"):
        logger.log_metrics({"loss/policy": 0.7}, step=1)
    logger.save()
    assert (tmp_path / "metrics.previous.csv").read_text() == "loss/policy,step\n0.5,1\n"
    assert [row["loss/policy"] for row in read_metrics(tmp_path / "metrics.csv")] == ["0.7"]
