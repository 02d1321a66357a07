"""Property: any combination of overrides either trains a few iterations or is refused with one clear line."""

from __future__ import annotations

import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_configs import compose_with

from pg_lightning.run import ConfigError, train

def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` 9 times in 10, else ``invalid``: most combinations should train, some must be refused."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 0 else valid)


anything = st.one_of(st.floats(-2.0, 2.0, allow_nan=False), st.integers(-2, 2), st.just(float("inf")))
overrides = st.fixed_dictionaries(
    {
        "env": st.sampled_from(["cartpole", "acrobot", "pendulum", "masked_cartpole"]),
        "estimator": st.sampled_from(
            ["reinforce", "reinforce_baseline", "reward_to_go", "baseline", "optimal_baseline", "value_baseline", "gae"]
        ),
        "optimizer": st.sampled_from(["adam", "sgd"]),
        "policy": st.sampled_from(["mlp", "linear"]),
        "estimator.gamma": mostly(st.floats(0.0, 1.0), anything),
        "estimator.normalize": st.booleans(),
        "optimizer.lr": mostly(st.floats(1e-4, 0.1), anything),
        "env.num_envs": mostly(st.integers(1, 4), st.integers(-2, 0)),
        "steps_per_env": mostly(st.integers(1, 40), st.integers(-2, 0)),
        "total_env_steps": mostly(st.integers(160, 400), st.integers(-1, 159)),
    },
    optional={
        "estimator.gae_lambda": mostly(st.floats(0.0, 1.0), anything),
        "max_skipped_updates": st.integers(0, 3),
        "off_policy": st.sampled_from(["none", "trajectory", "per_step", "clipped"]),
        "off_policy.minibatches": mostly(st.integers(1, 3), st.integers(-1, 0)),
    },
)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("a run took longer than 120 s")


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides)
def test_random_overrides_train_or_fail_clearly(tmp_path_factory, overrides):
    args = [f"{key}={value}" for key, value in overrides.items()]
    cfg = compose_with(*args, "logger=none", "eval.num_episodes=2", "eval.every_n_iterations=1")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(120)
    try:
        summary = train(cfg, tmp_path_factory.mktemp("run"))
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and any(key.split(".")[-1] in message for key in [*overrides, "action space"]), message
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert summary["status"] == "finished" and summary["iterations"] >= 1
    assert summary["env_steps"] >= cfg.total_env_steps
