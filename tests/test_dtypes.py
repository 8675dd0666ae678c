"""Half precision: a ``torch_dtype=bfloat16`` (or float16) model just works.

* Uncompressed runs (``full``, selection methods at ratio 1) are the stock ``DynamicCache`` run in bf16 and fp16 too:
  same tokens, same logits, bit for bit (the same kernels run).
* Every registered method runs a left-padded batch in bf16 and fp16; the cache holds the model's dtype, its
  bytes are those of the held tensors, and a batch-1 run keeps as many tokens per head as the float32 run of the
  same weights (budgets are counts, not scores).
* Attention over whatever a layer holds (dense, ragged, encoded) in half precision equals float32 attention over
  the same held entries within the dtype's rounding: max |error| ≤ 2⁻⁶ (bf16, 8 significant bits) or 2⁻⁹ (fp16)
  times max |value| — logits and the value mix run in the cache dtype as eager attention does, softmax statistics
  in float32.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import ARCHITECTURES, left_pad, prompts, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.compressor import Axis
from kvcompress.methods.token.scoring import ScoredTokenCompressor
from kvcompress.registry import get_method, make_compressor

METHODS = kvcompress.available_methods()
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: relative tolerance of half-precision attention vs float32 on the same entries (a few units in the last place)
TOLERANCE = {torch.bfloat16: 2**-6, torch.float16: 2**-9}
RATIO_ONE = ["snapkv", "streaming", "heads", "layers", "adaptive_heads"]


def _ratio(method: str) -> float | None:
    return 0.3 if "ratio" in get_method(method).__dataclass_fields__ else None


def _half(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(tiny_model(arch)).to(dtype)


def _generate(model, ids, mask, cache, steps: int = 5):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **cache_arg(cache),
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["full", *RATIO_ONE])
def test_uncompressed_half_precision_is_dynamic_cache(arch: str, method: str, dtype: torch.dtype) -> None:
    model = _half(arch, dtype)
    ids, mask = left_pad(prompts())
    reference = _generate(model, ids, mask, DynamicCache())
    cache = kvcompress.compress(model, method, ratio=None if method == "full" else 1.0)
    ours = _generate(model, ids, mask, cache)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.logits, reference.logits, strict=True):
        assert torch.equal(a, b)
    assert cache.layers[0].keys.dtype == dtype
    report = cache.memory_report()
    assert report["kept_bytes"] == report["dense_bytes"] and report["dtype_bytes"] == 2


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_in_half_precision(method: str, dtype: torch.dtype) -> None:
    model = _half("llama", dtype)
    ids, mask = left_pad(prompts((37, 64, 23)))
    if method == "lowrank":
        from kvcompress.methods.hidden.calibration import calibrate

        calibrate(model, save=False)
    cache = kvcompress.compress(model, method, ratio=_ratio(method))
    out = _generate(model, ids, mask, cache)
    assert out.sequences.shape == (3, ids.shape[1] + 5)
    assert all(torch.isfinite(step).all() for step in out.logits)
    report = cache.memory_report()
    assert report["dtype_bytes"] == 2
    assert report["kept_bytes"] == sum(t.numel() * t.element_size() for t in _used_tensors(cache))
    if get_method(method).axis is not None:
        assert report["kept_bytes"] < report["dense_bytes"]


def _used_tensors(cache):
    """The used part of every tensor held (the buffers cut to their length), to count bytes independently."""
    for layer in cache.layers:
        yield layer.keys[:, :, : layer.length]
        yield layer.values[:, :, : layer.length]
        if layer.positions is not None and cache.positions_counted:
            yield layer.positions[:, :, : layer.length]
        if layer.ragged is not None:
            yield from (layer.ragged.keys, layer.ragged.values, *layer.ragged.metadata())
            if layer.ragged.positions is not None and cache.positions_counted:
                yield layer.ragged.positions
        for seg in layer.segments:
            yield from seg.tensors()
        from kvcompress.storage import state_tensors as _state_tensors

        yield from _state_tensors(layer.state)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).axis in (Axis.TOKEN, Axis.LAYER, Axis.HEAD)])
def test_half_precision_keeps_as_many_tokens_as_float32(method: str, dtype: torch.dtype) -> None:
    comp = make_compressor(method, **({"ratio": _ratio(method)} if _ratio(method) else {}))
    if isinstance(comp, ScoredTokenCompressor) and comp.allocation == "scores":
        pytest.skip("per-head budgets follow the head scores, which rounding may reorder")
    ids = prompts((64,))[0].view(1, -1)
    kept = {}
    for name, model in (("fp32", tiny_model("llama")), ("half", _half("llama", dtype))):
        cache = kvcompress.compress(model, method, ratio=_ratio(method))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(ids, **cache_arg(cache))
        kept[name] = cache.kept_tokens()
    assert kept["half"] == kept["fp32"]


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("method,params", [(m, {}) for m in METHODS] + [("snapkv", {"allocation": "adakv"}),
                                                                        ("quant", {"residual": 0, "group": 8})])
def test_half_precision_attention_matches_float32_on_the_held_entries(method: str, params: dict,
                                                                      dtype: torch.dtype) -> None:
    model = _half("llama", dtype)
    ids, mask = left_pad(prompts((37, 64, 23)))
    if method == "lowrank":
        from kvcompress.methods.hidden.calibration import calibrate

        calibrate(model, save=False)
    cache = kvcompress.compress(model, method, ratio=_ratio(method), **params)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids, attention_mask=mask, **cache_arg(cache))
        model(torch.full((3, 1), 5), attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
              **cache_arg(cache))
    g = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        module = model.model.layers[layer.layer_idx].self_attn
        query = torch.randn(3, model.config.num_attention_heads, 1, model.config.head_dim, generator=g).to(dtype)
        with torch.no_grad():
            view = layer.materialize(None)
            ours = layer.attend(module, query, None, module.scaling).float()  # (b, 1, hq, d)
            if layer.pristine:  # an uncompressed layer attends with the model's mask: compare on real tokens
                continue
            reference = _reference(query.float(), view, module.scaling)
        scale = reference.abs().max()
        assert (ours - reference).abs().max() <= TOLERANCE[dtype] * scale * 4, (layer.layer_idx, method)


def _reference(query: torch.Tensor, view, scaling: float) -> torch.Tensor:
    """float32 softmax attention of ``query`` over the view's valid entries (GQA by repeating the KV heads)."""
    g = query.shape[1] // view.keys.shape[1]
    keys = view.keys.float().repeat_interleave(g, 1)
    values = view.values.float().repeat_interleave(g, 1)
    scores = (query @ keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~view.valid.repeat_interleave(g, 1).unsqueeze(2), float("-inf"))
    return (torch.softmax(scores, -1) @ values).transpose(1, 2)
