"""Train a policy with policy gradients: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                  # CartPole-v1, reward-to-go with a baseline, Adam
    python train.py estimator=reinforce env=acrobot
    python train.py -m estimator=reinforce,reward_to_go,baseline seed=0,1,2
    python train.py -m hydra/sweeper=lr_batch_search total_env_steps=200000

Outputs (metrics.csv, summary.json, W&B offline files) go to Hydra's run dir (``hydra.run.dir``).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from pg_lightning.module import NonFiniteUpdatesError
from pg_lightning.rollout import EnvStepError
from pg_lightning.run import ConfigError, train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = train(cfg, run_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
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


if __name__ == "__main__":
    main()
