"""Core extension points used by the method files: hidden-axis codecs, cross-layer deferral, attention observers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from reference import masked_reference_logits
from tiny_models import left_pad, prompts, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.compressor import Axis, Codec, Compressor, HiddenCompressor
from kvcompress.selection import sink_and_recent_mask


class _HalfCodec(Codec):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, exact: bool):
        dtype = keys.dtype if exact else torch.float16
        self.keys, self.values, self.dtype = keys.to(dtype).clone(), values.to(dtype).clone(), keys.dtype

    def decode(self, workspace=None, dtype=None):
        return self.keys.to(dtype or self.dtype), self.values.to(dtype or self.dtype)

    def tensors(self):
        return [self.keys, self.values]


@dataclass
class HalfPrecision(HiddenCompressor):
    """Test codec: store encoded entries in float16 (or unchanged with exact=True), newest `residual` in fp32."""

    name: ClassVar[str] = "test_half"
    residual: int = 8
    chunk: int = 4
    exact: bool = False

    def residual_tokens(self) -> int:
        return self.residual

    def chunk_tokens(self) -> int:
        return self.chunk

    def encode(self, keys, values, ctx, rows, heads, positions=None):
        return _HalfCodec(keys, values, self.exact)


def _generate(model, ids, cache, steps=8, mask=None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **cache_arg(cache),
            output_logits=True, return_dict_in_generate=True,
        )


def test_exact_codec_reproduces_the_full_cache_through_prefill_and_decode_flushes() -> None:
    model = tiny_model("llama")
    ids = prompts((45,))[0].view(1, -1)
    ref = _generate(model, ids, DynamicCache())
    cache = kvcompress.compress(model, [HalfPrecision(exact=True)])
    ours = _generate(model, ids, cache)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    layer = cache.layers[0]
    # Every fed token is held, encoded in chunks of 4 while at least 8 stay in full precision.
    fed = ours.sequences.shape[1] - 1
    assert sum(seg.count for seg in layer.segments) + layer.length == fed
    assert 8 <= layer.length < 8 + 4 and len(layer.segments) > 1


def test_codec_bytes_are_what_it_holds_and_compose_with_token_selection() -> None:
    model = tiny_model("llama")
    cfg = model.config
    ids = prompts((64,))[0].view(1, -1)
    cache = kvcompress.compress(model, ["streaming", HalfPrecision()], ratio=0.5, params={"streaming": {"sink": 4}})
    with torch.no_grad():
        model(ids, **cache_arg(cache))
    # streaming keeps 32 tokens; 24 of them are encoded in fp16 (whole chunks of 4 beyond the 8-token residual).
    per_token = cfg.num_key_value_heads * cfg.head_dim * 2
    index_bytes = 2 * 8 * cfg.num_key_value_heads  # rows + heads (int64) of the encoded segment
    expected = cfg.num_hidden_layers * (24 * per_token * 2 + 8 * per_token * 4 + index_bytes)
    assert cache.kept_bytes() == expected
    assert cache.memory_report()["kept_tokens"] == [[32.0, 32.0]] * cfg.num_hidden_layers


def test_codec_in_a_padded_batch_drops_padding_first() -> None:
    model = tiny_model("llama")
    rows = prompts((37, 64, 23))
    ids, mask = left_pad(rows)
    cache = kvcompress.compress(model, [HalfPrecision(exact=True)])
    ours = _generate(model, ids, cache, mask=mask)
    ref = _generate(model, ids, DynamicCache(), mask=mask)
    assert torch.equal(ours.sequences, ref.sequences)
    fed = ours.sequences.shape[1] - 1 - ids.shape[1]
    assert cache.memory_report()["kept_tokens"][0] == pytest.approx([(37 + 64 + 23) / 3 + fed] * 2)


@dataclass
class KeepBestLayers(Compressor):
    """Test layer-axis method: every layer's score is known before any layer selects (cross-layer deferral)."""

    name: ClassVar[str] = "test_best_layers"
    axis: ClassVar[Axis] = Axis.LAYER
    cross_layer: ClassVar[bool] = True
    keep_layers: int = 1

    def observe(self, view, ctx):
        ctx.shared.setdefault("seen", []).append(ctx.layer_idx)
        ctx.shared.setdefault("score", {})[ctx.layer_idx] = float(view.keys.norm())

    def select(self, view, ctx):
        assert ctx.shared["seen"] == list(range(ctx.num_layers)), "select ran before every layer was observed"
        ranked = sorted(ctx.shared["score"], key=ctx.shared["score"].get, reverse=True)
        if ctx.layer_idx in ranked[: self.keep_layers]:
            return view.valid
        return sink_and_recent_mask(view, 2, torch.full_like(view.counts, 6))


def test_cross_layer_selection_waits_for_every_layer_and_matches_a_masked_reference() -> None:
    model = tiny_model("llama")
    prompt = prompts((40,))[0]
    cache = kvcompress.compress(model, [KeepBestLayers()], trace=True)
    _generate(model, prompt.view(1, -1), cache, steps=5)
    kept = [cache.kept_positions(layer)[0] for layer in range(model.config.num_hidden_layers)]
    full_layer = [i for i, k in enumerate(kept) if len([p for p in k if p < 40]) == 40]
    assert len(full_layer) == 1
    other = 1 - full_layer[0]
    assert [p for p in kept[other] if p < 40] == [0, 1, 36, 37, 38, 39]
    assert cache.layers[other].length < cache.layers[full_layer[0]].length


def test_attention_observers_see_decode_probabilities() -> None:
    model = tiny_model("llama")
    prompt = prompts((30,))[0].view(1, -1)
    seen = []
    cache = kvcompress.compress(model, "full")
    cache.observers.append(lambda layer, probs, view: seen.append((layer, probs.clone())))
    with torch.no_grad():
        model(prompt, **cache_arg(cache))
        model(torch.tensor([[7]]), **cache_arg(cache))
    assert [layer for layer, _ in seen] == [0, 1]
    probs = seen[1][1]
    assert probs.shape == (1, model.config.num_attention_heads, 31)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, model.config.num_attention_heads))
    # Same probabilities as eager attention's weights on a DynamicCache.
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref_cache = DynamicCache()
            model(prompt, **cache_arg(ref_cache))
            out = model(torch.tensor([[7]]), **cache_arg(ref_cache), output_attentions=True)
    finally:
        kvcompress.attach(model)
    torch.testing.assert_close(probs, out.attentions[1][:, :, 0], atol=1e-6, rtol=1e-5)
    assert masked_reference_logits is not None


@dataclass
class RecordInputs(Compressor):
    name: ClassVar[str] = "test_record_inputs"
    axis: ClassVar[Axis] = Axis.LAYER

    def observe(self, view, ctx):
        ctx.shared[ctx.layer_idx] = (ctx.hidden_states.shape, ctx.attn_output.shape)

    def select(self, view, ctx):
        return view.valid


def test_compressors_see_the_attention_block_input_and_output() -> None:
    model = tiny_model("llama")
    cfg = model.config
    comp = RecordInputs()
    cache = kvcompress.compress(model, [comp])
    with torch.no_grad():
        model(prompts((12,))[0].view(1, -1), **cache_arg(cache))
    assert cache.shared["test_record_inputs"] == {
        i: ((1, 12, cfg.hidden_size), (1, 12, cfg.num_attention_heads, cfg.head_dim)) for i in range(cfg.num_hidden_layers)
    }
    assert all("_kvc_hidden_states" not in m.__dict__ for m in model.modules())


def test_codec_rows_of_a_batch_are_encoded_as_alone_through_decode_flushes() -> None:
    model = tiny_model("llama")
    rows = prompts((37, 64, 23))
    ids, mask = left_pad(rows)
    comp = HalfPrecision(residual=8, chunk=4)
    batch = _generate(model, ids, kvcompress.compress(model, [comp]), steps=12, mask=mask)
    width = ids.shape[1]
    for i, row in enumerate(rows):
        cache = kvcompress.compress(model, [comp])
        alone = _generate(model, row.view(1, -1), cache, steps=12)
        n = min(alone.sequences.shape[1] - len(row), batch.sequences.shape[1] - width)
        assert batch.sequences[i, width : width + n].tolist() == alone.sequences[0, len(row) : len(row) + n].tolist()
        for step in range(n):
            torch.testing.assert_close(batch.logits[step][i], alone.logits[step][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("spelling", [["streaming", "layers"], "streaming+layers"])
def test_out_of_order_composition_applies_layer_then_token(spelling) -> None:
    """A token-then-layer spelling is run in axis order (layer → head → token → hidden): the same pipeline and kept
    sets as the in-order spelling, and not what running it as written would keep."""
    from kvcompress.cache import KVCompressCache

    model = tiny_model("llama")
    ids = prompts((48,))[0].view(1, -1)
    params = {"layers": {"score": "last", "window": 12}}

    def kept(cache) -> list[list[list[int]]]:
        with torch.no_grad():
            model(ids, **cache_arg(cache))
        return [cache.kept_positions(layer) for layer in range(model.config.num_hidden_layers)]

    ours = kvcompress.compress(model, spelling, ratio=0.5, params=params, trace=True)
    in_order = kvcompress.compress(model, ["layers", "streaming"], ratio=0.5, params=params, trace=True)
    assert [c.name for c in ours.compressors] == ["layers", "streaming"]
    expected = kept(in_order)
    assert kept(ours) == expected
    # layer 0 is windowed to 4 sinks + 12 recent, then streaming keeps half of those 16: 4 sinks + 4 recent;
    # layer 1 (kept whole by `layers`) keeps half of the 48: 4 sinks + 20 recent
    assert expected == [[[0, 1, 2, 3, 44, 45, 46, 47]] * 2, [[0, 1, 2, 3, *range(28, 48)]] * 2]
    as_written = KVCompressCache(model.config, list(reversed(in_order.compressors)), trace=True)
    assert kept(as_written)[0] == [[0, 1, 2, 3, *range(36, 48)]] * 2  # token first: 24 kept, then windowed to 16
