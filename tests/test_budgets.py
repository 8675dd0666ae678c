"""One budget allocation strategy (methods/token/budgets.py) and one reduced-context policy (methods/token/reduced.py):
the presets are the strategy, and any token method takes it."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.registry import make_compressor


def _kept(method, rows=(37, 64, 23), **kw):
    model = tiny_model("llama")
    ids, mask = left_pad(prompts(rows))
    cache = kvcompress.compress(model, method, trace=True, **kw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids, attention_mask=mask, **cache_arg(cache))
    return [[cache.kept_positions(layer, row) for layer in range(len(cache.layers))] for row in range(len(rows))], cache


@pytest.mark.parametrize("scorer", ["knorm", "random", "streaming", "h2o"])
@pytest.mark.parametrize("schedule", ["pyramid", "inverse_pyramid"])
def test_layer_budget_is_the_per_layer_allocation_of_its_scorer(scorer: str, schedule: str) -> None:
    preset, a = _kept("layer_budget", ratio=0.4, scorer=scorer, schedule=schedule)
    direct, b = _kept(scorer, ratio=0.4, layer_allocation=schedule)
    assert preset == direct
    assert a.shared["layer_budget"]["layer_ratios"] == b.shared[scorer]["layer_ratios"]


def test_pyramidkv_is_snapkv_with_the_pyramidkv_layer_allocation() -> None:
    assert _kept("pyramidkv", ratio=0.4)[0] == _kept("snapkv", ratio=0.4, layer_allocation="pyramidkv")[0]


def test_adaptive_heads_budgets_are_the_scores_allocation_any_scorer_takes(tmp_path) -> None:
    """With a head-score artifact favouring KV head 0, both give head 0 the larger share of the layer's budget."""
    from kvcompress.artifacts import config_hash, weights_fingerprint
    from kvcompress.methods.head.scores import save_scores

    model = tiny_model("llama")  # the same seeded weights as _kept's model: its fingerprint
    cfg = model.config
    kv = [[1.0, 0.0] for _ in range(cfg.num_hidden_layers)]
    zeros = [[0.0] * cfg.num_attention_heads for _ in range(cfg.num_hidden_layers)]
    path = save_scores({"format": "kvcompress-head-scores", "version": 2, "config_hash": config_hash(cfg),
                        "weights": weights_fingerprint(model), "model": "tiny", "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
                        "num_kv_heads": 2, "primary": "retrieval", "retrieval": zeros, "mass": zeros,
                        "retrieval_kv": kv, "mass_kv": [[0.0, 0.0] for _ in kv]}, tmp_path / "scores.json")
    kept, _ = _kept("adaptive_heads", ratio=0.3, scores=str(path))
    other, _ = _kept("snapkv", ratio=0.3, allocation="scores", scores=str(path), sink=4, window=32)
    counts = [[[len(h) for h in layer] for layer in row] for row in kept]
    assert counts == [[[len(h) for h in layer] for layer in row] for row in other]
    assert all(layer[0] > layer[1] for row in counts for layer in row)  # the scored head gets the larger share


@pytest.mark.parametrize("method,kw", [("layers", dict(ratio=0.5, score="first", window=6)),
                                       ("heads", dict(ratio=0.5, scores="prompt"))])
@pytest.mark.parametrize("policy", ["knorm", "snapkv"])
def test_a_token_method_fills_the_reduced_context_with_the_same_memory(method: str, kw: dict, policy: str) -> None:
    window, cache_w = _kept(method, **kw)
    scored, cache_s = _kept(method, reduced=policy, **kw)
    assert cache_s.kept_bytes() == cache_w.kept_bytes()
    sizes = lambda kept: [[[len(h) for h in layer] for layer in row] for row in kept]  # noqa: E731
    assert sizes(scored) == sizes(window) and scored != window


def test_allocation_errors_are_one_line() -> None:
    with pytest.raises(KVCompressError, match="unknown layer_allocation 'ramp'; valid choices: inverse_pyramid, list"):
        make_compressor("knorm", layer_allocation="ramp")
    with pytest.raises(KVCompressError, match="layer_ratios is given with layer_allocation='uniform'"):
        make_compressor("knorm", layer_ratios=[0.5, 0.5])
    with pytest.raises(KVCompressError, match="spreads a ratio over the layers; valid: ratio=, not budget="):
        make_compressor("knorm", budget=8, layer_allocation="pyramid")
    with pytest.raises(KVCompressError, match="reduced='quant' is invalid; valid: window or a scored token method"):
        make_compressor("layers", reduced="quant")
