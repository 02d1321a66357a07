"""Linear algebra over parameter vectors: flattening gradients, and conjugate gradient (the natural gradient)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def flatten(tensors) -> torch.Tensor:
    """One vector ``[P]`` from a sequence of tensors (e.g. per-parameter gradients)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_like(flat: torch.Tensor, like) -> list[torch.Tensor]:
    """Split ``flat [P]`` back into views shaped like the tensors of ``like``."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, residual_tol: float = 1e-12
) -> torch.Tensor:
    """Solve A x = b for symmetric positive-definite A, given only ``matvec(v) = A v`` (Hestenes–Stiefel).

    Exact after ``len(b)`` iterations in exact arithmetic; fewer give the usual truncated-CG approximation
    (TRPO, Schulman et al. 2015, Appendix C). Stops early once ‖r‖² < ``residual_tol``.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    r_dot = r @ r
    for _ in range(iters):
        if r_dot < residual_tol:
            break
        Ap = matvec(p)
        alpha = r_dot / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        new_r_dot = r @ r
        p = r + (new_r_dot / r_dot) * p
        r_dot = new_r_dot
    return x
