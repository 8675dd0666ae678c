"""Split evaluation samples across processes (``accelerate launch``) and gather them back in order.

    accelerate launch --cpu --num_processes 2 -m kvcompress.run method=snapkv ratio=0.25

Each process evaluates samples ``rank, rank + world, …`` (round robin); per-sample results are gathered to every
process in the original sample order, so the aggregate — and the results row, written by the main process only — is
the one a single-process run produces. Without a distributed launch every function here is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _state() -> Any | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from accelerate import PartialState  # initialises the process group from the launcher's environment

        PartialState()
    return dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a distributed launch."""
    dist = _state()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    return world()[0] == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (round robin)."""
    rank, size = world()
    return list(items[rank::size])


def gather(local: list[T], total: int) -> list[T]:
    """Inverse of :func:`shard`: every process gets all ``total`` results in the original order."""
    rank, size = world()
    if size == 1:
        return list(local)
    dist = _state()
    parts: list[list[T] | None] = [None] * size
    dist.all_gather_object(parts, local)
    ordered: list[T] = []
    for i in range(total):
        ordered.append(parts[i % size][i // size])  # type: ignore[index]
    return ordered
