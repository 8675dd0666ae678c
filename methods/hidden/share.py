"""``share`` — cross-layer KV sharing after MiniCache: adjacent layers store one shared direction per token.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", NeurIPS 2024
(arXiv 2405.14366).

From layer ``start`` on (default ``L // 2``, "from the middle layer"), layers are paired ``(start, start+1)``,
``(start+2, start+3)``, … (an odd last layer stays unpaired). For each pair (a, b) and each (row, KV head, token),
keys and values are split into magnitude and direction; the pair stores **one** direction, the SLERP of the two at
``t`` (default 0.6, the paper's; t=1 is layer b's direction), plus each layer's magnitude. The fraction ``retain``
(default 0.05) of each (row, head)'s tokens with the largest angular distance (key angle + value angle) is stored
unmerged in both layers. Reconstruction: ``x̂ = ‖x‖ · shared direction``, retained tokens exact.

Storage is real (a hidden-axis codec; layers before ``start`` and unpaired layers hold their keys and values as
they are): for a block of ``n`` tokens of which ``k = round(retain·n)`` are retained and ``m = n − k`` merged,

* layer a holds the shared directions ``(pairs, m, d_k)`` + ``(pairs, m, d_v)``, the retained positions
  ``(pairs, k)`` int32, its magnitudes ``(pairs, m)`` × 2 and its retained keys/values ``(pairs, k, d)`` × 2;
* layer b holds only its magnitudes and its retained keys/values — it *references* layer a's direction tensors,
  which are therefore counted once (in layer a). Should layer a's codec be released (e.g. a decode-time eviction
  re-stores layer a), layer b becomes the sole owner and counts them.

Magnitudes, directions and retained entries are in the cache dtype. The prefill cache is merged; tokens generated
afterwards are appended unmerged (``decode_phase = "never"``). Layer a's codec holds its full keys/values until layer b's
prefill has run (then the merge happens), so the prefill peak is the uncompressed one.

Pairing is by index within each stored block: both layers of a pair must hold the same positions. That is so for an
uncompressed prefill and for position-uniform selections (e.g. ``streaming``); blocks whose (rows, heads, count) —
or, with ``trace=True``, positions — differ between the two layers are left unmerged (the row then counts their
full size), as are the blocks of two layers placed on different devices (``model.device_map``). The prefill saving is memory-only: every layer's K/V is computed during the prefill
(``cache.shared["share"]["prefill_saving"]``); ``merged_pairs`` lists the merged layer pairs.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from kvcompress.compressor import Codec, CompressionContext, HiddenCompressor, Workspace
from kvcompress.errors import KVCompressError, check_non_negative_int
from kvcompress.registry import register


class _Pair:
    """What both layers of a pair share: the merged directions and the retained positions."""

    def __init__(self, dir_k: torch.Tensor, dir_v: torch.Tensor, retained: torch.Tensor, count: int):
        self.dir_k, self.dir_v, self.retained, self.count = dir_k, dir_v, retained, count

    def tensors(self) -> list[torch.Tensor]:
        return [self.dir_k, self.dir_v, self.retained]


class ShareCodec(Codec):
    """One layer's block. Plain (``keys``/``values``) until merged; then magnitudes + retained + the pair's directions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, block: tuple | None):
        self.keys: torch.Tensor | None = keys
        self.values: torch.Tensor | None = values
        self.block = block  # (rows, heads, positions) identifying the block, to check the partner matches
        self.pair: _Pair | None = None
        self.owner = True  # the first layer of a pair owns (counts) the shared tensors
        self.partner: weakref.ref | None = None  # for the second layer: the owner's codec
        self.mag_k = self.mag_v = self.ret_k = self.ret_v = None

    def set_merged(self, pair: _Pair, mag_k, mag_v, ret_k, ret_v, owner: "ShareCodec | None") -> None:
        self.keys = self.values = None
        self.pair, self.mag_k, self.mag_v, self.ret_k, self.ret_v = pair, mag_k, mag_v, ret_k, ret_v
        self.owner = owner is None
        self.block = None
        self.partner = weakref.ref(owner) if owner is not None else None

    def decode(self, workspace: Workspace | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._reconstruct()
        return (k, v) if dtype is None else (k.to(dtype), v.to(dtype))

    def _reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pair is None:
            return self.keys, self.values
        p = self.pair
        pairs = p.dir_k.shape[0]
        merged = torch.ones(pairs, p.count, dtype=torch.bool, device=p.dir_k.device)
        merged.scatter_(1, p.retained.long(), False)
        out = []
        for mag, direction, ret in ((self.mag_k, p.dir_k, self.ret_k), (self.mag_v, p.dir_v, self.ret_v)):
            x = direction.new_empty((pairs, p.count, direction.shape[-1]))
            x[merged] = (mag.unsqueeze(-1) * direction).reshape(-1, direction.shape[-1])
            x[~merged] = ret.reshape(-1, ret.shape[-1])
            out.append(x)
        return out[0], out[1]

    def tensors(self) -> list[torch.Tensor]:
        if self.pair is None:
            return [self.keys, self.values]
        own = [self.mag_k, self.mag_v, self.ret_k, self.ret_v]
        partner_alive = self.partner is not None and self.partner() is not None
        if self.owner or not partner_alive:
            own += self.pair.tensors()
        return own


def _polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = x.norm(dim=-1)
    return norm, x / norm.clamp(min=1e-12).unsqueeze(-1)


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP of unit vectors (last dim) at ``t``; returns (direction, angle). Near-parallel pairs fall back to lerp."""
    theta = (ua * ub).sum(-1).clamp(-1.0, 1.0).acos()
    sin = theta.sin()
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    wa = torch.where(small, torch.full_like(theta, 1 - t), ((1 - t) * theta).sin() / safe)
    wb = torch.where(small, torch.full_like(theta, t), (t * theta).sin() / safe)
    return wa.unsqueeze(-1) * ua + wb.unsqueeze(-1) * ub, theta


@register
@dataclass
class Share(HiddenCompressor):
    name = "share"
    summary = "MiniCache cross-layer SLERP directions + magnitudes + retained tokens"
    paper = "MiniCache (Liu et al. 2024)"
    decode_phase = "never"

    start: int | None = None
    t: float = 0.6
    retain: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start is not None:
            check_non_negative_int(self.start, "start")
        if isinstance(self.t, bool) or not isinstance(self.t, (int, float)) or not 0.0 <= self.t <= 1.0:
            raise KVCompressError(f"t={self.t!r} is invalid; valid: a SLERP weight in [0, 1]")
        if isinstance(self.retain, bool) or not isinstance(self.retain, (int, float)) or not 0.0 <= self.retain <= 1.0:
            raise KVCompressError(f"retain={self.retain!r} is invalid; valid: a retained fraction in [0, 1]")

    def prefill_cost(self, config, n: int) -> dict:
        """For the latency model: no layer skips its K/V projection (memory-only saving); merging adds O(n·d) per pair
        (norms, SLERP, angles: ~20 FLOPs per element of K and V of both layers)."""
        L = config.num_hidden_layers
        hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        d_h = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        pairs = len([l for l in range(L) if self.role(l, L) == "first"])
        return {"prefill_saving": "memory-only", "prefill_skips_kv_layers": (),
                "extra_prefill_flops": float(pairs * 20 * 2 * 2 * n * hkv * d_h)}

    def first_layer(self, num_layers: int) -> int:
        return num_layers // 2 if self.start is None else self.start

    def role(self, layer: int, num_layers: int) -> str:
        """'first' / 'second' of a pair, or 'alone'."""
        s = self.first_layer(num_layers)
        if layer < s:
            return "alone"
        if (layer - s) % 2 == 0:
            return "first" if layer + 1 < num_layers else "alone"
        return "second"

    def encode(self, keys: torch.Tensor, values: torch.Tensor, ctx: CompressionContext, rows: torch.Tensor,
               heads: torch.Tensor, positions: torch.Tensor | None = None) -> ShareCodec:
        shared = ctx.shared
        shared["prefill_saving"] = "memory-only"
        codec = ShareCodec(keys, values, (rows, heads, positions))
        role = self.role(ctx.layer_idx, ctx.num_layers)
        # Codecs of a pair's first layer wait for the second layer in the method's shared space, by layer (objects, not
        # tensors: their tensors are counted in the segments that hold them).
        pending = shared.setdefault("_pending", {})
        if role == "first":
            pending.setdefault(ctx.layer_idx, []).append(codec)
        elif role == "second":
            firsts = pending.get(ctx.layer_idx - 1, [])
            match = next((i for i, f in enumerate(firsts) if _same_block(f, codec)), None)
            if match is not None:
                first = firsts.pop(match)
                if not firsts:  # nothing left waiting for this layer
                    pending.pop(ctx.layer_idx - 1, None)
                    if not pending:
                        shared.pop("_pending")
                self._merge(first, codec)
                merged = shared.setdefault("merged_pairs", [])
                if [ctx.layer_idx - 1, ctx.layer_idx] not in merged:
                    merged.append([ctx.layer_idx - 1, ctx.layer_idx])
        if role != "first":
            codec.block = None
        return codec

    def _merge(self, a: ShareCodec, b: ShareCodec) -> None:
        dtype = a.keys.dtype
        pairs, count = a.keys.shape[:2]
        na_k, ua_k = _polar(a.keys.float())
        nb_k, ub_k = _polar(b.keys.float())
        na_v, ua_v = _polar(a.values.float())
        nb_v, ub_v = _polar(b.values.float())
        dir_k, theta_k = slerp(ua_k, ub_k, self.t)
        dir_v, theta_v = slerp(ua_v, ub_v, self.t)
        k = min(count, int(math.floor(self.retain * count + 0.5)))
        distance = theta_k + theta_v  # (pairs, count)
        order = torch.sort(distance, dim=-1, descending=True, stable=True).indices[:, :k]
        retained = torch.sort(order, dim=-1).values  # ascending positions
        merged = torch.ones(pairs, count, dtype=torch.bool, device=distance.device)
        merged.scatter_(1, retained, False)
        m = count - k

        def part(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
            return x[mask].reshape(pairs, width, *x.shape[2:]).to(dtype).contiguous()

        pair = _Pair(part(dir_k, merged, m), part(dir_v, merged, m), retained.to(torch.int32).contiguous(), count)
        sides = []
        for src, n_k, n_v in ((a, na_k, na_v), (b, nb_k, nb_v)):
            sides.append((part(n_k, merged, m), part(n_v, merged, m), part(src.keys, ~merged, k), part(src.values, ~merged, k)))
        a.set_merged(pair, *sides[0], owner=None)
        b.set_merged(pair, *sides[1], owner=a)


def _same_block(a: ShareCodec, b: ShareCodec) -> bool:
    if a.keys is None or a.keys.shape != b.keys.shape or a.values.shape != b.values.shape:
        return False
    if a.keys.device != b.keys.device:  # layers placed on different devices: one shared direction cannot serve both
        return False
    (ra, ha, pa), (rb, hb, pb) = a.block, b.block
    if not (torch.equal(ra, rb) and torch.equal(ha, hb)):
        return False
    return pa is None or pb is None or torch.equal(pa, pb)
