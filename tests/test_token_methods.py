"""Token scorers against direct, readable reference computations of their papers' definitions (exact kept sets).

Inputs are random tensors in a left-padded batch with GQA (4 query heads, 2 KV heads), odd row lengths, a row
shorter than the observation window, budgets larger than the context, and ties. References loop over rows, heads
and tokens on the row's real entries only.
"""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

import kvcompress
from kvcompress import KVCompressError
from kvcompress.compat import cache_arg
from kvcompress.compressor import CompressionContext, LayerView, make_compressor
from kvcompress.methods.pyramidkv import pyramid_budget
from kvcompress.scoring import attention_mass

HQ, H, D = 4, 2, 8
G = HQ // H
LENGTHS = (37, 51, 9)  # odd lengths; the last row is shorter than snapkv's window in some tests


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=H, head_dim=D,
                       num_hidden_layers=4, intermediate_size=16, vocab_size=32, max_position_embeddings=4096)


def _batch(lengths=LENGTHS, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    b = len(lengths)
    keys = torch.randn(b, H, n, D, generator=g)
    values = torch.randn(b, H, n, D, generator=g)
    query = torch.randn(b, HQ, n, D, generator=g)
    if ties:  # row 0: every key and query identical -> every attention score ties
        keys[0] = keys[0, :, :1]
        query[0] = query[0, :, :1]
    valid = torch.zeros(b, H, n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        valid[i, :, n - length:] = True
    return LayerView(keys, values, valid), query


def _ctx(view, query, layer=0, layers=4, module=None):
    cache = SimpleNamespace(num_kv_heads=H)
    module = module if module is not None else SimpleNamespace(scaling=D**-0.5)
    return CompressionContext(layer_idx=layer, num_layers=layers, phase="prefill", query=query, module=module,
                              cache=cache, state={}, shared={})


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


def test_attention_mass_chunks_agree_and_never_build_s_by_s() -> None:
    view, query = _batch()
    qv = view.valid.any(1)
    full = attention_mass(query, view.keys, view.valid, D**-0.5, query_valid=qv, chunk=10_000)
    for chunk in (1, 5, 16):
        torch.testing.assert_close(attention_mass(query, view.keys, view.valid, D**-0.5, query_valid=qv, chunk=chunk), full)
    # each valid query's attention sums to 1 over its row's keys
    assert torch.allclose(full.sum(-1), qv.sum(-1, keepdim=True).float().expand(-1, HQ), atol=1e-4)


@pytest.mark.parametrize("kw", [dict(ratio=0.3), dict(budget=10), dict(budget=100)])
def test_tova_matches_reference_one_set_per_layer(kw) -> None:
    view, query = _batch()
    keep = make_compressor("tova", **kw).select(view, _ctx(view, query))
    assert _kept_sets(keep, view) == ref_tova(view, query, lambda n: _budget(n, kw.get("ratio"), kw.get("budget")))


@pytest.mark.parametrize("ties", [False, True])
def test_knorm_matches_reference(ties: bool) -> None:
    view, query = _batch(ties=ties)
    keep = make_compressor("knorm", ratio=0.35).select(view, _ctx(view, query))
    assert _kept_sets(keep, view) == ref_knorm(view, query, lambda n: _budget(n, 0.35))
    if ties:
        assert _kept_sets(keep, view)[0][0] == list(range(round(0.35 * LENGTHS[0])))


def test_expected_attention_matches_reference_from_pre_rope_queries() -> None:
    """Queries are made pre-RoPE, rotated by HF's RoPE at positions with an arbitrary offset; the reference fits the
    Gaussian to the pre-RoPE queries and averages HF's own rotation matrices over the 512 future positions."""
    config = _config()
    rope = LlamaRotaryEmbedding(config)
    module = LlamaAttention(config, layer_idx=0)
    view, pre = _batch(seed=3)
    b, _, n, _ = pre.shape
    offset = 5
    query = torch.empty_like(pre)
    for i in range(b):
        pos = (torch.arange(n) - (n - LENGTHS[i]) + offset).clamp(min=0).view(1, -1)
        cos, sin = rope(pre, pos)
        query[i] = apply_rotary_pos_emb(pre[i:i + 1], pre[i:i + 1], cos, sin)[0][0]
    comp = make_compressor("expected_attention", ratio=0.4)
    keep = comp.select(view, _ctx(view, query, module=module))

    def rotation(p: int) -> torch.Tensor:  # HF's rotation at position p as a d x d matrix (acting on column vectors)
        cos, sin = rope(torch.zeros(1), torch.tensor([[p]]))
        eye = torch.eye(D).view(1, 1, D, D)
        return apply_rotary_pos_emb(eye, eye, cos.view(1, 1, D), sin.view(1, 1, D))[0][0, 0].double().T

    ref = []
    for i, k, v, q_pre in _rows(view, pre):
        length = k.shape[1]
        r_bar = sum(rotation(offset + length + j) for j in range(512)) / 512
        heads = []
        for h in range(H):
            probs = []
            for j in range(G):
                qs = q_pre[h * G + j, 4:].double()  # sinks excluded from the statistics
                mu = qs.mean(0)
                cov = (qs - mu).T @ (qs - mu) / qs.shape[0]
                mu, cov = r_bar @ mu, r_bar @ cov @ r_bar.T
                kk = k[h, 4:].double()
                logits = kk @ mu / math.sqrt(D) + 0.5 * ((kk @ cov) * kk).sum(-1) / D
                probs.append(torch.softmax(logits, -1))
            score = (sum(probs) / G) * v[h, 4:].double().norm(dim=-1)
            heads.append(_keep([0.0] * 4 + score.tolist(), _budget(length, 0.4), sink=4))
        ref.append(heads)
    assert _kept_sets(keep, view) == ref


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


def test_pyramidkv_keeps_snapkv_sets_at_the_layer_budget() -> None:
    view, query = _batch(lengths=(101, 87, 9))
    for layer in (0, 3):
        keep = make_compressor("pyramidkv", ratio=0.5, window=8).select(view, _ctx(view, query, layer=layer))
        budget = lambda n: int(pyramid_budget(torch.tensor([_budget(n, 0.5)]), torch.tensor([n]), 8, 20.0, layer, 4))
        assert _kept_sets(keep, view) == ref_snapkv(view, query, budget, window=8)


def test_merge_folds_evicted_entries_into_most_similar_kept_entry() -> None:
    view, query = _batch()
    original = LayerView(view.keys.clone(), view.values.clone(), view.valid)
    comp = make_compressor("merge", ratio=0.4, scorer="knorm")
    keep = comp.select(view, _ctx(view, query))
    assert torch.equal(keep, make_compressor("knorm", ratio=0.4).select(original, _ctx(original, query)))
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
    with pytest.raises(KVCompressError, match="valid choices: adakv, uniform"):
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
        ragged |= bool(layer.segments)
        expected += int(per_pair.sum()) * 2 * 16 * elem  # keys + values, head_dim 16, fp32
        expected += sum(s.rows.numel() * 8 + s.heads.numel() * 8 for s in layer.segments)  # ragged index metadata
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


def test_question_agnostic_helper_appends_uncompressed() -> None:
    from kvcompress.scoring import append_uncompressed

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
