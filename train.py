"""Train a policy with policy gradients: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                  # CartPole-v1, reward-to-go with a baseline, Adam
    python train.py estimator=reinforce env=acrobot
    python train.py -m estimator=reinforce,reward_to_go,baseline seed=0,1,2
    python train.py -m hydra/sweeper=lr_batch_search total_env_steps=200000

Outputs (metrics.csv, summary.json, W&B offline files) go to Hydra's run dir (``hydra.run.dir``).
"""

import gc
import json
import os
import shutil
import sys
from pathlib import Path

# Importing torch and Lightning creates about a million objects: the cyclic garbage collector would walk them
# again and again while they load and once more at exit (benchmarks/README.md, start-up). None of them is
# garbage, so collection is off while they load and they are frozen (left out of every later collection).
gc.disable()
import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pg_lightning.update import NonFiniteUpdatesError  # noqa: E402
from pg_lightning.rollout import EnvStepError  # noqa: E402
from pg_lightning.run import ConfigError, train  # noqa: E402

gc.freeze()
gc.enable()


# Exit statuses of a run stopped by a signal, as a shell reports them (128 + the signal's number).
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def interrupted(run_dir: str, signal_exit: int) -> None:
    """Say where an interrupted run's work is and how to resume it, then exit with the signal's status."""
    if rank_zero_only.rank == 0:
        overrides = " ".join(o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path="))
        checkpoint = f"{run_dir}/last.ckpt"
        print(f"interrupted: saved {checkpoint} and {run_dir}/summary.json (status interrupted)\n"
              f"resume: python train.py {overrides + ' ' if overrides else ''}ckpt_path={checkpoint}", file=sys.stderr)
    sys.exit(signal_exit)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = train(cfg, run_dir, announce=rank_zero_only.rank == 0)
    except SIGTERMException:  # Lightning stops after the current batch and exits 0 without a word
        interrupted(run_dir, EXIT_SIGTERM)
    except SystemExit as stop:  # Ctrl-C: Lightning saves through our callbacks, then exits 1
        if _status(run_dir) == "interrupted":
            interrupted(run_dir, EXIT_SIGINT)
        raise stop
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        _remove_if_nothing_ran(run_dir)
        sys.exit(2)
    except (EnvStepError, NonFiniteUpdatesError) as error:
        # The run stopped cleanly: last.ckpt and summary.json (with the full traceback) are in the run dir.
        print(f"error: {error}\nsaved: {run_dir}/last.ckpt and {run_dir}/summary.json (status failed)", file=sys.stderr)
        sys.exit(1)
    if rank_zero_only.rank != 0:
        return None  # the other processes of a multi-process run
    print(
        f"{summary['status']}: {summary['env_id']} {summary['estimator']} seed={summary['seed']} "
        f"env_steps={summary['env_steps']} eval_return_mean={summary['eval_return_mean']} "
        f"solved={summary['solved']} wall_s={summary['wall_s']}"
    )
    return summary["eval_return_mean"]  # the objective of an Optuna sweep (hydra/sweeper=lr_batch_search)


def _remove_if_nothing_ran(run_dir: str) -> None:
    """A refused config leaves no run dir behind: Hydra made it (with its .hydra/) before the config was checked."""
    if rank_zero_only.rank == 0 and set(os.listdir(run_dir)) <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _status(run_dir: str) -> str | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    try:
        main()
    finally:
        # Shutdown's garbage collections walk every object torch and Lightning made at import; frozen objects
        # are skipped (benchmarks/README.md, start-up). Exit is otherwise as usual: atexit handlers run
        # (logging, W&B) and our outputs are already closed.
        gc.freeze()
