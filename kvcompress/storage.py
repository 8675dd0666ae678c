"""What a compressed layer stores besides its dense buffer: blocks encoded by a hidden-axis codec
(:class:`Segment`), plus the byte-accounting helpers shared by the layer and the cache."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .compressor import Codec, Workspace

POSITION_DTYPE = torch.int32


@dataclass
class Segment:
    """A block of entries encoded by a hidden-axis codec: the pairs ``(rows[i], heads[i])``, ``count`` entries each.

    ``pairs`` is a host copy of ``rows · kv_heads + heads`` (ints), so accounting and joining never read the device. A
    pair may appear in several segments; for each pair, segments are in position order (older first), before the
    layer's ragged entries and its buffer."""

    rows: torch.Tensor  # (pairs,) long, on the cache's device
    heads: torch.Tensor  # (pairs,) long
    codec: Codec
    count: int
    pairs: tuple[int, ...]  # rows · kv_heads + heads, on the host
    positions: torch.Tensor | None = None  # (pairs, count) — only with cache.trace (diagnostic, not counted)

    def kv(
        self, workspace: Workspace | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(pairs, count, head_dim)`` decoded (into ``workspace`` if given), in ``dtype``."""
        return self.codec.decode(workspace, dtype)

    def joined(self, later: Segment) -> Segment | None:
        """This block followed by ``later`` (same pairs, a codec that can ``concat``) as one segment, or None."""
        if (
            not self.codec.joinable
            or type(self.codec) is not type(later.codec)
            or (self.positions is None) != (later.positions is None)
            or self.pairs != later.pairs
        ):
            return None
        codec = self.codec.concat(later.codec)
        if codec is None:
            return None
        positions = torch.cat([self.positions, later.positions], 1) if self.positions is not None else None
        return Segment(self.rows, self.heads, codec, self.count + later.count, self.pairs, positions)

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows, self.heads, *self.codec.tensors()]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_tensors(state: Any) -> Iterator[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from state_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from state_tensors(value)
