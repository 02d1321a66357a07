"""Sums and maxima over all processes of a run, for the batch statistics an estimator uses.

With several ranks each one holds B/W envs of the batch. Every statistic that an estimator computes over
the batch (the other-envs baseline's totals, the optimal baseline's Σ g² and Σ g² R, the mean and
variance of ``normalize``, N, the self-normalised importance weights' Σ w) is a sum or a maximum, so an
all-reduce makes it the statistic of the whole W x B/W batch (docs/architecture.md, trap 5). The gradient of each
rank's loss is then its share of the global estimate, and DDP's gradient average times W is the
single-process gradient (``PolicyGradientModule`` scales each rank's loss by W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Reduction:
    """All-reduce helpers over ``world_size`` processes; with one process every method is the identity."""

    world_size: int = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank if ``flag`` is True on any rank: decisions that gate a collective must agree."""
        return bool(self.max(torch.tensor(float(flag), device=device)) > 0)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=op)
        return out


LOCAL = Reduction()


def reduction_for(world_size: int) -> Reduction:
    """The reduction of a run with ``world_size`` processes (``LOCAL`` outside a process group)."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        return Reduction(world_size)
    return LOCAL
