"""Hidden-axis methods: packed quantization (quant), calibrated low-rank projection (lowrank), key channel pruning
(think) — round trips, bytes measured from the stored tensors, exactness at ratio 1, composition, bad input."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import kvcompress
import kvcompress.methods.hidden.calibration as lr
from kvcompress.storage import Segment
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.methods.hidden.lowrank import LowRankCodec
from kvcompress.methods.hidden.packing import dequantize_groups_, pack, quantize_groups, unpack
from kvcompress.methods.hidden.quant import QuantCodec
from kvcompress.methods.hidden.think import PrunedKeyCodec


@pytest.fixture(autouse=True)
def _artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(lr, "artifact_dir", lambda: tmp_path / "lowrank")
    lr._LOADED.clear()


@functools.lru_cache(maxsize=None)
def _model64() -> torch.nn.Module:
    """A tiny llama with head_dim 64 (two channel groups of 32 for the values)."""
    cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _generate(model, ids, cache, steps=6, mask=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **cache_arg(cache),
                              output_logits=True, return_dict_in_generate=True)


# -- packing and group quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [16, 7])
def test_pack_unpack_round_trip_is_exact(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 5, n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes)
    assert torch.equal(unpack(packed, bits, n, dtype=torch.float32), codes.float())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim,n", [(1, 70), (2, 48)])
def test_dequantization_error_is_at_most_half_a_step_per_group(bits: int, dim: int, n: int) -> None:
    x = torch.randn(4, 70, 48) * 3 + 1
    codes, scale, minimum = quantize_groups(x, bits, 32, dim)  # last group partial (70 tokens / 48 channels)
    assert scale.dtype == minimum.dtype == torch.float16 and int(codes.max()) < 2**bits
    assert scale.shape[dim] == math.ceil(x.shape[dim] / 32)
    approx = dequantize_groups_(codes.float(), scale, minimum, 32, dim)
    step = scale.float().repeat_interleave(32, dim).narrow(dim, 0, x.shape[dim])
    assert bool(((approx - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all())


# -- quant -----------------------------------------------------------------------------------------------------

def test_quant_kept_bytes_match_the_analytic_formula() -> None:
    model = _model64()
    cfg = model.config
    n_prompt = 300
    ids = prompts((n_prompt,))[0].view(1, -1)
    cache = kvcompress.compress(model, "quant", bits=4, group=32, residual=128, diagnostics=True)
    with torch.no_grad():
        model(ids, **cache_arg(cache))
    d, pairs, elem, G = cfg.head_dim, cfg.num_key_value_heads, 4, 32
    encoded = (n_prompt - 128) // G * G  # whole groups outside the residual window
    residual = n_prompt - encoded
    payload = 2 * encoded * d * 4 // 8  # keys + values, two 4-bit codes per byte
    scales = (encoded // G) * d * 2 * 2 + encoded * math.ceil(d / G) * 2 * 2  # fp16 scale + minimum
    full = residual * d * elem * 2
    index = 2 * 8 * pairs  # the encoded segment's rows/heads (int64)
    expected = cfg.num_hidden_layers * (pairs * (payload + scales + full) + index)
    assert cache.kept_bytes() == expected
    assert expected < 0.6 * cache.dense_bytes()  # 140 of 300 tokens are the fp32 residual
    layer = cache.layers[0]
    assert layer.length == residual and 128 <= residual < 128 + G
    errors = cache.shared["quant"]["recon_error"]
    assert sorted(errors) == [0, 1] and all(0 < e["k"] < 0.2 and 0 < e["v"] < 0.2 for e in errors.values())


def test_quant_decode_flushes_whole_groups_and_keeps_the_residual() -> None:
    model = tiny_model("llama")
    ids = prompts((100,))[0].view(1, -1)
    cache = kvcompress.compress(model, "quant", bits=8, group=16, residual=32)
    out = _generate(model, ids, cache, steps=40)
    ref = _generate(model, ids, DynamicCache(), steps=40)
    for layer in cache.layers:
        assert 32 <= layer.length < 48
        assert sum(s.count for s in layer.segments) % 16 == 0
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 0.1


def test_quant_rows_of_a_batch_match_their_solo_runs() -> None:
    model = tiny_model("llama")
    rows = prompts((90, 64, 23))
    ids, mask = left_pad(rows)
    batch = _generate(model, ids, kvcompress.compress(model, "quant", bits=4, group=16, residual=32), mask=mask)
    for i, row in enumerate(rows):
        alone = _generate(model, row.view(1, -1), kvcompress.compress(model, "quant", bits=4, group=16, residual=32))
        assert batch.sequences[i, ids.shape[1]:].tolist() == alone.sequences[0, len(row):].tolist()
        torch.testing.assert_close(batch.logits[0][i], alone.logits[0][0], atol=1e-4, rtol=0)


def test_quant_composes_with_token_and_head_methods() -> None:
    model = tiny_model("llama")
    ids = prompts((200,))[0].view(1, -1)
    params = {"quant": {"residual": 32}}
    with torch.no_grad():
        snap = kvcompress.compress(model, "snapkv", ratio=0.5)
        model(ids, **cache_arg(snap))
        both = kvcompress.compress(model, ["snapkv", "quant"], ratio=0.5, params=params)
        model(ids, **cache_arg(both))
    assert both.kept_tokens() == snap.kept_tokens()  # quantizes exactly the kept tokens
    assert both.kept_bytes() < 0.6 * snap.kept_bytes()
    with torch.no_grad():  # heads: one KV head per layer keeps everything, the other sink + recent (ragged)
        heads = kvcompress.compress(model, ["heads", "quant"], ratio=0.5, params={"quant": {"residual": 0}})
        model(ids, **cache_arg(heads))
    for layer in heads.layers:
        encoded = sorted(s.count for s in layer.segments if s.codec is not None)
        assert len(encoded) == 2 and encoded[0] < encoded[1]  # both head groups, each encoded (whole groups of 32)
        assert all(type(s.codec).__name__ == "QuantCodec" for s in layer.segments if s.codec is not None)


def _quant_workspace_per_step(bits: int = 4) -> list[tuple[int, int, int]]:
    """Decode with ``quant`` on a prompt that leaves > 94% of the context encoded (residual = group = 16); per step:
    (workspace_bytes, one layer's dense fp32 K/V at the context, one layer's encoded K/V in fp32)."""
    model = tiny_model("llama")
    cfg = model.config
    ids = prompts((600,))[0].view(1, -1)
    cache = kvcompress.compress(model, "quant", bits=bits, group=16, residual=16)
    per_kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, fp32, batch 1
    out = []
    with torch.no_grad():
        model(ids, **cache_arg(cache))
        for step in range(40):  # crosses flushes of 16 tokens into the quantized store
            model(torch.tensor([[5 + step]]), **cache_arg(cache))
            encoded = max(sum(s.count for s in layer.segments if s.codec is not None) for layer in cache.layers)
            report = cache.memory_report()
            out.append((report["workspace_bytes"], per_kv_token * report["context_tokens"], per_kv_token * encoded))
    return out


def test_quant_attention_workspace_holds_one_block_not_one_per_layer() -> None:
    """Attention dequantizes an encoded block's keys, then its values, into one per-cache buffer reused across
    layers and steps: half of one layer's encoded K/V in fp32, plus a byte slab for unpacking (at most the packed
    keys: bits/8 byte per element, so ≤ bits/64 of the fp32 K/V) — never K and V together, never a copy per layer
    (every layer's encoded block is > 94% of the context here)."""
    bits = 4
    for workspace, _, encoded in _quant_workspace_per_step(bits):
        assert encoded / 2 <= workspace <= encoded / 2 + encoded * bits / 64, (workspace, encoded)


def test_quant_attention_workspace_is_at_most_one_layers_dense_kv() -> None:
    assert all(workspace <= dense for workspace, dense, _ in _quant_workspace_per_step())


@pytest.mark.parametrize("method", ["quant", "lowrank", "think", "heads+quant"])
def test_decode_flushes_join_one_block_and_direct_attention_equals_reconstruction(method, monkeypatch) -> None:
    """Blocks flushed while decoding are joined to the pairs' existing block (one encoded segment per pair group,
    however long the generation), and codecs that attend block-wise (lowrank and think on their stored form, quant
    keys-then-values through one workspace buffer) give the logits of the reconstruct-then-attend path; both
    against runs with joining and the direct path switched off."""
    model = tiny_model("llama")
    ids = prompts((150,))[0].view(1, -1)

    def run():
        cache = kvcompress.compress(model, method.split("+"), ratio=None if method == "quant" else 0.5)
        logits = []
        with torch.no_grad():
            model(ids, **cache_arg(cache))
            for step in range(100):  # > 3 flushes of 32 tokens
                logits.append(model(torch.tensor([[5 + step]]), **cache_arg(cache)).logits[0, -1])
        return cache, torch.stack(logits)

    cache, direct = run()
    for layer in cache.layers:
        groups = [(tuple(s.rows.tolist()), tuple(s.heads.tolist())) for s in layer.segments if s.codec is not None]
        assert len(groups) == len(set(groups)), "one encoded block per pair group"
    # Only quant reconstructs (into the workspace); lowrank and think attend on what they store.
    assert (cache.memory_report()["workspace_bytes"] > 0) == ("quant" in method)
    monkeypatch.setattr(Segment, "joined", lambda self, later: None)
    for codec in (LowRankCodec, PrunedKeyCodec, QuantCodec):
        monkeypatch.setattr(codec, "attends_directly", False)  # reconstruct instead
    cache_ref, reconstructed = run()
    assert sum(len(layer.segments) for layer in cache_ref.layers) > sum(len(layer.segments) for layer in cache.layers)
    torch.testing.assert_close(direct, reconstructed, atol=1e-5, rtol=1e-5)
    assert cache.kept_bytes() <= cache_ref.kept_bytes()  # joining only drops the repeated (row, head) indices


# -- lowrank ---------------------------------------------------------------------------------------------------

def test_lowrank_ratio_one_reproduces_the_full_cache() -> None:
    model = tiny_model("llama")
    ids = prompts((120,))[0].view(1, -1)
    ref = _generate(model, ids, DynamicCache(), steps=40)
    cache = kvcompress.compress(model, "lowrank", ratio=1.0)
    out = _generate(model, ids, cache, steps=40)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert any(s.codec is not None for s in cache.layers[0].segments)
    assert cache.shared["lowrank"]["basis_bytes"] > 0  # model-side, not in kept_bytes


def test_lowrank_stores_r_dim_coefficients_and_error_falls_with_rank() -> None:
    model = _model64()
    ids = prompts((160,), seed=3)[0].view(1, -1)
    lr.ensure_calibrated(model)
    assert lr.artifact_path(model, None, False).is_file()
    errors, sizes = [], []
    for rank in (4, 8, 16, 32, 64):
        cache = kvcompress.compress(model, "lowrank", rank=rank, residual=0, diagnostics=True)
        with torch.no_grad():
            model(ids, **cache_arg(cache))
        codec = cache.layers[0].segments[0].codec
        assert codec.k_coef.shape[-1] == rank and codec.v_coef.shape[-1] == rank
        errors.append(cache.shared["lowrank"]["recon_error"])
        sizes.append(cache.kept_bytes())
    for layer in range(2):
        for part in ("k", "v"):
            seq = [e[layer][part] for e in errors]
            assert all(a >= b - 1e-9 for a, b in zip(seq, seq[1:])), seq
            assert seq[-1] < 1e-5
    assert sizes == sorted(sizes)


def test_lowrank_artifact_is_keyed_by_config_and_weights_and_reloaded(tmp_path) -> None:
    from kvcompress.artifacts import config_hash, weights_fingerprint

    model = tiny_model("llama")
    bases = lr.calibrate(model, tokens=64)
    path = lr.artifact_path(model, None, False)
    assert bases.path == path and path.is_file()
    assert path.name == f"{config_hash(model)}-{weights_fingerprint(model)}-ids.safetensors"
    lr._LOADED.clear()
    again = lr.Bases.load(path)
    assert torch.equal(again.keys, bases.keys) and again.fingerprints == bases.fingerprints
    assert config_hash(model.config) != config_hash(_model64().config)


# -- think -----------------------------------------------------------------------------------------------------

def test_think_ratio_one_reproduces_the_full_cache_and_half_prunes_key_pairs() -> None:
    model = tiny_model("llama")
    ids = prompts((120,))[0].view(1, -1)
    ref = _generate(model, ids, DynamicCache(), steps=40)
    out = _generate(model, ids, kvcompress.compress(model, "think", ratio=1.0), steps=40)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    cache = kvcompress.compress(model, "think", ratio=0.5, diagnostics=True)
    _generate(model, ids, cache, steps=40)
    d = model.config.head_dim
    for layer in cache.layers:
        chosen = layer.state["think"]["channels"]
        assert chosen.shape[-1] == d // 2
        assert torch.equal(chosen[..., d // 4:], chosen[..., : d // 4] + d // 2)  # whole RoPE pairs
        for seg in layer.segments:
            assert seg.codec.keys.shape[-1] == d // 2 and seg.codec.values.shape[-1] == d
            k, _ = seg.codec.decode()
            assert int((k.abs().sum(1) > 0).sum(-1).max()) <= d // 2
    assert cache.shared["think"]["recon_error"][0]["v"] == 0.0


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params,fragment", [
    ("quant", {"bits": 3}, "bits=3"),
    ("quant", {"residual": 100}, "residual=100"),
    ("quant", {"group": 0}, "group=0"),
    ("lowrank", {"rank": 0}, "rank=0"),
    ("lowrank", {"ratio": 0.0}, "ratio=0.0"),
    ("think", {"window": 0}, "window=0"),
])
def test_bad_input_is_a_one_line_error(method: str, params: dict, fragment: str) -> None:
    with pytest.raises(KVCompressError) as err:
        kvcompress.compress(tiny_model("llama"), method, **params)
    assert fragment in str(err.value) and "valid" in str(err.value) and "\n" not in str(err.value)


def test_lowrank_rank_above_head_dim_is_an_error() -> None:
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "lowrank", rank=17, residual=0)
    with pytest.raises(KVCompressError, match="rank=17 exceeds head_dim=16"), torch.no_grad():
        model(prompts((40,))[0].view(1, -1), **cache_arg(cache))


def test_lowrank_error_falls_with_rank_on_the_testbed() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcompress.eval.haystack import corpus_text
    from kvcompress.zoo import testbed_path

    path = testbed_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    lr.ensure_calibrated(model, tokenizer)
    ids = tokenizer(corpus_text()[20000:24000], return_tensors="pt")["input_ids"][:, :512]
    errors = []
    for ratio in (0.125, 0.25, 0.5, 0.75, 1.0):
        cache = kvcompress.compress(model, "lowrank", ratio=ratio, residual=0, diagnostics=True)
        with torch.no_grad():
            model(ids, **cache_arg(cache))
        errors.append(cache.shared["lowrank"]["recon_error"])
    for layer in range(model.config.num_hidden_layers):
        for part in ("k", "v"):
            seq = [e[layer][part] for e in errors]
            assert all(a >= b - 1e-9 for a, b in zip(seq, seq[1:])), seq
            assert seq[-1] < 1e-4
