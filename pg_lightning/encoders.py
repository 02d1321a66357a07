"""Encoders that turn an observation into a feature vector: images through a CNN.

An image observation is a ``Box`` of 2 or 3 dimensions: ``(H, W)`` (one grey channel), ``(H, W, C)`` with C ≤ 4
(gymnasium's render and MiniGrid layout) or ``(C, H, W)`` with C ≤ 4 (frame stacks, e.g. ``FrameStackObservation``
around ``AtariPreprocessing``: ``(4, 84, 84)``). The batch stores its pixels as uint8 (``rollout.py``); the encoder
converts them on the policy's device, x / 255, whatever dtype it receives, so the rollout, training and evaluation
feed it the same numbers.

Two trunks (``image_encoder`` picks one from the image size):

- ``nature_cnn``: Mnih et al. 2015's DQN trunk, conv 8×8/4 (32), 4×4/2 (64), 3×3/1 (64), then a linear layer of 512,
  ReLU throughout; for images of at least 36 × 36 pixels (Atari's 84 × 84, CarRacing's 96 × 96).
- ``grid_cnn``: three 2×2 convolutions (16, 32, 64 channels, a 2×2 max-pool after the first), as rl-starter-files
  use on MiniGrid's 7 × 7 views; for smaller images.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from torch import nn

NATURE_MIN_SIZE = 36  # the Nature trunk shrinks a side by 4, 2 and 1 with kernels 8, 4, 3: it needs ≥ 36 pixels


def is_image_space(space: gym.Space) -> bool:
    """A ``Box`` whose shape reads as an image (see the module doc)."""
    if not isinstance(space, gym.spaces.Box):
        return False
    shape = space.shape
    return len(shape) == 2 or (len(shape) == 3 and (shape[-1] <= 4 or shape[0] <= 4))


def image_layout(shape: tuple[int, ...]) -> tuple[int, int, int, bool]:
    """``(channels, height, width, channels_last)`` of an image observation's shape."""
    if len(shape) == 2:
        return 1, shape[0], shape[1], True
    if shape[-1] <= 4:
        return shape[-1], shape[0], shape[1], True
    return shape[0], shape[1], shape[2], False


class ImageEncoder(nn.Module):
    """``obs [..., *image_shape] -> [..., out_features]``: pixels x / 255 into a CNN trunk.

    Args:
        shape: the observation's shape (``image_layout``).
        trunk: ``nature`` or ``grid`` (module doc).
    """

    def __init__(self, shape: tuple[int, ...], trunk: str = "nature"):
        super().__init__()
        self.shape = tuple(shape)
        channels, height, width, self.channels_last = image_layout(self.shape)
        if trunk == "nature":
            layers = [nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                      nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten()]
        elif trunk == "grid":
            layers = [nn.Conv2d(channels, 16, 2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(16, 32, 2),
                      nn.ReLU(), nn.Conv2d(32, 64, 2), nn.ReLU(), nn.Flatten()]
        else:
            raise ValueError(f"policy.trunk must be nature or grid, got {trunk!r}")
        convolutions = nn.Sequential(*layers)
        with torch.no_grad():
            flat = convolutions(torch.zeros(1, channels, height, width)).shape[1]
        if trunk == "nature":  # the DQN trunk ends in a linear layer of 512
            self.trunk = nn.Sequential(convolutions, nn.Linear(flat, 512), nn.ReLU())
            self.out_features = 512
        else:
            self.trunk = convolutions
            self.out_features = flat

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        batch_shape = obs.shape[: obs.dim() - len(self.shape)]
        x = obs.reshape(-1, *self.shape).float() / 255.0
        if len(self.shape) == 2:
            x = x.unsqueeze(1)
        elif self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.trunk(x).reshape(*batch_shape, self.out_features)


def image_encoder(space: gym.spaces.Box, trunk: str | None = None) -> ImageEncoder:
    """The CNN for ``space``: ``trunk`` if given, else the Nature trunk for images of at least 36 × 36 pixels and
    the grid trunk for smaller ones."""
    _, height, width, _ = image_layout(space.shape)
    if trunk is None:
        trunk = "nature" if min(height, width) >= NATURE_MIN_SIZE else "grid"
    if trunk == "nature" and min(height, width) < NATURE_MIN_SIZE:
        raise ValueError(f"policy.trunk=nature needs images of at least {NATURE_MIN_SIZE} pixels a side, got "
                         f"{height} x {width}; use policy.trunk=grid")
    return ImageEncoder(tuple(int(n) for n in space.shape), trunk)
