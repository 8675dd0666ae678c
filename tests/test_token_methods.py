"""Token scorers against direct, readable reference computations of their papers' definitions (exact kept sets).

Inputs are random tensors in a left-padded batch with GQA (4 query heads, 2 KV heads), odd row lengths, a row
shorter than the observation window, budgets larger than the context (every row, or some rows of the batch), and
ties. References loop over rows, heads and tokens on the row's real entries only.

Tie rule (every scorer): among entries with equal scores the lowest position wins, i.e. the row's earliest tokens
are kept first (the code's stable sort; the references' ``(-score, position)`` order). Each scorer is checked on a
row whose scores tie exactly, in float32 and float64 alike.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

import kvcompress
from kvcompress import KVCompressError
from kvcompress.compat import cache_arg
from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.methods.token.budgets import pyramid_budget
from kvcompress.methods.token.scoring import attention_mass
from kvcompress.ragged import index_bytes
from kvcompress.registry import make_compressor

HQ, H, D = 4, 2, 8
G = HQ // H
LENGTHS = (37, 51, 9)  # odd lengths; the last row is shorter than snapkv's window in some tests


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=H, head_dim=D,
                       num_hidden_layers=4, intermediate_size=16, vocab_size=32, max_position_embeddings=4096)


def _batch(lengths: tuple[int, ...] = LENGTHS, seed: int = 0, ties: bool = False) -> tuple[LayerView, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    b = len(lengths)
    keys = torch.randn(b, H, n, D, generator=g)
    values = torch.randn(b, H, n, D, generator=g)
    query = torch.randn(b, HQ, n, D, generator=g)
    if ties:  # row 0: every key, value and query identical -> every score of a single query's attention ties
        keys[0] = keys[0, :, :1]
        values[0] = values[0, :, :1]
        query[0] = query[0, :, :1]
    valid = torch.zeros(b, H, n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        valid[i, :, n - length:] = True
    return LayerView(keys, values, valid), query


LIVE_EVERY = 5  # _h2o_tie_batch: row 0's live keys


def _h2o_tie_batch() -> tuple[LayerView, torch.Tensor]:
    """Ties for accumulated attention. With identical keys a causal column sum still decreases with the position, so
    row 0 instead gets one query vector q everywhere, zero keys at row positions 0, 5, 10, ... (logit 0) and keys
    ``-1e4·q/|q|²`` elsewhere (logit ≈ −3500: exp is exactly 0 in float32 and float64). Every query sees the live key
    0, so every dead key's accumulated attention is exactly 0: 29 of the row's 37 entries tie."""
    view, query = _batch()
    pad = view.valid.shape[-1] - LENGTHS[0]
    q = query[0, 0, -1].clone()
    query[0] = q
    positions = torch.arange(view.valid.shape[-1]) - pad
    dead = positions % LIVE_EVERY != 0
    view.keys[0] = torch.where(dead[:, None], -1e4 * q / q.dot(q), torch.zeros(D))
    return view, query


def _ctx(view, query, layer=0, layers=4, module=None):
    module = module if module is not None else SimpleNamespace(scaling=D**-0.5)
    return CompressionContext(layer_idx=layer, num_layers=layers, phase="prefill", query=query, module=module,
                              num_kv_heads=H, state={}, shared={})


def _rows(view, query):
    """Per row: keys, values (H, n_r, D) and queries (HQ, n_r, D) of the row's real tokens."""
    n = view.valid.shape[-1]
    for i in range(view.valid.shape[0]):
        sel = view.valid[i, 0]
        yield i, view.keys[i][:, sel], view.values[i][:, sel], query[i][:, sel[-n:]]


def _budget(n, ratio=None, budget=None):
    return min(budget, n) if budget is not None else min(n, max(1, round(ratio * n)))


def _keep(scores, kept, sink=0, recent=0):
    """Readable selection: first min(sink, kept), newest min(recent, rest), then best scores, ties to earlier."""
    n = len(scores)
    s = min(sink, kept)
    r = min(recent, kept - s)
    chosen = set(range(s)) | set(range(n - r, n))
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-scores[i], i))
    return sorted(chosen | set(rest[: kept - len(chosen)]))


def _kept_sets(keep, view):
    out = []
    for i in range(keep.shape[0]):
        rank = view.valid[i, 0].nonzero().squeeze(-1)
        out.append([sorted((rank.tolist().index(j) for j in keep[i, h].nonzero().squeeze(-1).tolist())) for h in range(H)])
    return out


def _softmax_rows(logits):
    return torch.softmax(logits.double(), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# References


def ref_snapkv(view, query, kept_of, window=32, kernel=7, pooling="max", sink=0):
    out = []
    for _, k, _, q in _rows(view, query):
        n = k.shape[1]
        w = min(window, n)
        prefix = max(n - window, 0)
        heads = []
        for h in range(H):
            per_q = []
            for j in range(G):
                qs = q[h * G + j, n - w:].double()
                logits = qs @ k[h].double().T * D**-0.5
                for i in range(w):  # causal inside the window
                    logits[i, n - w + i + 1:] = -math.inf
                col = _softmax_rows(logits).sum(0)[:prefix]
                pooled = []
                for t in range(prefix):
                    lo, hi = max(0, t - kernel // 2), min(prefix, t + kernel // 2 + 1)
                    pooled.append(col[lo:hi].max().item() if pooling == "max" else col[lo:hi].sum().item() / kernel)
                per_q.append(pooled)
            score = [sum(p[t] for p in per_q) / G for t in range(prefix)] + [0.0] * (n - prefix)
            heads.append(_keep(score, kept_of(n), sink=sink, recent=window))
        out.append(heads)
    return out


def ref_h2o(view, query, kept_of, recent=0.5):
    out = []
    for _, k, _, q in _rows(view, query):
        n = k.shape[1]
        heads = []
        for h in range(H):
            acc = torch.zeros(n, dtype=torch.float64)
            for j in range(G):
                logits = q[h * G + j].double() @ k[h].double().T * D**-0.5
                logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
                acc += _softmax_rows(logits).sum(0)  # column sums over every prompt query
            kept = kept_of(n)
            heads.append(_keep((acc / G).tolist(), kept, recent=round(kept * recent)))
        out.append(heads)
    return out


def ref_tova(view, query, kept_of):
    out = []
    for _, k, _, q in _rows(view, query):
        n = k.shape[1]
        score = sum(_softmax_rows(q[hq, -1].double() @ k[hq // G].double().T * D**-0.5) for hq in range(HQ)) / HQ
        out.append([_keep(score.tolist(), kept_of(n))] * H)
    return out


def ref_knorm(view, query, kept_of):
    return [[_keep((-k[h].double().norm(dim=-1)).tolist(), kept_of(k.shape[1])) for h in range(H)]
            for _, k, _, _ in _rows(view, query)]


# ---------------------------------------------------------------------------------------------------------------
# Tests: one scorer at a time


@pytest.mark.parametrize("kw", [dict(ratio=0.3), dict(budget=20), dict(budget=500), dict(ratio=0.5, kernel=5, pooling="avg"),
                                dict(ratio=0.4, window=8, sink=2)])
def test_snapkv_matches_reference(kw) -> None:
    view, query = _batch()
    comp = make_compressor("snapkv", **kw)
    keep = comp.select(view, _ctx(view, query))
    ref = ref_snapkv(view, query, lambda n: _budget(n, kw.get("ratio"), kw.get("budget")),
                     window=comp.window, kernel=comp.kernel, pooling=comp.pooling, sink=comp.sink)
    assert _kept_sets(keep, view) == ref
    if kw.get("budget") == 500:
        assert torch.equal(keep, view.valid)  # a budget beyond the context keeps everything


def test_snapkv_ties_go_to_earlier_positions() -> None:
    view, query = _batch(ties=True)
    keep = make_compressor("snapkv", ratio=0.6, window=4, pooling="none").select(view, _ctx(view, query))
    kept = _kept_sets(keep, view)[0][0]
    n = LENGTHS[0]
    assert kept == list(range(round(0.6 * n) - 4)) + list(range(n - 4, n))


@pytest.mark.parametrize("kw", [dict(ratio=0.3), dict(budget=11), dict(budget=400), dict(ratio=0.5, recent=0.2)])
def test_h2o_matches_reference(kw) -> None:
    view, query = _batch()
    comp = make_compressor("h2o", chunk=7, **kw)  # a small chunk exercises the blocked accumulation
    keep = comp.select(view, _ctx(view, query))
    assert _kept_sets(keep, view) == ref_h2o(view, query, lambda n: _budget(n, kw.get("ratio"), kw.get("budget")),
                                             recent=comp.recent)


def test_h2o_ties_go_to_earlier_positions() -> None:
    view, query = _h2o_tie_batch()
    comp = make_compressor("h2o", ratio=0.6, chunk=7)
    keep = comp.select(view, _ctx(view, query))
    kept_sets = _kept_sets(keep, view)
    assert kept_sets == ref_h2o(view, query, lambda n: _budget(n, 0.6), recent=comp.recent)
    n = LENGTHS[0]
    kept = _budget(n, 0.6)
    recent = round(kept * comp.recent)
    older = range(n - recent)
    live = [t for t in older if t % LIVE_EVERY == 0]
    dead = [t for t in older if t % LIVE_EVERY != 0]
    heavy = sorted(live + dead[: kept - recent - len(live)])  # every live key, then the earliest tied dead keys
    assert kept_sets[0] == [heavy + list(range(n - recent, n))] * H


def test_attention_mass_chunks_agree_and_never_build_s_by_s() -> None:
    view, query = _batch()
    qv = view.valid.any(1)
    full = attention_mass(query, view.keys, view.valid, D**-0.5, query_valid=qv, chunk=10_000)
    for chunk in (1, 5, 16):
        torch.testing.assert_close(attention_mass(query, view.keys, view.valid, D**-0.5, query_valid=qv, chunk=chunk), full)
    # each valid query's attention sums to 1 over its row's keys
    assert torch.allclose(full.sum(-1), qv.sum(-1, keepdim=True).float().expand(-1, HQ), atol=1e-4)


@pytest.mark.parametrize(("kw", "ties"), [(dict(ratio=0.3), False), (dict(budget=10), False), (dict(budget=100), False),
                                          (dict(ratio=0.3), True)])
def test_tova_matches_reference_one_set_per_layer(kw: dict, ties: bool) -> None:
    view, query = _batch(ties=ties)
    keep = make_compressor("tova", **kw).select(view, _ctx(view, query))
    kept_of = lambda n: _budget(n, kw.get("ratio"), kw.get("budget"))  # noqa: E731
    assert _kept_sets(keep, view) == ref_tova(view, query, kept_of)
    if ties:  # the last query attends equally to every key of row 0: the earliest ones are kept
        assert _kept_sets(keep, view)[0] == [list(range(kept_of(LENGTHS[0])))] * H


@pytest.mark.parametrize(("kw", "ties"), [(dict(ratio=0.35), False), (dict(ratio=0.35), True), (dict(budget=45), False),
                                          (dict(budget=100), False)])
def test_knorm_matches_reference(kw: dict, ties: bool) -> None:
    view, query = _batch(ties=ties)
    keep = make_compressor("knorm", **kw).select(view, _ctx(view, query))
    assert _kept_sets(keep, view) == ref_knorm(view, query, lambda n: _budget(n, kw.get("ratio"), kw.get("budget")))
    if ties:
        assert _kept_sets(keep, view)[0][0] == list(range(round(0.35 * LENGTHS[0])))
    if kw.get("budget", 0) >= max(LENGTHS):  # a budget beyond every row's context keeps everything
        assert torch.equal(keep, view.valid)


def _rope_queries(pre: torch.Tensor, rope: LlamaRotaryEmbedding, offset: int) -> torch.Tensor:
    """Post-RoPE queries: each row's pre-RoPE queries rotated by HF's RoPE at its own positions, ``offset`` onwards."""
    n = pre.shape[2]
    query = torch.empty_like(pre)
    for i in range(pre.shape[0]):
        pos = (torch.arange(n) - (n - LENGTHS[i]) + offset).clamp(min=0).view(1, -1)
        cos, sin = rope(pre, pos)
        query[i] = apply_rotary_pos_emb(pre[i:i + 1], pre[i:i + 1], cos, sin)[0][0]
    return query


def ref_expected_attention(view: LayerView, pre: torch.Tensor, kept_of: Callable[[int], int], rope: LlamaRotaryEmbedding,
                           offset: int, sink: int = 4, n_future: int = 512) -> list[list[list[int]]]:
    """Fit N(mu, cov) to each query head's pre-RoPE queries (sinks excluded), rotate both by HF's own rotation matrices
    averaged over the next ``n_future`` positions, score each non-sink key by the softmax of
    k·mu/sqrt(d) + k^T cov k/(2d), averaged over the GQA group and times |v|; sinks are always kept."""

    def rotation(p: int) -> torch.Tensor:  # HF's rotation at position p as a d x d matrix (acting on column vectors)
        cos, sin = rope(torch.zeros(1), torch.tensor([[p]]))
        eye = torch.eye(D).view(1, 1, D, D)
        return apply_rotary_pos_emb(eye, eye, cos.view(1, 1, D), sin.view(1, 1, D))[0][0, 0].double().T

    out = []
    for _, k, v, q_pre in _rows(view, pre):
        length = k.shape[1]
        r_bar = sum(rotation(offset + length + j) for j in range(n_future)) / n_future
        heads = []
        for h in range(H):
            probs = []
            for j in range(G):
                qs = q_pre[h * G + j, sink:].double()
                mu = qs.mean(0)
                cov = (qs - mu).T @ (qs - mu) / qs.shape[0]
                mu, cov = r_bar @ mu, r_bar @ cov @ r_bar.T
                kk = k[h, sink:].double()
                logits = kk @ mu / math.sqrt(D) + 0.5 * ((kk @ cov) * kk).sum(-1) / D
                probs.append(torch.softmax(logits, -1))
            score = (sum(probs) / G) * v[h, sink:].double().norm(dim=-1)
            heads.append(_keep([0.0] * sink + score.tolist(), kept_of(length), sink=sink))
        out.append(heads)
    return out


@pytest.mark.parametrize(("kw", "ties"), [(dict(ratio=0.4), False), (dict(ratio=0.4), True), (dict(budget=45), False),
                                          (dict(budget=500), False)])
def test_expected_attention_matches_reference_from_pre_rope_queries(kw: dict, ties: bool) -> None:
    """Queries are made pre-RoPE, rotated by HF's RoPE at positions with an arbitrary offset; the reference fits the
    Gaussian to the pre-RoPE queries and averages HF's own rotation matrices over the 512 future positions."""
    config = _config()
    rope = LlamaRotaryEmbedding(config)
    view, pre = _batch(seed=3, ties=ties)
    query = _rope_queries(pre, rope, offset=5)
    ctx = _ctx(view, query, module=LlamaAttention(config, layer_idx=0))
    comp = make_compressor("expected_attention", **kw)
    comp.prepare(rope)  # the RoPE frequencies come from the model's rotary embedding
    keep = comp.select(view, ctx)
    kept_of = lambda n: _budget(n, kw.get("ratio"), kw.get("budget"))  # noqa: E731
    assert _kept_sets(keep, view) == ref_expected_attention(view, pre, kept_of, rope, offset=5)
    if ties:  # identical keys and values: every non-sink entry of row 0 ties, the earliest are kept after the sinks
        assert _kept_sets(keep, view)[0] == [list(range(kept_of(LENGTHS[0])))] * H
    if kw.get("budget", 0) >= max(LENGTHS):
        assert torch.equal(keep, view.valid)


def test_adakv_allocation_matches_reference_and_keeps_the_total() -> None:
    view, query = _batch()
    comp = make_compressor("knorm", ratio=0.3, allocation="adakv", floor=0.2, sink=1)
    keep = comp.select(view, _ctx(view, query))
    for i, k, _, _ in _rows(view, query):
        n = k.shape[1]
        kept = _budget(n, 0.3)
        safe = math.floor(0.2 * kept)
        scores = [(-k[h].double().norm(dim=-1)).tolist() for h in range(H)]
        guaranteed = {(h, t) for h in range(H) for t in _keep(scores[h], max(safe, 1), sink=1)}
        ranked = sorted(((h, t) for h in range(H) for t in range(n)),
                        key=lambda ht: (ht not in guaranteed, -scores[ht[0]][ht[1]], ht[0], ht[1]))
        chosen = ranked[: H * kept]
        expected = [sorted(t for hh, t in chosen if hh == h) for h in range(H)]
        assert _kept_sets(keep, view)[i] == expected
        assert int(keep[i].sum()) == H * kept  # same total as uniform, distributed across heads


def test_pyramid_budgets_follow_the_formula() -> None:
    c, w, beta, layers = 100, 8, 20.0, 4
    expected = []
    for layer in range(layers):
        low = (c - w) / beta
        high = 2 * (c - w) - low
        expected.append(round(high - layer * (high - low) / (layers - 1)) + w)
    got = [int(pyramid_budget(torch.tensor([c]), torch.tensor([1000]), w, beta, layer, layers)) for layer in range(layers)]
    assert got == expected and abs(sum(got) - layers * c) <= layers
    # fallbacks: budget within the window, a pyramid wider than the context, a budget covering the row
    for c_, n_ in ((6, 1000), (100, 150), (150, 150)):
        assert int(pyramid_budget(torch.tensor([c_]), torch.tensor([n_]), w, beta, 0, layers)) == c_


@pytest.mark.parametrize(("kw", "ties"), [(dict(ratio=0.5), False), (dict(ratio=0.5), True), (dict(budget=45), False),
                                          (dict(budget=500), False)])
def test_pyramidkv_keeps_snapkv_sets_at_the_layer_budget(kw: dict, ties: bool) -> None:
    lengths = (101, 87, 9)
    view, query = _batch(lengths=lengths, ties=ties)
    for layer in (0, 3):
        keep = make_compressor("pyramidkv", window=8, **kw).select(view, _ctx(view, query, layer=layer))
        uniform = lambda n: _budget(n, kw.get("ratio"), kw.get("budget"))  # noqa: E731
        budget = lambda n: int(pyramid_budget(torch.tensor([uniform(n)]), torch.tensor([n]), 8, 20.0, layer, 4))  # noqa: E731
        assert _kept_sets(keep, view) == ref_snapkv(view, query, budget, window=8)
        if ties:  # every prefix entry of row 0 ties: the earliest fill the layer's budget, then the window
            kept = budget(lengths[0])
            assert _kept_sets(keep, view)[0] == [list(range(kept - 8)) + list(range(lengths[0] - 8, lengths[0]))] * H
        if kw.get("budget", 0) >= max(lengths):  # keeps everything in every layer
            assert torch.equal(keep, view.valid)


@pytest.mark.parametrize("kw", [dict(ratio=0.4), dict(budget=45), dict(budget=500)])
def test_merge_folds_evicted_entries_into_most_similar_kept_entry(kw: dict) -> None:
    view, query = _batch()
    original = LayerView(view.keys.clone(), view.values.clone(), view.valid)
    comp = make_compressor("merge", scorer="knorm", **kw)
    keep = comp.select(view, _ctx(view, query))
    assert torch.equal(keep, make_compressor("knorm", **kw).select(original, _ctx(original, query)))
    if kw.get("budget", 0) >= max(LENGTHS):  # nothing evicted: everything kept, nothing merged
        assert torch.equal(keep, view.valid)
        assert torch.equal(view.keys, original.keys) and torch.equal(view.values, original.values)
    for i in range(keep.shape[0]):
        for h in range(H):
            kept = keep[i, h].nonzero().squeeze(-1).tolist()
            evicted = (original.valid[i, h] & ~keep[i, h]).nonzero().squeeze(-1).tolist()
            num = {m: (original.keys[i, h, m].double().clone(), original.values[i, h, m].double().clone(), 1.0) for m in kept}
            for e in evicted:
                ke = original.keys[i, h, e].double()
                sims = [torch.nn.functional.cosine_similarity(ke, original.keys[i, h, m].double(), dim=0).item() for m in kept]
                best = max(range(len(kept)), key=lambda j: (sims[j], -j))
                if sims[best] > 0:
                    k_, v_, w_ = num[kept[best]]
                    num[kept[best]] = (k_ + sims[best] * ke, v_ + sims[best] * original.values[i, h, e].double(), w_ + sims[best])
            for m, (k_, v_, w_) in num.items():
                torch.testing.assert_close(view.keys[i, h, m].double(), k_ / w_, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(view.values[i, h, m].double(), v_ / w_, atol=1e-5, rtol=1e-5)


def test_errors_are_one_line_and_name_the_choices() -> None:
    with pytest.raises(KVCompressError, match="pooling 'mean'; valid choices: avg, max, none"):
        make_compressor("snapkv", pooling="mean")
    with pytest.raises(KVCompressError, match="kernel=4"):
        make_compressor("snapkv", kernel=4)
    with pytest.raises(KVCompressError, match="unknown parameter 'phase' for method 'knorm'"):
        make_compressor("knorm", phase="decode")
    with pytest.raises(KVCompressError, match="valid choices: adakv, scores, uniform"):
        make_compressor("knorm", allocation="x")
    with pytest.raises(KVCompressError, match="scorer 'random'"):
        make_compressor("merge", scorer="random")
    with pytest.raises(KVCompressError, match="same axis"):
        kvcompress.compress(tiny_model("llama"), "snapkv+streaming", ratio=0.5)


# ---------------------------------------------------------------------------------------------------------------
# End to end on a tiny model: ragged bytes, decode phase, batches


def _generate(model, rows, cache, steps=6):
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **cache_arg(cache))
    return [out[i, ids.shape[1]:].tolist() for i in range(len(rows))]


def test_kept_bytes_exact_for_ragged_adakv_budgets() -> None:
    model = tiny_model("llama")
    rows = prompts((37, 64, 23))
    cache = kvcompress.compress(model, "snapkv", ratio=0.3, allocation="adakv", window=4)
    _generate(model, rows, cache, steps=1)
    elem = 4
    expected = 0
    ragged = False
    for layer in cache.layers:
        per_pair = layer.kept_tokens()  # (batch, kv_heads) real tokens held
        ragged |= layer.ragged is not None
        expected += int(per_pair.sum()) * 2 * 16 * elem  # keys + values, head_dim 16, fp32
        if layer.ragged is not None:  # ragged index metadata: an int32 per page, per tail entry, two per pair
            expected += index_bytes([int(c) for c in per_pair.flatten().tolist()])
    assert ragged, "adakv should give heads different counts"
    assert cache.kept_bytes() == expected
    assert cache.kept_bytes() < cache.dense_bytes()


@pytest.mark.parametrize("method,kw", [("h2o", dict(budget=12)), ("tova", dict(budget=12)),
                                       ("snapkv", dict(budget=12, window=4, interval=2))])
def test_decode_phase_holds_the_budget_and_rows_stay_independent(method, kw) -> None:
    model = tiny_model("llama")
    rows = prompts((37, 8, 23))
    batch_cache = kvcompress.compress(model, method, phase="decode", **kw)
    batched = _generate(model, rows, batch_cache, steps=7)
    for i, row in enumerate(rows):
        alone = _generate(model, [row], kvcompress.compress(model, method, phase="decode", **kw), steps=7)
        assert alone[0] == batched[i]
    held = batch_cache.memory_report()["kept_tokens"]
    slack = kw.get("interval", 1) - 1
    for layer in held:
        for tokens in layer:
            assert tokens <= 12 + slack
    # the short row (8 tokens) grew to the budget instead of evicting below it
    assert all(int(t) == 12 or method == "snapkv" for t in batch_cache.layers[0].kept_tokens()[1].tolist())


def test_snapkv_decode_rescoring_when_fewer_entries_than_the_window() -> None:
    """Regression: ratio 0.3 of a 37-token prompt keeps 11 entries per head, fewer than the 32 window queries kept for
    re-scoring. Re-scoring used to assume the window queries were the layer's last 32 entries and crashed; it now
    uses only the queries whose tokens are the newest held entries, each seeing nothing newer than itself."""
    model = tiny_model("llama")
    rows = prompts((37, 8, 23))
    steps = 9
    cache = kvcompress.compress(model, "snapkv", ratio=0.3, phase="decode", interval=2)
    batched = _generate(model, rows, cache, steps=steps)
    prefill = [max(1, round(0.3 * len(r))) for r in rows]  # 11, 2, 7: all below window=32
    assert all(k < 32 for k in prefill)
    for layer in cache.layers:
        held = layer.kept_tokens()  # (batch, kv_heads)
        for i, k in enumerate(prefill):
            assert ((held[i] >= k) & (held[i] <= k + 1)).all(), (held[i], k)  # prefill size + at most interval − 1
        fresh = layer.state["snapkv"]["fresh"]
        assert (fresh <= held.long()).all()
    for i, row in enumerate(rows):  # rows stay independent
        alone = _generate(model, [row], kvcompress.compress(model, "snapkv", ratio=0.3, phase="decode", interval=2),
                          steps=steps)
        assert batched[i][: len(alone[0])] == alone[0]  # (alone, generation stops at EOS)


def test_snapkv_decode_rescoring_is_causal_among_held_entries() -> None:
    """At a re-scoring each usable window query sees only the entries held for its (row, head) that are not newer
    than its own token: the mass equals a direct per-query softmax over exactly those entries."""
    from kvcompress.methods.token.snapkv import SnapKV

    view, query = _batch((37, 51, 9))
    # a ragged decode-time layer: (row, head) pairs hold different counts, filler at the end of the rectangle
    b, h, n = view.valid.shape
    keep = torch.zeros_like(view.valid)
    counts = torch.tensor([[13, 11], [20, 6], [9, 4]])
    for i in range(b):
        for j in range(h):
            keep[i, j, : counts[i, j]] = True
    held = LayerView(view.keys, view.values, keep)
    m = 5
    q = query[:, :, -m:]
    qv = torch.ones(b, m, dtype=torch.bool)
    qv[2, 0] = False
    fresh = torch.tensor([[5, 3], [2, 5], [5, 1]])
    comp = SnapKV(window=m, interval=1, phase="decode", pooling="none")
    mass = comp._decode_mass(held, _ctx(held, q), q, qv, fresh)
    scaling = D ** -0.5
    for i in range(b):
        for j in range(h):
            c = int(counts[i, j])
            for hq in range(j * G, (j + 1) * G):
                expected = torch.zeros(n)
                for k in range(m):
                    age = m - 1 - k
                    if age >= int(fresh[i, j]) or not qv[i, k]:
                        continue
                    own = c - 1 - age  # the query's own entry (rank = slot here: entries start at slot 0)
                    logits = (view.keys[i, j, : own + 1] @ q[i, hq, k]) * scaling
                    expected[: own + 1] += torch.softmax(logits, -1)
                torch.testing.assert_close(mass[i, hq], expected, atol=1e-5, rtol=1e-5)


def test_question_agnostic_helper_appends_uncompressed() -> None:
    from kvcompress.methods.token.scoring import append_uncompressed

    model = tiny_model("llama")
    context, question = prompts((40, 6))
    cache = kvcompress.compress(model, "snapkv", ratio=0.25, window=8)
    with torch.no_grad():
        model(context.view(1, -1), **cache_arg(cache))
    append_uncompressed(model, cache, question.view(1, -1))
    assert cache.layers[0].kept_tokens()[0].tolist() == [10.0 + 6, 10.0 + 6]


@pytest.mark.slow
def test_cli_end_to_end(tmp_path) -> None:
    for args in (["method=snapkv", "ratio=0.25"], ["method=h2o", "budget=128"]):
        proc = subprocess.run([sys.executable, "-m", "kvcompress.run", *args, "model=tiny-random", "eval=fidelity",
                               "eval.samples=1", "eval.context=256", "eval.new_tokens=4", "print_summary=false",
                               f"results={tmp_path / 'rows.jsonl'}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
