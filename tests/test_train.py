"""End-to-end: train.py and the plain-Python plug-in, with their outputs."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_configs import compose_with

from pg_lightning.run import ConfigError, train

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "env_id", "estimator", "off_policy", "seed", "world_size", "env_steps", "iterations", "wall_s", "env_steps_per_s",
    "train_return_mean", "eval_return_mean", "reward_threshold", "solved", "solved_at_env_steps", "metrics_csv",
}


def run_train_py(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


# Lines the libraries print on every run that a default run must not show (and `verbose=true` brings back).
LIBRARY_NOISE = (
    "litlogger",  # Lightning's advertisement
    "LeafSpec",  # a torch deprecation warning raised inside Lightning
    "exists and is not empty",  # Lightning's CSV writer about the run dir
    "`weights_only` was not set",  # Lightning's checkpoint saving
    "GPU available",  # Lightning's hardware summary
    "wandb:",  # W&B's banner and footer
)


@pytest.mark.slow
def test_a_default_run_prints_the_progress_the_run_dir_and_the_result_only(tmp_path):
    run_dir = tmp_path / "quiet"
    result = run_train_py("total_env_steps=20000", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert [noise for noise in LIBRARY_NOISE if noise in output] == [], output[-3000:]
    assert result.stdout.splitlines()[0] == f"run dir: {run_dir}"
    assert result.stdout.splitlines()[-1].startswith("finished: CartPole-v1 baseline seed=0 env_steps=")
    assert "steps/s" not in result.stderr, "the progress bar stays quiet when stderr is a pipe, not a terminal"
    assert (run_dir / "wandb").is_dir(), "W&B still records the run, offline"
    # The check can fail: with verbose=true the libraries' lines are back.
    loud = run_train_py("total_env_steps=20000", "verbose=true", f"hydra.run.dir={tmp_path / 'loud'}", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert {"litlogger", "GPU available", "wandb:"} <= {noise for noise in LIBRARY_NOISE if noise in loud.stdout + loud.stderr}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("budget", "iterations", "shown"), [(2000, None, "/2.00k"), (None, 3, "3/3")])
def test_the_progress_bar_counts_the_budget_on_a_terminal(budget, iterations, shown):
    """Env steps out of total_env_steps, or iterations out of max_iterations, with the rate and the return."""
    import lightning as L

    from pg_lightning import EnvStepProgressBar, PolicyGradientModule, VectorEnvFactory

    screen = FakeTerminal()
    module = PolicyGradientModule(VectorEnvFactory("CartPole-v1", num_envs=2), steps_per_env=50,
                                  total_env_steps=budget, max_iterations=iterations)
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, callbacks=[EnvStepProgressBar(file=screen)],
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module)
    lines = [line for line in screen.getvalue().split("\r") if line.strip()]
    # Mid-run lines show the position out of the budget (the last batch may overshoot an env-step budget).
    assert any(line.startswith("CartPole-v1:") and shown in line and "return=" in line for line in lines), lines
    assert ("steps/s" if budget else "it/s") in lines[-1], lines


@pytest.mark.slow
def test_train_py_honours_the_run_dir_and_writes_summary_and_csv(tmp_path):
    run_dir = tmp_path / "my_run"
    result = run_train_py("total_env_steps=20000", "stop_on_solve=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["env_id"] == "CartPole-v1" and summary["estimator"] == "baseline" and summary["world_size"] == 1
    assert summary["status"] == "finished" and summary["seed"] == 0
    # A whole-episode batch has at least 16 x 1024 steps: the budget is passed in the 2nd iteration, where it stops.
    assert 20000 <= summary["env_steps"] and summary["iterations"] == 2
    with open(summary["metrics_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert Path(summary["metrics_csv"]).parent == run_dir
    env_steps = [float(r["rollout/env_steps"]) for r in rows if r.get("rollout/return_mean")]
    assert len(env_steps) == 2 and env_steps[-1] == summary["env_steps"]
    assert 16 * 1024 <= env_steps[0] < 20000, "training stops at the first iteration past the budget"
    assert any(r.get("eval/return_mean") for r in rows), "the final evaluation is logged"
    # The default logger is W&B in offline mode: its files are in the run dir, nothing was sent.
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_bad_value_gives_one_clear_line_and_exit_code_2(tmp_path):
    result = run_train_py("estimator.gamma=1.5", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "estimator.gamma" in error_lines[0] and "1.5" in error_lines[0]


@pytest.mark.slow
def test_default_config_solves_cartpole_and_stops(tmp_path):
    summary = train(compose_with("logger=csv"), tmp_path)
    assert summary["solved"] is True and summary["eval_return_mean"] >= 475
    assert summary["solved_at_env_steps"] == summary["env_steps"] < compose_with().total_env_steps
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "estimator", "env_id"),
    [
        (["estimator=reinforce"], "reinforce", "CartPole-v1"),
        (["estimator=reward_to_go", "optimizer=sgd"], "reward_to_go", "CartPole-v1"),
        (["env=pendulum", "steps_per_env=200", "env.num_envs=4"], "baseline", "Pendulum-v1"),
        (["env=masked_cartpole", "policy=linear"], "gae_shared_step", "CartPole-v1"),  # its config picks PPO with GAE
    ],
)
def test_presets_and_envs_run(tmp_path, overrides, estimator, env_id):
    cfg = compose_with(*overrides, "logger=none", "total_env_steps=2000", "steps_per_env=100")
    summary = train(cfg, tmp_path)
    assert summary["estimator"] == estimator and summary["env_id"] == env_id
    assert summary["env_steps"] >= 2000 and summary["metrics_csv"] is None
    assert summary["eval_return_mean"] is not None


def test_config_errors_name_key_and_value(tmp_path):
    for override, pattern in [
        ("env.num_envs=0", r"env\.num_envs.*0"),
        ("steps_per_env=-5", r"steps_per_env.*-5"),
        ("env.id=CartPol-v1", r"env\.id 'CartPol-v1'.*CartPole-v1"),
        ("estimator.baseline=median", r"estimator\.baseline.*median"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            train(compose_with(override, "logger=none"), tmp_path)


@pytest.mark.slow
def test_readme_plugin_example_runs(tmp_path, monkeypatch):
    """The README's plain-Python example, executed as written (with a smaller budget)."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README has the plug-in example"
    code = match.group(1).replace("total_env_steps=300_000", "total_env_steps=20_000")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["module"].env_steps >= 20_000


def test_readme_api_example_runs():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README has the analysis API example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    grad, policy = namespace["grad"], namespace["policy"]
    assert [g.shape for g in grad] == [p.shape for p in policy.parameters()]
    assert namespace["batch"].num_envs == 16 and any(g.abs().sum() > 0 for g in grad)


def test_max_iterations_stops_training_after_that_many_batches(tmp_path):
    cfg = compose_with("logger=none", "env.num_envs=2", "steps_per_env=50", "max_iterations=3", "stop_on_solve=false",
                       "eval.num_episodes=2")
    summary = train(cfg, tmp_path)
    assert summary["iterations"] == 3 and summary["env_steps"] < cfg.total_env_steps
