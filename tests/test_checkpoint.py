"""Checkpoints hold no code: env state as tensors and numbers, and a hostile file is refused in one line."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_configs import compose_with
from test_train import REPO

from pg_lightning import CategoricalMLP, GaussianMLP, RolloutCollector, VectorEnvFactory
from pg_lightning.checkpoint import UnsafeCheckpointError, check_checkpoint, env_state, restore_env_state
from pg_lightning.run import train


def save_and_load(obj, path: Path):
    """Through a real file, loaded the way resume loads it: weights only."""
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "factory",
    [
        VectorEnvFactory("CartPole-v1", num_envs=3),  # the native vector env
        VectorEnvFactory("Acrobot-v1", num_envs=2),  # a synchronous vector env, each copy in 3 wrappers
        VectorEnvFactory("CartPole-v1", num_envs=2, observation_indices=[0, 2]),  # a vector wrapper with a lambda
        VectorEnvFactory("Pendulum-v1", num_envs=2),  # Box actions
    ],
    ids=lambda f: f"{f.id}{'-masked' if f.observation_indices else ''}",
)
def test_a_collector_restored_from_its_saved_state_continues_exactly(factory, tmp_path):
    """Collect, save the collector mid-episode, collect on; a fresh collector restored from the file collects
    exactly the same next batch, observation for observation."""
    obs_space, act_space = factory.spaces()
    policy = (CategoricalMLP(obs_space.shape[0], act_space.n) if isinstance(act_space, gym.spaces.Discrete)
              else GaussianMLP(obs_space.shape[0], act_space.shape[0]))
    first = RolloutCollector(factory.make(), steps_per_env=37, seed=5)
    first.collect(policy)
    state = save_and_load(first.state_dict(), tmp_path / "collector.pt")
    assert isinstance(state["envs"], list), "these envs are made of arrays and numbers"
    rng = torch.get_rng_state()
    expected = first.collect(policy)

    second = RolloutCollector(factory.make(), steps_per_env=37, seed=123)  # another seed: all of it must come from the file
    assert second.load_state_dict(state)
    torch.set_rng_state(rng)
    resumed = second.collect(policy)
    for name in ("obs", "act", "rew", "terminated", "truncated", "valid"):
        assert torch.equal(getattr(resumed, name), getattr(expected, name)), name


def test_an_unrestored_collector_would_differ(tmp_path):
    """The test above can fail: without the envs' state the next batch is another one."""
    factory = VectorEnvFactory("Acrobot-v1", num_envs=2)
    policy = CategoricalMLP(6, 3)
    first = RolloutCollector(factory.make(), steps_per_env=37, seed=5)
    first.collect(policy)
    state = save_and_load(first.state_dict(), tmp_path / "collector.pt")
    expected = first.collect(policy)
    acrobot = next(entry for entry in state["envs"] if entry["type"] == "AcrobotEnv")
    acrobot["attrs"]["state"]["value"] += 0.1  # one sub-env's physical state, nudged
    second = RolloutCollector(factory.make(), steps_per_env=37, seed=5)
    assert second.load_state_dict(state)
    assert not torch.equal(second.collect(policy).obs, expected.obs)


class EnvWithAWorld(gym.Env):
    """An env whose state lives in an object that is not arrays and numbers (like a Box2D world)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.world = object()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(2, dtype=np.float32), 1.0, False, False, {}


def test_an_env_whose_state_is_not_arrays_and_numbers_is_not_saved_and_resume_resets_it():
    envs = gym.vector.SyncVectorEnv([EnvWithAWorld, EnvWithAWorld])
    assert env_state(envs) is None
    collector = RolloutCollector(envs, steps_per_env=4, seed=0)
    collector.collect(CategoricalMLP(2, 2))
    state = collector.state_dict()
    assert state["envs"] is None and "obs" not in state
    fresh = RolloutCollector(gym.vector.SyncVectorEnv([EnvWithAWorld, EnvWithAWorld]), steps_per_env=4, seed=0)
    assert not fresh.load_state_dict(state) and fresh.env_steps == state["env_steps"]


def test_a_state_saved_from_other_envs_is_not_restored():
    cartpole = VectorEnvFactory("CartPole-v1", num_envs=2).make()
    cartpole.reset(seed=0)
    acrobot = VectorEnvFactory("Acrobot-v1", num_envs=2).make()
    assert not restore_env_state(acrobot, env_state(cartpole))


class WritesAFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if the loader runs the pickle's code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


def refused_by_train_py(ckpt: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "logger=none", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("where", ["inside a real checkpoint", "the whole file"])
def test_a_checkpoint_with_a_malicious_pickle_is_refused_in_one_line_and_runs_nothing(where, tmp_path):
    marker = tmp_path / "pwned"
    if where == "the whole file":
        payload = WritesAFile(marker)
    else:  # where the envs' pickled bytes used to be, in an otherwise genuine checkpoint
        train(compose_with("logger=none", "env.num_envs=2", "steps_per_env=50", "total_env_steps=200"), tmp_path / "real")
        payload = torch.load(tmp_path / "real" / "last.ckpt", weights_only=True)
        payload["pg_lightning"]["collector"]["envs"] = WritesAFile(marker)
    ckpt = tmp_path / "hostile.ckpt"
    torch.save(payload, ckpt)
    # The payload works: an unrestricted load would create the file (checked on a copy, then removed).
    torch.load(ckpt, weights_only=False)
    assert marker.exists()
    marker.unlink()

    result = refused_by_train_py(ckpt, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert not marker.exists(), "loading the checkpoint ran its code"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith(f"error: ckpt_path '{ckpt}' was refused: it holds objects that loading would have to run code for")
    assert not (tmp_path / "run" / "summary.json").exists(), "refused before anything ran"


def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(UnsafeCheckpointError, match=r"^ckpt_path '.*notes.ckpt' is not a readable checkpoint"):
        check_checkpoint(path)


def test_a_training_checkpoint_loads_weights_only_with_its_envs(tmp_path):
    summary = train(compose_with("logger=none", "env.num_envs=2", "steps_per_env=50", "total_env_steps=200"), tmp_path)
    checkpoint = torch.load(Path(summary["checkpoint"]), weights_only=True)
    collector = checkpoint["pg_lightning"]["collector"]
    assert collector["envs"][0]["type"] == "CartPoleVectorEnv" and collector["obs"].shape == (2, 4)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
