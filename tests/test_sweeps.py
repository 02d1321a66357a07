"""Hydra sweeps, their W&B runs (offline files read back) and the learning-curve plot of a sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_configs import CONF_DIR, compose_with
from test_train import run_train_py

from pg_lightning import plot
from pg_lightning.run import train

ESTIMATORS, SEEDS = ("reinforce", "reward_to_go", "baseline"), (0, 1, 2)
TINY = ["env.num_envs=2", "steps_per_env=100", "total_env_steps=400", "eval.num_episodes=2", "eval.every_n_iterations=1"]


def wandb_records(path: Path):
    """The protobuf records of a W&B ``run-*.wandb`` file (its LevelDB-style log: 32 KiB blocks of records with
    a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST), parsed with wandb's own message class."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            yield record
        pending = chunk if kind == 2 else pending + chunk if kind == 3 else b""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_train_py("-m", f"estimator={','.join(ESTIMATORS)}", f"seed={','.join(map(str, SEEDS))}", *TINY,
                          f"hydra.sweep.dir={cwd / 'multirun'}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "multirun"


@pytest.mark.slow
def test_a_sweep_of_3_estimators_x_3_seeds_writes_9_run_dirs_with_summaries(sweep_dir):
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    assert len(summaries) == 9
    assert {(s["estimator"], s["seed"]) for s in summaries} == {(e, s) for e in ESTIMATORS for s in SEEDS}
    assert all(s["status"] == "finished" for s in summaries)


@pytest.mark.slow
def test_each_sweep_job_is_its_own_offline_wandb_run_grouped_by_the_sweep(sweep_dir):
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 9, "one W&B run per job: wandb.finish() between jobs"
    for path in runs:
        job_dir = path.parents[2]
        summary = json.loads((job_dir / "summary.json").read_text())
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == f"sweep {sweep_dir}"
        assert f"estimator={summary['estimator']}" in run.display_name and f"seed={summary['seed']}" in run.display_name
        assert {"CartPole-v1", summary["estimator"]} <= set(run.tags)
        config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for u in r.config.update}
        assert config["seed"] == summary["seed"] and config["estimator"]["name"] == summary["estimator"]
        steps_of = {r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
        assert steps_of["rollout/*"] == steps_of["eval/*"] == "rollout/env_steps"
        history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        returns = [float(h["rollout/return_mean"]) for h in history if "rollout/return_mean" in h]
        assert len(returns) == summary["iterations"]
        assert float([h for h in history if "eval/return_mean" in h][-1]["eval/return_mean"]) == summary["eval_return_mean"]
        assert any(json.loads(h.get("eval/returns/_type", "null")) == "histogram" for h in history)


@pytest.mark.slow
def test_plot_draws_one_line_per_estimator_with_all_seeds(sweep_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert plot.main([str(sweep_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    for estimator in ESTIMATORS:
        assert f"estimator={estimator}" in table
    curves = [plot.load_run(run, "estimator", "eval/return_mean") for run in plot.find_runs([sweep_dir])]
    groups = plot.aggregate(curves)
    assert {label: len(runs) for label, (_, _, _, runs) in groups.items()} == {f"estimator={e}": 3 for e in ESTIMATORS}
    # Grouping by a config key reads each run's saved Hydra config.
    assert plot.main([str(sweep_dir), "--by", "estimator.reward_to_go", "--out", str(tmp_path / "rtg.png")]) == 0
    assert "estimator.reward_to_go=False" in capsys.readouterr().out


def test_held_values_and_group_statistics():
    def curve(steps, values):
        return plot.RunCurve(Path("r"), "g", np.array(steps, float), np.array(values, float), {})

    grid = np.array([0.0, 5.0, 10.0, 20.0, 40.0])
    held = plot.held_values(curve([5, 20], [1.0, 3.0]), grid)
    assert math.isnan(held[0]) and held[1:].tolist() == [1.0, 1.0, 3.0, 3.0]
    (grid, mean, std, runs), = plot.aggregate([curve([10, 20], [2.0, 4.0]), curve([10, 40], [4.0, 8.0])], 5).values()
    assert grid.tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert mean[1:].tolist() == [3.0, 4.0, 4.0, 6.0] and std[1] == 1.0


def test_plot_skips_a_run_without_metrics_and_draws_the_others(sweep_dir, tmp_path, capsys):
    lone = tmp_path / "no_metrics_run"
    lone.mkdir()
    (lone / "summary.json").write_text(json.dumps({"estimator": "reinforce", "metrics_csv": None}))
    assert plot.main([str(sweep_dir), str(lone), "--out", str(tmp_path / "c.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: skipped: run {lone} has no metrics.csv") and captured.err.count("\n") == 1
    assert (tmp_path / "c.png").is_file()


def test_plot_refuses_paths_without_runs_in_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("override", "target"),
    [
        ("hydra/launcher=parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("hydra/sweeper=lr_batch_search", "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"),
    ],
)
def test_launcher_and_sweeper_configs_compose(override, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override], return_hydra_config=True)
    group = override.split("=")[0].split("/")[1]
    assert cfg.hydra[group]._target_ == target
    if group == "sweeper":
        assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "steps_per_env"}


@pytest.mark.slow
def test_video_writes_an_eval_episode_to_the_run_dir_and_the_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    summary = train(compose_with("video=true", *TINY), tmp_path / "run")
    assert (tmp_path / "run" / "video.mp4").stat().st_size > 1000
    videos = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/videos/eval/*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    assert records and records[-1].WhichOneof("record_type") == "exit", "train() returned before the run file was closed"
    logged = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
              for r in records if r.WhichOneof("record_type") == "history"]
    video = next(h for h in logged if "eval/video/_type" in h)
    assert json.loads(video["eval/video/_type"]) == "video-file"
    assert float(video["rollout/env_steps"]) == summary["env_steps"]


@pytest.mark.slow
def test_video_needs_no_wandb(tmp_path):
    train(compose_with("video=true", "logger=csv", *TINY), tmp_path / "run")
    assert (tmp_path / "run" / "video.mp4").stat().st_size > 1000
    assert not (tmp_path / "run" / "wandb").exists()


def test_video_without_the_rendering_extra_is_refused_in_one_line(tmp_path, monkeypatch):
    import importlib.util

    from pg_lightning.validation import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moviepy" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r'^video=true needs the rendering extra .*pip install -e "\.\[video\]"$'):
        train(compose_with("video=true", *TINY), tmp_path)
