"""``full`` — the uncompressed baseline: every position of every layer and head is kept.

With ``full`` the cache is numerically the stock ``DynamicCache`` (same sdpa kernel, same mask) but appends
without copying the layer at every decode step. It has no parameters and does not compose with other methods.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcompress.compressor import Compressor
from kvcompress.registry import register


@register
@dataclass
class Full(Compressor):
    name = "full"
    summary = "everything (the DynamicCache-equivalent baseline)"
    paper = "—"
    axis = None
