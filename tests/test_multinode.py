"""Two "nodes" on one host: `trainer=ddp trainer.num_nodes=2 trainer.devices=1` over gloo gives the one-process gradient.

The test starts two processes by hand, as a cluster would start one per node, each with ``NODE_RANK`` (0, 1),
``MASTER_ADDR``, ``MASTER_PORT`` and nothing else: Lightning's ``LightningEnvironment`` then takes the global
rank from ``NODE_RANK`` (node_rank x devices + local_rank) and, with one device per node, starts no process of its
own. SLURM, torchelastic, LSF and MPI variables are removed from the children's environment, so that none of
those cluster environments is detected instead.

Each node composes the config of the user path (``trainer=ddp`` and the estimator preset), builds the run with
``pg_lightning.run.build`` and fits one iteration on its half of the envs of test_distributed's fixed CartPole
batch (8 envs x 100 steps). The policy gradient it steps with, after DDP's all-reduce, must equal the gradient of
one process with the whole batch (``test_distributed.gradient``), for every on-policy case of that test.

Run as a script, this file is one node: ``python tests/test_multinode.py OUT_JSON RUN_DIR CASE...``.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # as in train.py: no collections while torch and Lightning load (seconds per node on 2 cores)

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import CASES, free_port, gradient, make_problem  # tests/ is on sys.path: pytest's, a script's

if __name__ == "__main__":
    gc.freeze()
    gc.enable()

REPO = Path(__file__).resolve().parents[1]
# One-iteration runs whose end-of-run work (evaluation, checkpoint) is as small as it can be.
BASE_OVERRIDES = (
    "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
    "logger=none", "max_iterations=1", "stop_on_solve=false", "eval.num_episodes=1",
    "optimizer=sgd", "optimizer.lr=1.0", "env.num_envs=4",
)
# The cases of test_distributed whose first iteration is one step on the estimator's gradient; the importance-
# sampled kinds take minibatch steps on a replay, and test_distributed covers their reductions.
ON_POLICY = [name for name, (_, off_policy) in CASES.items() if off_policy is None]
# Removed from the children's environment: variables that make Lightning pick another cluster environment
# (SLURM_NTASKS, TORCHELASTIC_RUN_ID, LSB_*/JSM_*, MPI) or that a launcher sets for its ranks.
FOREIGN_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_", "OMPI_", "PMI_", "PMIX_", "MPI_")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                  "MASTER_PORT")
NODE_TIMEOUT_S = 120  # a hang (e.g. a collective one node never reaches) fails the test instead of blocking CI


def estimator_overrides(name: str) -> list[str]:
    preset = CASES[name][0]
    if name in ("baseline_normalized", "gae_normalized"):
        base = "baseline" if preset.baseline == "average" else "gae"
        overrides = [f"estimator={base}", f"estimator.name={name}", "estimator.normalize=true"]
        return overrides + ([f"estimator.gae_lambda={preset.gae_lambda}"] if base == "gae" else [])
    return [f"estimator={name}"]


def node_main(out_path: str, run_dir: str, cases: list[str]) -> None:
    """One node: for each case, build the run as train.py does, fit one iteration on this rank's envs."""
    from hydra.utils import instantiate
    from test_configs import compose_with

    from pg_lightning.run import build

    behaviour, _, value_fn, batch = make_problem()
    results = {}
    for name in cases:
        cfg = compose_with(*BASE_OVERRIDES, *estimator_overrides(name))
        assert instantiate(cfg.estimator) == CASES[name][0], name
        run = build(cfg, Path(run_dir) / name)
        module, trainer = run.module, run.trainer
        module.policy = copy.deepcopy(behaviour)
        if module.value_fn is not None:
            module.value_fn = copy.deepcopy(value_fn)

        def half_batch(module=module):
            rank, world = module.global_rank, module.trainer.world_size
            half = batch.num_envs // world
            return batch.select_envs(slice(rank * half, (rank + 1) * half))

        module.collect_batch = half_batch
        policy_grads = []
        guarded_steps = module._guarded_steps

        def recording_steps(module=module, guarded_steps=guarded_steps, grads=policy_grads):
            policy_step, value_step = guarded_steps()

            def recording_policy_step(loss, before_step=None):
                stepped = policy_step(loss, before_step)
                # .grad after DDP's all-reduce, as the optimizer stepped with it
                grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters()]).tolist())
                return stepped

            return recording_policy_step, value_step

        module._guarded_steps = recording_steps
        trainer.fit(module)
        environment = trainer.strategy.cluster_environment
        results[name] = {
            "gradient": policy_grads,
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "cluster_environment": type(environment).__name__,
            "backend": torch.distributed.get_backend(),
            "iterations": module.iterations,
            "env_steps": module.env_steps,
        }
    Path(out_path).write_text(json.dumps(results))


def node_env(node_rank: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES) and k not in RANK_VARIABLES}
    env.update(
        NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def run_nodes(tmp_path: Path, cases: list[str], timeout_s: float = NODE_TIMEOUT_S) -> list[dict]:
    """Start node 0 and node 1, wait for both (killing both on a failure or a hang), return their results."""
    port = free_port()
    procs, outs, logs = [], [], []
    for node_rank in (0, 1):
        out, log = tmp_path / f"node{node_rank}.json", tmp_path / f"node{node_rank}.log"
        with open(log, "w") as log_file:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, str(out), str(tmp_path / f"run{node_rank}"), *cases],
                cwd=tmp_path, env=node_env(node_rank, port), stdout=log_file, stderr=subprocess.STDOUT,
            ))
        outs.append(out)
        logs.append(log)
    deadline = time.monotonic() + timeout_s
    try:
        while None in [p.poll() for p in procs]:  # a list, not any(): every node is polled each time
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                reason = f"node {failed[0]} exited with {procs[failed[0]].returncode}" if failed else "timed out"
                pytest.fail(f"{reason}; node logs:\n" + "\n".join(tail(log) for log in logs))
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"node {i} exited with {p.returncode}:\n{tail(logs[i])}"
    return [json.loads(out.read_text()) for out in outs]


def tail(log: Path, chars: int = 3000) -> str:
    return f"--- {log.name}\n" + log.read_text()[-chars:]


@pytest.fixture(scope="module")
def two_node_results(tmp_path_factory):
    return run_nodes(tmp_path_factory.mktemp("multinode"), ON_POLICY)


@pytest.mark.slow
def test_each_node_is_one_rank_of_a_two_node_lightning_environment(two_node_results):
    whole_batch = make_problem()[3]
    for node_rank, results in enumerate(two_node_results):
        for name, result in results.items():
            assert result["cluster_environment"] == "LightningEnvironment", name
            assert (result["node_rank"], result["global_rank"]) == (node_rank, node_rank), name
            assert (result["num_nodes"], result["world_size"], result["backend"]) == (2, 2, "gloo"), name
            # Every rank counts the env steps of both halves: those of the whole batch.
            assert (result["iterations"], result["env_steps"]) == (1, whole_batch.env_steps), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_POLICY)
def test_two_nodes_with_half_the_envs_step_with_the_one_process_gradient(two_node_results, name):
    one_process = gradient(name, make_problem())
    (node0,), (node1,) = (results[name]["gradient"] for results in two_node_results)  # one policy step each
    assert node0 == node1, "DDP gives both nodes the same gradient"
    assert one_process.abs().max() > 1e-3
    # .grad is the descent direction of the pseudo-loss; test_distributed's gradient() is the ascent direction.
    torch.testing.assert_close(-torch.tensor(node0), one_process, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    node_main(sys.argv[1], sys.argv[2], sys.argv[3:])
