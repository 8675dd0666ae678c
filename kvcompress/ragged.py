"""Ragged storage: (row, KV head) pairs that hold different numbers of entries, packed without padding.

Pair ``p = row · kv_heads + head`` holds ``c_p`` full-precision entries. They are packed into one keys tensor and one
values tensor ``(N, head_dim)``, ``N = Σ c_p`` (no padding, so the bytes held are the bytes kept):

* the **pages region** first: the first ``⌊c_p / page⌋ · page`` entries of every pair, in whole pages of ``page``
  entries (a pair's pages are consecutive, pairs in order), viewed as ``(num_pages, page, head_dim)``;
* then the **tails region**: the remaining ``c_p mod page`` entries of every pair, pairs in order.

Within a pair, entries are in position order: its pages, then its tail. Attention of a pair's queries over its
entries runs in a fixed number of ops whatever the counts: one batched matmul over the pages (each page meets the
queries of its own pair), one over the tail entries, and per-pair max / sum reductions by ``segment_reduce`` over the
pairs' consecutive pages and tail entries — an exact softmax, returned as ``(output, max, sum)`` for a log-sum-exp merge
with the other parts of a layer. On CUDA this is the same handful of kernels per layer and step for 1 or 1,000
distinct counts.

Index metadata held on the device (and counted as cache memory): ``page_pair`` (the pair of each page),
``tail_pair`` (the pair of each tail entry) and the per-pair page / tail counts. ``counts`` is a host copy of
``c_p`` (a tuple of ints, not a tensor), so shapes and accounting never read the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: entries per page; a pair's remainder (< PAGE entries) goes to the tails region
PAGE = 32
#: dtype of the index metadata (4 bytes per page, per tail entry and per pair)
INDEX_DTYPE = torch.int32


def index_bytes(counts: tuple[int, ...] | list[int], page: int = PAGE) -> int:
    """Bytes of the index metadata of a ragged layer whose pairs hold ``counts`` entries: one int32 per page, per tail
    entry and two per pair."""
    pages = sum(c // page for c in counts)
    tails = sum(c % page for c in counts)
    return INDEX_DTYPE.itemsize * (pages + tails + 2 * len(counts))


def _segment(data: torch.Tensor, lengths: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce consecutive segments of ``data`` along dim 0 (``lengths`` per segment, zeros allowed)."""
    initial = float("-inf") if reduce == "max" else 0.0
    return torch.segment_reduce(data, reduce, lengths=lengths, axis=0, unsafe=True, initial=initial)


@dataclass
class Ragged:
    """Full-precision entries of pairs with different counts (see the module docstring)."""

    keys: torch.Tensor  # (N, d_k): pages region, then tails region
    values: torch.Tensor  # (N, d_v)
    page_pair: torch.Tensor  # (num_pages,) int32: pair of each page
    tail_pair: torch.Tensor  # (num_tail,) int32: pair of each tail entry
    pages_per_pair: torch.Tensor  # (pairs,) int32
    tails_per_pair: torch.Tensor  # (pairs,) int32
    counts: tuple[int, ...]  # entries per pair, on the host
    page: int = PAGE
    positions: torch.Tensor | None = None  # (N,) logical positions, packed like keys (trace / decode eviction)

    @property
    def num_pages(self) -> int:
        return self.page_pair.shape[0]

    @property
    def num_pairs(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return self.keys.shape[0]

    def metadata(self) -> list[torch.Tensor]:
        return [self.page_pair, self.tail_pair, self.pages_per_pair, self.tails_per_pair]

    # -- building -----------------------------------------------------------------------------------------------
    @classmethod
    def pack(cls, flat_k: torch.Tensor, flat_v: torch.Tensor, flat_pos: torch.Tensor | None,
             counts: torch.Tensor | tuple[int, ...], page: int = PAGE) -> Ragged:
        """Pack entries given pair after pair (``flat_* (N, ...)``, pair-contiguous, position order within a pair,
        as a boolean selection of a ``(batch, kv_heads, n)`` rectangle yields them); ``counts`` per pair, on the host
        (a CPU tensor or ints)."""
        counts = torch.as_tensor(counts, dtype=torch.long, device="cpu")
        device = flat_k.device
        full = counts // page  # whole pages per pair
        tail = counts - full * page
        num_pages, num_tail = int(full.sum()), int(tail.sum())
        dev_counts = counts.to(device)
        dev_full, dev_tail = full.to(device), tail.to(device)
        offsets = torch.cumsum(dev_counts, 0) - dev_counts  # first flat entry of each pair
        pairs = torch.arange(counts.shape[0], device=device)
        page_pair = torch.repeat_interleave(pairs, dev_full, output_size=num_pages)
        first_page = torch.cumsum(dev_full, 0) - dev_full
        page_in_pair = torch.arange(num_pages, device=device) - first_page[page_pair]
        src_pages = (offsets[page_pair] + page_in_pair * page).unsqueeze(-1) + torch.arange(page, device=device)
        tail_pair = torch.repeat_interleave(pairs, dev_tail, output_size=num_tail)
        first_tail = torch.cumsum(dev_tail, 0) - dev_tail
        tail_in_pair = torch.arange(num_tail, device=device) - first_tail[tail_pair]
        src_tail = offsets[tail_pair] + dev_full[tail_pair] * page + tail_in_pair
        src = torch.cat([src_pages.flatten(), src_tail])
        return cls(
            keys=flat_k.index_select(0, src),
            values=flat_v.index_select(0, src),
            page_pair=page_pair.to(INDEX_DTYPE),
            tail_pair=tail_pair.to(INDEX_DTYPE),
            pages_per_pair=dev_full.to(INDEX_DTYPE),
            tails_per_pair=dev_tail.to(INDEX_DTYPE),
            counts=tuple(counts.tolist()),
            page=page,
            positions=flat_pos.index_select(0, src) if flat_pos is not None else None,
        )

    # -- addressing ----------------------------------------------------------------------------------------------
    def entry_pairs_and_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair and rank within the pair (position order) of every packed entry: two ``(N,)`` long tensors."""
        device = self.keys.device
        p = self.num_pages * self.page
        per_page, per_tail = self.pages_per_pair.long(), self.tails_per_pair.long()
        first_page = torch.cumsum(per_page, 0) - per_page
        page_in_pair = torch.arange(self.num_pages, device=device) - first_page[self.page_pair]
        page_ranks = (page_in_pair * self.page).unsqueeze(-1) + torch.arange(self.page, device=device)
        first_tail = torch.cumsum(per_tail, 0) - per_tail
        tail_ranks = (per_page[self.tail_pair] * self.page
                      + torch.arange(self.total - p, device=device) - first_tail[self.tail_pair])
        pairs = torch.cat([self.page_pair.long().repeat_interleave(self.page, output_size=p), self.tail_pair.long()])
        return pairs, torch.cat([page_ranks.flatten(), tail_ranks])

    # -- attention -----------------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Softmax attention of each pair's queries over the pair's entries, unnormalised.

        query ``(pairs, m, d_k)`` in the cache dtype. Returns ``(out (pairs, m, d_v), max (pairs, m), sum (pairs, m))``
        in float32: ``out / sum`` is the attention output of the pair, ``max`` the logit offset used (−inf and zeros for
        a pair holding nothing). A fixed number of ops, whatever the counts."""
        pairs, m, _ = query.shape
        split = self.num_pages * self.page
        page_k = self.keys[:split].view(self.num_pages, self.page, self.keys.shape[-1])
        page_v = self.values[:split].view(self.num_pages, self.page, self.values.shape[-1])
        tail_k, tail_v = self.keys[split:], self.values[split:]
        # logits: each page (or tail entry) against the queries of its pair, in the cache dtype like eager attention
        page_s = torch.bmm(query.index_select(0, self.page_pair), page_k.transpose(1, 2)).float() * scaling
        tail_s = torch.bmm(query.index_select(0, self.tail_pair), tail_k.unsqueeze(-1)).squeeze(-1).float() * scaling
        top = torch.maximum(_segment(page_s.amax(-1), self.pages_per_pair, "max"),
                            _segment(tail_s, self.tails_per_pair, "max"))  # (pairs, m)
        shift = top.clamp(min=torch.finfo(torch.float32).min)  # −inf (a pair holding nothing) → finite
        page_p = torch.exp(page_s - shift.index_select(0, self.page_pair).unsqueeze(-1))  # (pages, m, page)
        tail_p = torch.exp(tail_s - shift.index_select(0, self.tail_pair))  # (tail, m)
        total = _segment(page_p.sum(-1), self.pages_per_pair, "sum") + _segment(tail_p, self.tails_per_pair, "sum")
        page_o = torch.bmm(page_p.to(page_v.dtype), page_v).float()  # (pages, m, d_v)
        tail_o = tail_p.unsqueeze(-1) * tail_v.float().unsqueeze(1)  # (tail, m, d_v)
        out = _segment(page_o, self.pages_per_pair, "sum") + _segment(tail_o, self.tails_per_pair, "sum")
        return out, top, total
