"""What a compressed KV cache holds: :class:`CompressionProfile` (:func:`~kvcompress.latency.projection.project`
maps one onto another model).

Per layer l and KV head h the cache keeps ``kept_tokens[l][h]`` entries (a float: the mean over batch rows). Each
kept (token, head) entry costs, in bytes::

    entry_bytes(l) = (key_dim[l]·key_bits[l] + value_dim[l]·value_bits[l]) / 8 + metadata_bytes_per_token[l]

``key_bits``/``value_bits`` are bits per stored element (> 0), ``key_dim``/``value_dim`` the kept rank or channels
per head (default the model's cached widths: d_h and d_v, or an MLA latent and 0), ``metadata_bytes_per_token[l]`` the scales/zero points etc. per kept (token, KV head)
entry, K and V together. A layer listed in ``shared_layers`` (layer → the layer whose KV it reuses) stores nothing.
So ``KV bytes = Σ_{l not shared} Σ_h kept_tokens[l][h] · entry_bytes(l)``.

Optionally the element width is split by storage dtype (what :meth:`KVCompressCache.memory_report` gives)::

    key_bits[l] = value_bits[l] = fixed_bits[l] + dtype_fraction[l] · 8 · dtype_bytes

``dtype_fraction`` = elements held in the cache's own dtype per kept element (full-precision tokens, low-rank
coefficients: they scale with the dtype), ``fixed_bits`` = bits held in other dtypes per kept element (integer
codes, float16 quantization scales/minima, integer indices: fixed whatever the dtype).
:func:`~kvcompress.latency.projection.project` uses it.

Per-axis kept fractions (:meth:`CompressionProfile.kept_fractions`) telescope exactly to the byte fraction. With
``cap_l`` = tokens a dense layer holds (n, or min(n, window)) and ``b0 = (d_k + d_v)·dtype_bytes`` (2·d_h·bytes)::

    layer  = Σ_{l stored} cap_l / Σ_l cap_l
    head   = Σ_{l stored, h: kept>0} cap_l / Σ_{l stored} H·cap_l
    token  = Σ_{kept>0} kept_lh / Σ_{kept>0} cap_l
    hidden = KV bytes / (Σ kept_lh · b0)
    bytes  = layer · head · token · hidden = KV bytes / dense KV bytes

Changing the context keeps every per-(layer, head) token fraction kept/cap_l (a ratio, not an absolute budget);
:func:`~kvcompress.latency.projection.project` also carries fixed-size parts (windows, budgets, a codec's
full-precision residual) as token counts (:mod:`kvcompress.latency.fixed`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KVCompressError
from .model_profile import ModelProfile


def _per_layer(value: Any, n_layers: int, default: float, name: str) -> list[float]:
    if value is None:
        return [float(default)] * n_layers
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n_layers
    out = [float(default) if v is None else float(v) for v in value]
    if len(out) != n_layers:
        raise KVCompressError(f"{name} has {len(out)} entries; valid: one per layer ({n_layers})")
    return out


@dataclass
class CompressionProfile:
    """What a (compressed) cache holds for one sequence at ``context_tokens`` logical tokens. See module docstring."""

    model: ModelProfile
    context_tokens: int
    kept_tokens: list[list[float]]
    dtype_bytes: float = 2  #: bytes per element of the cache's own dtype (0.5 for fp4)
    key_bits: list[float] = field(default_factory=list)
    value_bits: list[float] = field(default_factory=list)
    key_dim: list[float] = field(default_factory=list)
    value_dim: list[float] = field(default_factory=list)
    metadata_bytes_per_token: list[float] = field(default_factory=list)
    fixed_bits: list[float] = field(default_factory=list)  #: [] = no dtype split known (module docstring)
    dtype_fraction: list[float] = field(default_factory=list)
    shared_layers: dict[int, int] = field(default_factory=dict)
    extra_prefill_flops: float = 0.0
    prefill_skips_kv_layers: tuple[int, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        m, n_layers = self.model, self.model.num_layers
        if isinstance(self.context_tokens, bool) or not isinstance(self.context_tokens, (int, float)) \
                or self.context_tokens <= 0:
            raise KVCompressError(f"context_tokens={self.context_tokens!r} is invalid; valid: a number > 0")
        self.shared_layers = {int(k): int(v) for k, v in dict(self.shared_layers).items()}
        for k, v in self.shared_layers.items():
            if not (0 <= k < n_layers and 0 <= v < n_layers) or k == v:
                raise KVCompressError(f"shared_layers {k}->{v} is invalid; valid: distinct layers in 0..{n_layers - 1}")
        if len(self.kept_tokens) != n_layers:
            raise KVCompressError(f"kept_tokens has {len(self.kept_tokens)} layers; valid: {n_layers} "
                                  f"(one list of {m.num_kv_heads} KV heads per layer of {m.name})")
        rows = []
        for i, row in enumerate(self.kept_tokens):
            row = [float(x) for x in row] or [0.0] * m.num_kv_heads  # an empty layer holds nothing
            if len(row) != m.num_kv_heads:
                raise KVCompressError(f"kept_tokens[{i}] has {len(row)} heads; valid: {m.num_kv_heads} KV heads")
            if any(not (x >= 0) for x in row):
                raise KVCompressError(f"kept_tokens[{i}]={row} has a negative or NaN entry; valid: counts >= 0")
            rows.append(row)
        self.kept_tokens = rows
        bits = 8 * self.dtype_bytes
        has_split = [not (v is None or (isinstance(v, (list, tuple)) and not v))
                     for v in (self.fixed_bits, self.dtype_fraction)]
        if has_split[0] != has_split[1]:
            raise KVCompressError("fixed_bits and dtype_fraction must be given together; valid: both or neither")
        if not has_split[0]:
            self.fixed_bits, self.dtype_fraction = [], []
        else:
            self.fixed_bits = _per_layer(self.fixed_bits, n_layers, 0.0, "fixed_bits")
            self.dtype_fraction = _per_layer(self.dtype_fraction, n_layers, 1.0, "dtype_fraction")
            if any(not (x >= 0) for x in self.fixed_bits + self.dtype_fraction):
                raise KVCompressError(f"fixed_bits={self.fixed_bits} / dtype_fraction={self.dtype_fraction} have a "
                                      "negative or NaN entry; valid: numbers >= 0")
            split = [f + d * bits for f, d in zip(self.fixed_bits, self.dtype_fraction)]
            for key in ("key_bits", "value_bits"):
                given = getattr(self, key)
                if given is None or (isinstance(given, (list, tuple)) and not given):
                    setattr(self, key, list(split))
                    continue
                for i, (g, want) in enumerate(zip(_per_layer(given, n_layers, bits, key), split)):
                    if not math.isclose(g, want, rel_tol=1e-6, abs_tol=1e-9):
                        raise KVCompressError(f"{key}[{i}]={g} differs from fixed_bits + dtype_fraction·{bits} = "
                                              f"{want}; valid: consistent values (or omit {key})")
        self.key_bits = _per_layer(self.key_bits or None, n_layers, bits, "key_bits")
        self.value_bits = _per_layer(self.value_bits or None, n_layers, bits, "value_bits")
        self.key_dim = _per_layer(self.key_dim or None, n_layers, m.cache_key_dim, "key_dim")
        self.value_dim = _per_layer(self.value_dim if self.value_dim else None, n_layers, m.cache_value_dim,
                                    "value_dim")
        self.metadata_bytes_per_token = _per_layer(self.metadata_bytes_per_token or None, n_layers, 0.0,
                                                   "metadata_bytes_per_token")
        self.prefill_skips_kv_layers = tuple(int(x) for x in self.prefill_skips_kv_layers)
        for key, low in (("key_bits", 0.0), ("value_bits", 0.0), ("key_dim", 0.0)):
            for i, v in enumerate(getattr(self, key)):
                if not (v > low and math.isfinite(v)):
                    raise KVCompressError(f"{key}[{i}]={v!r} is invalid; valid: "
                                          + ("bits per stored element > 0" if "bits" in key else "a width > 0"))
        for key in ("value_dim", "metadata_bytes_per_token"):
            for i, v in enumerate(getattr(self, key)):
                if not (v >= 0 and math.isfinite(v)):
                    raise KVCompressError(f"{key}[{i}]={v!r} is invalid; valid: a number >= 0")
        if isinstance(self.dtype_bytes, bool) or not (self.dtype_bytes > 0):
            raise KVCompressError(f"dtype_bytes={self.dtype_bytes!r} is invalid; valid: bytes per element > 0")

    # ---- bytes -------------------------------------------------------------------------------------------
    def entry_bytes(self, layer: int) -> float:
        """Bytes of one kept (token, KV head) entry of ``layer``, metadata included."""
        return ((self.key_dim[layer] * self.key_bits[layer] + self.value_dim[layer] * self.value_bits[layer]) / 8
                + self.metadata_bytes_per_token[layer])

    def layer_bytes(self, layer: int) -> float:
        """Bytes ``layer`` stores: 0 if shared, else Σ_h kept_tokens[layer][h] · entry_bytes(layer)."""
        if layer in self.shared_layers:
            return 0.0
        return sum(self.kept_tokens[layer]) * self.entry_bytes(layer)

    def kv_bytes(self) -> float:
        """Bytes the compressed cache holds for one sequence."""
        return sum(self.layer_bytes(i) for i in range(self.model.num_layers))

    def capacity(self) -> list[float]:
        """Tokens per KV head a dense layer would hold at ``context_tokens``."""
        return self.model.layer_tokens(self.context_tokens)

    def dense_kv_bytes(self) -> float:
        """Σ_l cap_l · n_kv · (d_k + d_v) · dtype_bytes: the uncompressed cache in this profile's element size."""
        m = self.model
        return sum(self.capacity()) * m.num_kv_heads * (m.cache_key_dim + m.cache_value_dim) * self.dtype_bytes

    def layer_rates(self) -> list[float]:
        """Stored bytes per dense token, per layer: layer_bytes(l) / cap_l (what stays constant across contexts)."""
        return [self.layer_bytes(i) / c if c else 0.0 for i, c in enumerate(self.capacity())]

    def kv_bytes_at(self, context: float) -> float:
        """KV bytes at another context with every per-layer fraction held: Σ_l rate_l · cap_l(context)."""
        return sum(r * c for r, c in zip(self.layer_rates(), self.model.layer_tokens(context)))

    def kept_fractions(self) -> dict[str, float]:
        """Per-axis kept fractions (layer, head, token, hidden) and the overall byte fraction (module docstring)."""
        cap, heads = self.capacity(), self.model.num_kv_heads
        stored = [i for i in range(self.model.num_layers) if i not in self.shared_layers]
        all_cap = sum(cap)
        stored_cap = sum(cap[i] for i in stored)
        live = [(i, k) for i in stored for k in self.kept_tokens[i] if k > 0]
        live_cap = sum(cap[i] for i, _ in live)
        kept = sum(k for _, k in live)
        b0 = (self.model.cache_key_dim + self.model.cache_value_dim) * self.dtype_bytes
        total = self.kv_bytes()
        return {
            "layer": stored_cap / all_cap if all_cap else 0.0,
            "head": live_cap / (heads * stored_cap) if stored_cap else 0.0,
            "token": kept / live_cap if live_cap else 0.0,
            "hidden": total / (kept * b0) if kept else 0.0,
            "bytes": total / self.dense_kv_bytes(),
        }

    def at_context(self, context: int) -> CompressionProfile:
        """The same per-(layer, head) token fractions at another context: kept · cap_l(context) / cap_l."""
        if context == self.context_tokens:
            return self
        new_cap, cap = self.model.layer_tokens(context), self.capacity()
        rows = [[k * nc / c if c else 0.0 for k in row] for row, nc, c in zip(self.kept_tokens, new_cap, cap)]
        return dataclasses.replace(self, context_tokens=context, kept_tokens=rows)

    def prefill_saving(self) -> str:
        """What the prefill saves (:func:`describe_prefill_saving` of this profile's skipped layers)."""
        return describe_prefill_saving(self.prefill_skips_kv_layers)

    # ---- constructors ------------------------------------------------------------------------------------
    def at_dtype(self, dtype_bytes: float) -> CompressionProfile:
        """The same cache held in another element size (``kv_dtype``): with a dtype split, bits = fixed_bits +
        dtype_fraction · 8 · dtype_bytes; without one, widths at or above the old dtype's become the new dtype's
        and narrower (quantised) widths stay as they are."""
        old, new = 8 * self.dtype_bytes, 8 * dtype_bytes
        if self.fixed_bits:
            kb = [f + d * new for f, d in zip(self.fixed_bits, self.dtype_fraction)]
            return dataclasses.replace(self, dtype_bytes=dtype_bytes, key_bits=kb, value_bits=list(kb))
        return dataclasses.replace(self, dtype_bytes=dtype_bytes,
                                   key_bits=[new if b >= old else b for b in self.key_bits],
                                   value_bits=[new if b >= old else b for b in self.value_bits])

    @classmethod
    def dense(cls, model_profile: ModelProfile, context: int, dtype_bytes: float | None = None) -> CompressionProfile:
        """An uncompressed cache: every layer and KV head holds cap_l(context) tokens in ``dtype_bytes`` per element
        (default the model's dtype)."""
        rows = [[float(c)] * model_profile.num_kv_heads for c in model_profile.layer_tokens(context)]
        nbytes = model_profile.dtype_bytes if dtype_bytes is None else dtype_bytes
        return cls(model_profile, context, rows, dtype_bytes=nbytes, name="dense")

    @classmethod
    def uniform(cls, model_profile: ModelProfile, context: int, token_fraction: float = 1.0,
                head_fraction: float = 1.0, layer_fraction: float = 1.0, key_bits: float | None = None,
                value_bits: float | None = None, group_size: int | None = None, rank_fraction: float = 1.0,
                scale_bytes: int = 2, zero_point: bool = True, extra_prefill_flops: float = 0.0,
                name: str = "uniform") -> CompressionProfile:
        """The paper's per-axis example factors, rounded to what a cache can realise.

        * layer: round(L·layer_fraction) layers (≥ 1), evenly spaced, store KV; every other layer reuses the
          nearest stored layer above it (cross-layer sharing).
        * head: round(L_stored·H·head_fraction) (layer, head) slots (≥ 1), head-major round robin, keep tokens;
          the others keep none.
        * token: each kept slot keeps token_fraction · cap_l tokens.
        * hidden: key_dim = value_dim = round(d_h·rank_fraction) (projection matrices are a per-layer constant,
          not charged); key_bits/value_bits bits per element (default: the model's dtype width); with
          ``group_size`` g, every group of g elements stores a scale (and a zero point) of ``scale_bytes``:
          metadata per (token, head) = (⌈key_dim/g⌉ + ⌈value_dim/g⌉) · scale_bytes · (2 if zero_point else 1).
          The same count holds for per-channel key grouping along tokens (d_h scales per g tokens).
        """
        m = model_profile
        n_layers, heads, bits = m.num_layers, m.num_kv_heads, 8 * m.dtype_bytes
        for nm, frac in (("token_fraction", token_fraction), ("head_fraction", head_fraction),
                         ("layer_fraction", layer_fraction), ("rank_fraction", rank_fraction)):
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.0 < frac <= 1.0):
                raise KVCompressError(f"{nm}={frac!r} is out of range; valid: a kept fraction in (0, 1]")
        for nm, nbits in (("key_bits", key_bits), ("value_bits", value_bits)):
            if nbits is not None and (isinstance(nbits, bool) or not isinstance(nbits, (int, float))
                                      or not (0.0 < nbits <= 64.0)):
                raise KVCompressError(f"{nm}={nbits!r} is invalid; valid: bits per stored element in (0, 64]")
        n_store = max(1, round(n_layers * layer_fraction))
        stored = sorted({math.floor(i * n_layers / n_store) for i in range(n_store)})
        shared, last = {}, stored[0]
        for i in range(n_layers):
            if i in stored:
                last = i
            else:
                shared[i] = last if last < i else stored[0]
        n_slots = max(1, round(len(stored) * heads * head_fraction))
        order = [(layer, h) for h in range(heads) for layer in stored][:n_slots]
        live = set(order)
        cap = m.layer_tokens(context)
        rows = [[cap[i] * token_fraction if (i, h) in live else 0.0 for h in range(heads)] for i in range(n_layers)]
        kb = float(bits if key_bits is None else key_bits)
        vb = float(bits if value_bits is None else value_bits)
        dim = max(1, round(m.cache_key_dim * rank_fraction))
        vdim = max(1, round(m.cache_value_dim * rank_fraction)) if m.cache_value_dim else 0
        meta = 0.0
        if group_size is not None:
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
                raise KVCompressError(f"group_size={group_size!r} is invalid; valid: an integer >= 1 or None")
            groups = (math.ceil(dim / group_size) if kb < bits else 0) + (math.ceil(vdim / group_size) if vb < bits
                                                                           else 0)
            meta = groups * scale_bytes * (2 if zero_point else 1)
        return cls(m, context, rows, dtype_bytes=m.dtype_bytes, key_bits=[kb] * n_layers,
                   value_bits=[vb] * n_layers, key_dim=[dim] * n_layers, value_dim=[vdim] * n_layers,
                   metadata_bytes_per_token=[meta] * n_layers, shared_layers=shared,
                   extra_prefill_flops=extra_prefill_flops, name=name)

    @classmethod
    def from_report(cls, report: Mapping[str, Any], model_profile: ModelProfile) -> CompressionProfile:
        """From the plain dict a compressed cache reports (keys named as the fields; scalars broadcast per layer).

        Required: ``kept_tokens`` (list of per-layer lists of per-KV-head floats), ``context_tokens``. Optional:
        ``dtype_bytes`` (default the model's), ``key_bits``, ``value_bits``, ``fixed_bits`` + ``dtype_fraction``
        (the dtype split of the bits, module docstring), ``key_dim``, ``value_dim``, ``metadata_bytes_per_token``,
        ``shared_layers`` (JSON string keys accepted), ``extra_prefill_flops``, ``prefill_skips_kv_layers``.
        """
        for key in ("kept_tokens", "context_tokens"):
            if report.get(key) is None:
                raise KVCompressError(f"compression report lacks {key!r}; valid keys: kept_tokens, context_tokens, "
                                      "dtype_bytes, key_bits, value_bits, fixed_bits, dtype_fraction, key_dim, "
                                      "value_dim, metadata_bytes_per_token, shared_layers, extra_prefill_flops, "
                                      "prefill_skips_kv_layers")
        n = model_profile.num_layers
        return cls(
            model_profile, report["context_tokens"], [list(r) for r in report["kept_tokens"]],
            dtype_bytes=float(report.get("dtype_bytes") or model_profile.dtype_bytes),
            key_bits=_opt(report.get("key_bits"), n, "key_bits"),
            value_bits=_opt(report.get("value_bits"), n, "value_bits"),
            key_dim=_opt(report.get("key_dim"), n, "key_dim"), value_dim=_opt(report.get("value_dim"), n, "value_dim"),
            metadata_bytes_per_token=_opt(report.get("metadata_bytes_per_token"), n, "metadata_bytes_per_token"),
            fixed_bits=_opt(report.get("fixed_bits"), n, "fixed_bits"),
            dtype_fraction=_opt(report.get("dtype_fraction"), n, "dtype_fraction"),
            shared_layers=dict(report.get("shared_layers") or {}),
            extra_prefill_flops=float(report.get("extra_prefill_flops") or 0.0),
            prefill_skips_kv_layers=tuple(report.get("prefill_skips_kv_layers") or ()),
            name=str(report.get("name", "report")),
        )


def _opt(value: Any, n: int, name: str) -> list[float]:
    """Per-layer list from a report value; None entries fall back to the default later (encoded as [])."""
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str) and any(v is None for v in value):
        raise KVCompressError(f"{name} has a None entry; valid: one number per layer ({n}) or a scalar")
    return _per_layer(value, n, 0.0, name)


def describe_prefill_saving(skipped_layers: Sequence[int]) -> str:
    """``"memory-only"`` (every layer's K/V is still computed during the prefill) or ``"skips K/V of layers [...]"``
    (those layers' K/V projections are not computed; the prefill term subtracts their FLOPs)."""
    skips = sorted(set(skipped_layers))
    return f"skips K/V of layers {skips}" if skips else "memory-only"
