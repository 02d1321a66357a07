"""Several processes: 2 ranks x B/2 envs give the gradient of 1 rank x B, and DDP training runs end to end.

The equivalence test spawns two gloo processes (docs/architecture.md, traps 5 and 8: not Lightning's launcher, so
that pytest is not re-run). Each rank takes half of the same batch's envs, computes its share of the
estimate with the all-reduced batch statistics, and the shares are summed, exactly what DDP's gradient
average times W does in training.
"""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import collect_cartpole
from test_train import run_train_py

from pg_lightning import estimators as E
from pg_lightning.distributed import Reduction
from pg_lightning.analysis import estimate_gradient
from pg_lightning.off_policy import OffPolicy
from pg_lightning.value import ValueFunction

CASES = {
    "reinforce": (E.reinforce(), None),
    "reward_to_go": (E.reward_to_go(), None),
    "baseline": (E.baseline(), None),
    "reinforce_baseline": (E.reinforce_baseline(), None),
    "optimal_baseline": (E.optimal_baseline(), None),
    "value_baseline": (E.value_baseline(), None),
    "gae": (E.gae(), None),
    "baseline_normalized": (E.Estimator(name="baseline_normalized", normalize=True), None),
    "gae_normalized": (E.Estimator(name="gae_normalized", baseline="value", gae_lambda=0.9, normalize=True,
                                   value=E.ValueFunctionConfig()), None),
    "trajectory_self_normalized": (E.baseline(), OffPolicy(kind="trajectory", self_normalize=True)),
    "per_step_kl": (E.reward_to_go(), OffPolicy(kind="per_step", kl_coef=0.5)),
    "clipped": (E.gae(), OffPolicy(kind="clipped")),
}


def make_problem():
    """A CartPole batch of 8 envs x 100 steps from θ_b, and a policy θ moved away from it (for the ratios)."""
    behaviour, batch = collect_cartpole(steps_per_env=100)
    policy = copy.deepcopy(behaviour)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    value_fn = ValueFunction(4, E.ValueFunctionConfig())
    return behaviour, policy, value_fn, batch


def gradient(name, problem, envs=slice(None), reduction=Reduction()):
    behaviour, policy, value_fn, batch = problem
    estimator, off_policy = CASES[name]
    model = policy if off_policy is not None else behaviour
    grads = estimate_gradient(model, batch.select_envs(envs), estimator, value_fn, off_policy, reduction)
    return torch.cat([g.flatten() for g in grads])


def rank_main(rank: int, world_size: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        problem = make_problem()
        half = problem[3].num_envs // world_size
        envs = slice(rank * half, (rank + 1) * half)
        results = {}
        for name in CASES:
            share = gradient(name, problem, envs, Reduction(world_size))
            dist.all_reduce(share)  # the sum of the ranks' shares = DDP's average x W
            results[name] = share.tolist()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "gradients.json"
    mp.spawn(rank_main, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_two_ranks_with_half_the_envs_give_the_one_rank_gradient(two_rank_gradients, name):
    one_rank = gradient(name, make_problem())
    two_ranks = torch.tensor(two_rank_gradients[name])
    assert one_rank.abs().max() > 1e-3
    torch.testing.assert_close(two_ranks, one_rank, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline", "gae_normalized", "optimal_baseline"])
def test_local_statistics_would_not_give_the_one_rank_gradient(name):
    """The check has teeth: each half with its own statistics (no all-reduce) differs from the whole batch."""
    problem = make_problem()
    one_rank = gradient(name, problem)
    local_shares = [gradient(name, problem, slice(0, 4)), gradient(name, problem, slice(4, 8))]
    # Without reductions each half is a full estimate of its own, so the rank average plays DDP's role.
    assert not torch.allclose((local_shares[0] + local_shares[1]) / 2, one_rank, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_and_reports_world_size(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train_py("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=csv",
                          "total_env_steps=20000", "steps_per_env=256", "stop_on_solve=false",
                          "eval.num_episodes=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    # Each iteration collects 2 ranks x 16 envs x 256 steps (minus reset steps), all counted.
    assert summary["env_steps"] >= 20000 and summary["iterations"] == 3
    assert result.stdout.count("finished:") == 1, "one summary line, from rank 0"
