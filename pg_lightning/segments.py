"""Trajectory segments and masks of a ``[T, B]`` batch: the bookkeeping the formulas sum over."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (0 when the mask is empty)."""
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), values.new_zeros(()))


def segment_ids(valid: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """``[T, B]`` int64: a distinct id (0 … N-1) per trajectory segment, -1 on invalid steps.

    A segment is the part of one episode inside the batch: it starts at step 0 or after an invalid
    (reset) step, and ends at a ``done`` step or at the batch end. Ids are ordered env by env.
    """
    starts = torch.ones_like(valid)
    starts[1:] = ~valid[:-1] | done[:-1]
    starts &= valid
    # Time-major cumsum of the transposed [B, T] layout numbers segments env by env.
    ids = torch.cumsum(starts.T.reshape(-1).long(), 0).reshape(starts.T.shape).T - 1
    return torch.where(valid, ids, torch.full_like(ids, -1))


def segment_sum(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``[N]``: the sum of ``values [T, B]`` over the steps of each segment (steps with id -1 dropped)."""
    keep = ids >= 0
    return values.new_zeros(num_segments).index_add(0, ids[keep], values[keep])
