"""Deterministic evaluation: run the policy's mode for whole episodes on separate envs; render one as a video."""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import nn

from pg_lightning.distributions import ActionMaskReader, mask_actions
from pg_lightning.envs import VectorEnvFactory, to_env_action
from pg_lightning.policies import is_recurrent


@torch.no_grad()
def evaluate_policy(policy: nn.Module, envs: VectorEnv, seed: int | None = None, max_steps: int = 100_000) -> np.ndarray:
    """Returns of one deterministic episode per env of ``envs`` (``[num_envs]``, undiscounted).

    The action is the mode of π(·|s) (argmax for a categorical, the mean for a Gaussian), among the allowed
    actions where the env gives an ``action_mask`` in its info. Every env is reset at the start, so the episodes
    are whole; an env that finishes early keeps stepping (its autoreset steps are ignored) until all are done.
    """
    device = next(policy.parameters()).device
    obs, info = envs.reset(seed=seed)
    returns = np.zeros(envs.num_envs)
    running = np.ones(envs.num_envs, dtype=bool)
    # A recurrent policy carries its state; each env plays one episode, so it is never reset.
    state = policy.initial_state(envs.num_envs) if is_recurrent(policy) else None
    masks = ActionMaskReader(envs.single_action_space, envs.num_envs)
    where = f"evaluation on {getattr(envs.spec, 'id', None) or type(envs).__name__}"
    for step in range(max_steps):
        mask = _as_tensor(masks.read(info, lambda: f"{where} at step {step}"), device)
        action, state = _mode(policy, torch.as_tensor(obs, dtype=torch.float32, device=device), state, mask)
        obs, reward, terminated, truncated, info = envs.step(to_env_action(action.cpu().numpy(), envs.single_action_space))
        returns += np.where(running, reward, 0.0)
        running &= ~(terminated | truncated)
        if not running.any():
            return returns
    raise RuntimeError(f"evaluation episodes did not end within {max_steps} steps")


def _mode(
    policy: nn.Module, obs: torch.Tensor, state: torch.Tensor | None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mode of π(·|obs) (``[B, ...]``) among the actions ``mask`` allows, and, for a recurrent policy, its
    next state."""
    if state is None:
        return mask_actions(policy(obs), mask).mode, None
    dist, state = policy.step(obs, state)
    return mask_actions(dist, mask).mode, state


def _as_tensor(mask: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if mask is None else torch.as_tensor(mask, device=device)


@torch.no_grad()
def record_episode(
    policy: nn.Module, env: VectorEnvFactory, seed: int | None = None, max_frames: int = 1000, downscale: int = 2
) -> tuple[np.ndarray, int]:
    """Frames of one deterministic episode, ``[T, H / downscale, W / downscale, 3]`` uint8 RGB (the layout
    video writers such as moviepy and imageio take), and the env's frame rate.

    The env is made alone with ``render_mode="rgb_array"`` (its rendering dependencies must be installed);
    the policy sees the same observation entries as in training. At most ``max_frames`` frames.
    """
    device = next(policy.parameters()).device
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame-rendered envs: off-screen, no display needed
    single = gym.make(env.id, render_mode="rgb_array", **dict(env.kwargs))
    indices = list(env.observation_indices) if env.observation_indices is not None else slice(None)
    try:
        obs, info = single.reset(seed=seed)
        frames = [single.render()]
        state = policy.initial_state(1) if is_recurrent(policy) else None
        masks = ActionMaskReader(single.action_space, 1)
        while len(frames) < max_frames:
            observed = torch.as_tensor(np.asarray(obs)[indices], dtype=torch.float32, device=device)
            mask = _as_tensor(masks.read(info, lambda: f"recording {env.id} at step {len(frames) - 1}"), device)
            action, state = _mode(policy, observed.unsqueeze(0), state, mask)
            action = action[0]
            obs, _, terminated, truncated, info = single.step(to_env_action(action.cpu().numpy(), single.action_space))
            frames.append(single.render())
            if terminated or truncated:
                break
    finally:
        single.close()
    fps = int(single.metadata.get("render_fps") or 30)
    return np.ascontiguousarray(np.stack(frames)[:, ::downscale, ::downscale]), fps


def write_video(frames: np.ndarray, fps: int, out: str | Path) -> None:
    """Write ``[T, H, W, 3]`` uint8 frames (``record_episode``'s layout) as an H.264 mp4 (moviepy, the ``video`` extra).

    Raises:
        ValueError: one line, if moviepy is not installed.
    """
    try:
        from moviepy import ImageSequenceClip
    except ImportError:
        raise ValueError('writing a video needs the rendering extra: pip install -e ".[video]"') from None
    clip = ImageSequenceClip(list(frames), fps=fps)
    clip.write_videofile(str(out), codec="libx264", audio=False, logger=None)
