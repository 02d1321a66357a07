"""Every config file composes and instantiates; defaults are what the README says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from pg_lightning import Estimator, VectorEnvFactory
from pg_lightning.off_policy import OffPolicy
from pg_lightning.policies import is_recurrent
from pg_lightning.run import make_loggers
from pg_lightning.run_dir import RunDirCSVLogger

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("env", "policy", "estimator", "optimizer", "off_policy", "trainer", "logger")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_required_options_exist():
    assert {"cartpole", "acrobot", "pendulum", "lunar_lander", "inverted_pendulum", "half_cheetah", "hopper",
            "masked_cartpole", "walker2d"} <= set(options("env"))
    assert {"reinforce", "reward_to_go", "baseline"} <= set(options("estimator"))
    assert {"adam", "sgd"} <= set(options("optimizer"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))
    assert {"none", "trajectory", "per_step", "clipped"} <= set(options("off_policy"))


def test_defaults():
    cfg = compose_with()
    assert cfg.env.id == "CartPole-v1"
    assert cfg.estimator.name == "baseline"
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.mode == "offline"
    assert isinstance(cfg.seed, int) and cfg.total_env_steps > 0


@pytest.mark.parametrize("name", options("env"))
def test_every_env_config_instantiates_and_builds_envs(name):
    cfg = compose_with(f"env={name}")
    factory = instantiate(cfg.env)
    assert isinstance(factory, VectorEnvFactory) and factory.id == cfg.env.id
    assert cfg.steps_per_env >= 1
    observation_space, action_space = factory.spaces()
    assert isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box))
    policy = instantiate(compose_with().policy)(observation_space, action_space)
    assert isinstance(policy(torch.zeros(1, *observation_space.shape)), torch.distributions.Distribution)


@pytest.mark.parametrize("name", options("policy"))
def test_every_policy_config_instantiates(name):
    cfg = compose_with(f"policy={name}")
    space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8) if name == "cnn" else gym.spaces.Box(-1, 1, (4,))
    policy = instantiate(cfg.policy)(space, gym.spaces.Discrete(2))
    if is_recurrent(policy):  # one step of 3 envs from the initial state
        dist, _ = policy.step(torch.zeros(3, *space.shape), policy.initial_state(3))
    else:
        dist = policy(torch.zeros(3, *space.shape))
    assert dist.sample().shape == (3,)


@pytest.mark.parametrize("name", options("estimator"))
def test_every_estimator_config_instantiates(name):
    estimator = instantiate(compose_with(f"estimator={name}").estimator)
    assert isinstance(estimator, Estimator) and estimator.name == name


@pytest.mark.parametrize("name", options("optimizer"))
def test_every_optimizer_config_instantiates(name):
    cfg = compose_with(f"optimizer={name}")
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    # The natural gradient writes its whole step into .grad and applies it with SGD at lr 1.
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.get("lr", 1.0)


@pytest.mark.parametrize("name", options("off_policy"))
def test_every_off_policy_config_instantiates_and_user_overrides_win(name):
    off_policy = instantiate(compose_with(f"off_policy={name}").off_policy)
    assert isinstance(off_policy, OffPolicy) and off_policy.kind == name
    cfg = compose_with(f"off_policy={name}", "estimator=reward_to_go", "steps_per_env=7")
    assert cfg.estimator.name == "reward_to_go" and cfg.steps_per_env == 7


def test_the_ppo_overlay_brings_the_clipped_loss_gae_and_its_rollout_length():
    cfg = compose_with("+experiment=ppo")
    assert cfg.off_policy.kind == "clipped" and cfg.estimator.name == "gae" and cfg.steps_per_env == 32
    assert cfg.env.id == "CartPole-v1"
    # off_policy=clipped alone selects the loss only: the estimator and T stay the defaults.
    alone = compose_with("off_policy=clipped")
    assert alone.off_policy.kind == "clipped" and alone.estimator.name == "baseline" and alone.steps_per_env == 1024


def test_estimator_and_trainer_files_inherit_from_one_base():
    """Each estimator file sets only what differs from reinforce.yaml; trainer/ddp only what differs from default."""
    for name in options("estimator"):
        text = (CONF_DIR / "estimator" / f"{name}.yaml").read_text()
        if name != "reinforce":
            assert "defaults:" in text and "_target_: pg_lightning.estimators" not in text, name
        composed = instantiate(compose_with(f"estimator={name}").estimator)
        assert composed.name == name
        # The variance tool reads the files without Hydra: it must resolve the inheritance the same way.
        from pg_lightning.variance import load_estimator

        assert load_estimator(name, composed.gamma) == composed
    assert "defaults:\n  - default" in (CONF_DIR / "trainer" / "ddp.yaml").read_text()


@pytest.mark.parametrize("name", options("trainer"))
def test_every_trainer_config_instantiates(name, tmp_path):
    trainer = instantiate(compose_with(f"trainer={name}").trainer, logger=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer, Trainer)
    assert trainer.max_epochs == -1, "the env-step budget, not an epoch count, ends training"


@pytest.mark.parametrize("name", options("logger"))
def test_every_logger_config_instantiates(name, tmp_path):
    loggers = make_loggers(compose_with(f"logger={name}").logger, tmp_path)
    kinds = {type(logger) for logger in loggers}
    expected = {"wandb": {WandbLogger, RunDirCSVLogger}, "csv": {RunDirCSVLogger}, "none": set()}[name]
    assert kinds == expected
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            assert Path(logger.log_dir) == tmp_path, "metrics.csv lands in the run dir itself"


def test_masked_cartpole_hides_the_velocities():
    full = instantiate(compose_with("env=cartpole").env).make(num_envs=2)
    masked = instantiate(compose_with("env=masked_cartpole").env).make(num_envs=2)
    full_obs, _ = full.reset(seed=3)
    masked_obs, _ = masked.reset(seed=3)
    assert masked.single_observation_space.shape == (2,)
    np.testing.assert_array_equal(masked_obs, full_obs[:, [0, 2]])
    full_obs, *_ = full.step(np.array([1, 0]))
    masked_obs, *_ = masked.step(np.array([1, 0]))
    np.testing.assert_array_equal(masked_obs, full_obs[:, [0, 2]])


def test_unknown_env_id_names_the_id_and_suggests_close_ones():
    with pytest.raises(ValueError, match=r"env\.id 'CartPole-v7'.*CartPole-v1"):
        VectorEnvFactory("CartPole-v7")


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_overlay_composes_and_instantiates(name):
    cfg = compose_with(f"+experiment={name}")
    assert isinstance(instantiate(cfg.env), VectorEnvFactory)
    assert isinstance(instantiate(cfg.estimator), Estimator)
    assert cfg.steps_per_env * cfg.env.num_envs <= cfg.total_env_steps


README_PLACEHOLDERS = ("<", "NAME", "group=option", "key=value", "[same", "overrides]")


def readme_commands() -> list[str]:
    """Every ``python train.py ...`` command line of the README (code blocks and inline), without its comment."""
    readme = (CONF_DIR.parent / "README.md").read_text()
    lines = {m.split("#")[0].strip() for m in re.findall(r"python train\.py([^`\n]*)", readme)}
    return sorted(line for line in lines if not any(p in line for p in README_PLACEHOLDERS))


def readme_overrides(line: str) -> list[str]:
    """The overrides of one command as a single run: a sweep's first value of each list, Hydra's own keys left out."""
    overrides = [t for t in shlex.split(line) if t != "-m" and not t.startswith("hydra")]
    return [re.sub(r"=([^\[\],]+),.*$", r"=\1", t) if not t.endswith("]") else t for t in overrides]


def test_every_train_command_in_the_readme_composes_without_plus():
    """Keys the README documents are settable as written (no `+` needed); its one refused example is the last."""
    commands = readme_commands()
    assert len(commands) >= 30
    refused = []
    for line in commands:
        try:
            compose_with(*readme_overrides(line))
        except Exception as error:  # noqa: BLE001 - collected, then compared with the README's refusal table
            refused.append((line, type(error).__name__))
    assert refused == [("estimator=ppo", "MissingConfigException")], refused


def test_a_key_that_needs_plus_would_be_caught():
    with pytest.raises(Exception, match="not in struct|Could not override"):
        compose_with(*readme_overrides("env.no_such_key=1"))
