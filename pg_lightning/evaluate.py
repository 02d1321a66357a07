"""Load a trained policy and run it: ``python -m pg_lightning.evaluate <run dir | checkpoint> [options]``.

    python -m pg_lightning.evaluate outputs/2026-11-28/10-00-00                      # 20 deterministic episodes
    python -m pg_lightning.evaluate outputs/.../last.ckpt --episodes 100 --video cartpole.mp4

``load_module`` rebuilds the module that a ``train.py`` run trained: the env, policy and estimator from the
run's saved Hydra config (``<run dir>/.hydra/config.yaml``), then the weights of its checkpoint, loaded
weights-only (``checkpoint.check_checkpoint``). It works for every policy config, because the same config
builds the same network. ``PolicyGradientModule.from_run`` is the same call.

The command prints the mean and spread of the deterministic return (the mode of π, as the training's
evaluation) and, with ``--video``, writes one rendered episode as an mp4 (the ``video`` extra: moviepy),
whatever logger the run used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pg_lightning.checkpoint import UnsafeCheckpointError, check_checkpoint
from pg_lightning.evaluation import evaluate_policy, record_episode, write_video
from pg_lightning.module import PolicyGradientModule


def load_module(path: str | Path) -> PolicyGradientModule:
    """The trained module of a run dir (its ``last.ckpt``) or of a checkpoint inside a run dir, in eval mode.

    Raises:
        ValueError: one line, if there is no checkpoint, no saved config beside it, or the file is refused.
    """
    from omegaconf import OmegaConf

    from pg_lightning.run import make_module  # Hydra only when a run is loaded

    path = Path(path)
    checkpoint = path if path.is_file() else path / "last.ckpt"
    if not checkpoint.is_file():
        raise ValueError(f"{path}: no checkpoint (a run dir holds last.ckpt; or give the .ckpt file itself)")
    config = checkpoint.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ValueError(
            f"{checkpoint}: no .hydra/config.yaml beside it to rebuild the env and policy from (a train.py run dir "
            "has one; for a module built in Python, build it again and load_state_dict the checkpoint's state_dict)"
        )
    try:
        state = check_checkpoint(checkpoint)["state_dict"]  # loaded once, weights only
    except UnsafeCheckpointError as error:
        raise ValueError(str(error)) from None
    module = make_module(OmegaConf.load(config))
    module.load_state_dict(state)
    return module.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pg_lightning.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a train.py run dir (its last.ckpt is used) or a checkpoint in one")
    parser.add_argument("--episodes", type=int, default=20, help="deterministic episodes, one per env (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the envs' resets (default: the run's eval seed)")
    parser.add_argument("--video", type=Path, default=None, help="also write one rendered episode to this .mp4")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        print(f"error: --episodes must be a positive integer, got {args.episodes}", file=sys.stderr)
        return 2
    try:
        module = load_module(args.path)
        seed = args.seed if args.seed is not None else module.eval_seed  # the training's evaluation seed
        envs = module.env.make(num_envs=args.episodes)
        try:
            returns = evaluate_policy(module.policy, envs, seed=seed)
        finally:
            envs.close()
        print(f"{module.env.id}: deterministic return {returns.mean():.1f} ± {returns.std():.1f} over {len(returns)} "
              f"episodes (min {returns.min():.1f}, max {returns.max():.1f}; seed {seed})")
        if args.video is not None:
            frames, fps = record_episode(module.policy, module.env, seed=seed, downscale=1)
            write_video(frames, fps, args.video)
            print(f"wrote {args.video} ({len(frames)} frames)")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
