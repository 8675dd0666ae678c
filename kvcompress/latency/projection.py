"""Projection of a measured :class:`~kvcompress.latency.profile.CompressionProfile` onto another model and context:
:func:`project` (the rule is in its docstring) and its overlap weights (:func:`_overlap`).
"""

from __future__ import annotations

from ..errors import KVCompressError
from .fixed import FixedParts
from .model_profile import ModelProfile
from .profile import CompressionProfile


def _overlap(n_src: int, n_tgt: int) -> list[list[tuple[int, float]]]:
    """For each target index j, the source indices i whose relative span [i/n_s, (i+1)/n_s) overlaps
    [j/n_t, (j+1)/n_t), with the overlap as a share of the target's span (the shares of each j sum to 1; every
    source index is weighted n_t/n_s in total, so means over sources are kept)."""
    out = []
    for j in range(n_tgt):
        lo, hi = j * n_src, (j + 1) * n_src  # in units of 1 / (n_s·n_t)
        row = []
        for i in range(lo // n_tgt, min(n_src, -(-hi // n_tgt))):
            share = min(hi, (i + 1) * n_tgt) - max(lo, i * n_tgt)
            if share > 0:
                row.append((i, share / n_src))
        out.append(row)
    return out


def project(profile: CompressionProfile, target_model_profile: ModelProfile, target_context: int,
            fixed: FixedParts | None = None, kv_dtype_bytes: float | None = None) -> CompressionProfile:
    """Transfer a run's measured fractions onto another model and context (averaging, never sampling).

    Rule (relative depth and relative head index, by overlap):

    * target layer j takes the mean of the source layers i whose relative span [i/L_s, (i+1)/L_s) overlaps
      [j/L_t, (j+1)/L_t), weighted by the overlap (:func:`_overlap`); target KV head h likewise over the source
      heads. A run with more layers or heads than the target is averaged (32 heads keeping 25% → 25% of each of 8),
      one with fewer is spread; the mean over all slots is kept either way;
    * each source slot's kept tokens become target tokens by :meth:`FixedParts.slot_tokens`: a fraction
      ``kept / cap_s`` of the target capacity ``cap_t(j, target_context)``, except fixed-size parts (windowed slots
      of ``heads`` / ``layers``, a ``budget``), which keep their token count (:mod:`kvcompress.latency.fixed`);
      capped at cap_t;
    * element widths: a hidden-axis codec's full-precision residual (``fixed.residual`` = R tokens) is separated
      from the encoded part at the source (P(K) plain tokens per slot) and re-applied at the target as min(K_t, R)
      tokens in the target's dtype, the rest at the encoded part's bits. With a dtype split (``fixed_bits`` /
      ``dtype_fraction``, what a cache reports) bits in the cache's own dtype scale with the target dtype
      (``kv_dtype_bytes``, default the target model's) and integer codes, float16 scales and indices keep their
      absolute bits; without one, a width at or above the source dtype's means "not quantised" (the target dtype's
      width) and a narrower one is kept as is. Kept widths scale with the cached widths (d_k, d_v: an MLA target
      holds a latent of r_kv + d_rope), and so does the per-entry metadata;
    * layer j is shared iff most of its overlap is with shared source layers and an earlier target layer is stored
      (it then reuses the latest stored one); it skips its prefill K/V projection iff most of its overlap skips;
    * ``extra_prefill_flops`` keeps its fraction of the dense prefill FLOPs (2·P_body,act·n + 2·V·d + A₂(n)).
    """
    src, tgt = profile.model, target_model_profile
    if isinstance(target_context, bool) or not isinstance(target_context, int) or target_context <= 0:
        raise KVCompressError(f"target_context={target_context!r} is invalid; valid: an integer >= 1")
    fixed = fixed or FixedParts()
    kvb = float(kv_dtype_bytes or tgt.dtype_bytes)
    ls, lt, hs, ht = src.num_layers, tgt.num_layers, src.num_kv_heads, tgt.num_kv_heads
    n_s = float(profile.context_tokens)
    cap_s, cap_t = profile.capacity(), tgt.layer_tokens(target_context)
    src_bits, tgt_bits = 8 * profile.dtype_bytes, 8 * kvb
    k_scale = tgt.cache_key_dim / src.cache_key_dim
    v_scale = (tgt.cache_value_dim / src.cache_value_dim if src.cache_value_dim
               else tgt.cache_value_dim / src.cache_key_dim)
    m_scale = (tgt.cache_key_dim + tgt.cache_value_dim) / (src.cache_key_dim + src.cache_value_dim)
    by_layer, by_head = _overlap(ls, lt), _overlap(hs, ht)
    decoded = fixed.decoded_tokens(profile.kept_tokens, cap_s, n_s)
    split = bool(profile.fixed_bits)
    # per source layer: kept tokens, unencoded (residual) tokens, and the encoded part's bits
    enc = []
    for i in range(ls):
        row = profile.kept_tokens[i]
        kept = sum(row)
        plain = sum(fixed.plain_tokens(k) for k in row) if fixed.residual is not None else 0.0
        coded = kept - plain
        if split:
            f, d = profile.fixed_bits[i], profile.dtype_fraction[i]
            if coded > 1e-9:
                f_enc, d_enc = f * kept / coded, max(0.0, (d * kept - plain) / coded)
            else:  # nothing encoded at the run: the encoded part is charged at full precision (conservative)
                f_enc, d_enc = 0.0, 1.0
            enc.append((coded, f_enc, d_enc, None, None))
        else:
            def coded_bits(bits: float) -> float:
                b = (bits * kept - src_bits * plain) / coded if coded > 1e-9 else src_bits
                return tgt_bits if b >= src_bits - 1e-9 else b
            enc.append((coded, 0.0, 0.0, coded_bits(profile.key_bits[i]), coded_bits(profile.value_bits[i])))
    rows, kb, vb, kd, vd, meta, fixed_t, frac_t = [], [], [], [], [], [], [], []
    shared: dict[int, int] = {}
    skips = []
    last_stored: int | None = None
    for j in range(lt):
        span = by_layer[j]
        stored_w = sum(w for i, w in span if i not in profile.shared_layers)
        skip_w = sum(w for i, w in span if i in profile.prefill_skips_kv_layers)
        use = [(i, w / stored_w) for i, w in span if i not in profile.shared_layers] if stored_w > 0 else span
        row = []
        for h in range(ht):
            tokens = sum(wi * wh * fixed.slot_tokens(profile.kept_tokens[i][g], cap_s[i], n_s, cap_t[j],
                                                     float(target_context), decoded)
                         for i, wi in use for g, wh in by_head[h])
            row.append(min(cap_t[j], tokens))
        rows.append(row)
        total = sum(row)
        plain = sum(fixed.target_plain_tokens(k) for k in row) if fixed.residual is not None else 0.0
        coded = total - plain
        weights = [(i, wi * enc[i][0]) for i, wi in use]
        norm = sum(w for _, w in weights)
        weights = [(i, w / norm) for i, w in weights] if norm > 0 else use
        if split:
            f_enc = sum(w * enc[i][1] for i, w in weights)
            d_enc = sum(w * enc[i][2] for i, w in weights)
            f_j = coded * f_enc / total if total else 0.0
            d_j = (plain + coded * d_enc) / total if total else 1.0
            fixed_t.append(f_j)
            frac_t.append(d_j)
            kb.append(f_j + d_j * tgt_bits)
            vb.append(kb[-1])
        else:
            for out, idx in ((kb, 3), (vb, 4)):
                b_enc = sum(w * enc[i][idx] for i, w in weights)
                out.append((plain * tgt_bits + coded * b_enc) / total if total else b_enc)
        kd.append(sum(w * profile.key_dim[i] for i, w in use) * k_scale)
        vd.append(sum(w * (profile.value_dim[i] if src.cache_value_dim else profile.key_dim[i]) for i, w in use)
                  * v_scale)
        meta.append(sum(w * profile.metadata_bytes_per_token[i] for i, w in use) * m_scale)
        if stored_w < 0.5 and last_stored is not None:
            shared[j] = last_stored
        else:
            last_stored = j
        if skip_w >= 0.5:
            skips.append(j)
    dense_src = (2 * src.body_params_active * n_s + 2 * src.lm_head_params
                 + src.attention_flops(int(profile.context_tokens), matmuls=2))
    dense_tgt = (2 * tgt.body_params_active * target_context + 2 * tgt.lm_head_params
                 + tgt.attention_flops(target_context, matmuls=2))
    extra = profile.extra_prefill_flops * dense_tgt / dense_src
    return CompressionProfile(tgt, target_context, rows, dtype_bytes=kvb, key_bits=kb, value_bits=vb,
                              key_dim=kd, value_dim=vd, metadata_bytes_per_token=meta, fixed_bits=fixed_t,
                              dtype_fraction=frac_t, shared_layers=shared, extra_prefill_flops=extra,
                              prefill_skips_kv_layers=tuple(skips), name=f"{profile.name}->{tgt.name}")
