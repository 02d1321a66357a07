"""How many CPU threads torch's operators use: one per process unless a run asks for more.

torch starts one intra-op thread per core. Two such processes on the same cores oversubscribe them:
OpenMP threads that finish a parallel region spin while they wait for the next one, on cores the other
process needs (docs/architecture.md, trap 12 and "Threads"; the measurements are in ``benchmarks/README.md``,
by ``benchmarks/shared_machine.py``). One thread keeps two runs at nearly their solo speed and costs a lone
small-network run nothing; only large networks that have the machine to themselves gain from more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pg_lightning.validation import positive_int, require

# One thread per process: runs that share a machine keep their speed, and a lone small policy loses nothing.
DEFAULT_TORCH_THREADS = 1


def check_torch_threads(threads: int | None, key: str = "torch_threads") -> None:
    """Refuse a thread count that is neither a positive integer nor ``None`` (torch's default)."""
    if threads is not None:
        require(key, threads, positive_int, "a positive integer or null (torch's default: one per core)")


def set_torch_threads(threads: int | None, key: str = "torch_threads") -> None:
    """Use ``threads`` intra-op threads in this process from now on; ``None`` leaves torch's setting alone."""
    check_torch_threads(threads, key)
    if threads is not None:
        torch.set_num_threads(threads)


@contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads and restore the previous count after it.

    Setting the count costs well under a microsecond, so the analysis functions (``collect``,
    ``estimate_gradient``) wrap each call in it.
    """
    before = torch.get_num_threads()
    set_torch_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
