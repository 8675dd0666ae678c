"""Layer axis: ``layers`` (layer skipping), ``share`` (MiniCache cross-layer sharing), ``layer_budget`` (per-layer
ratios for any token scorer). Exactness at ratio 1 / full retention, byte counts from stored tensors against the
analytic values, scores against brute-force references, batch-row independence, composition with other axes."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from tiny_models import _COMMON, ARCHITECTURES, left_pad, prompts, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.methods.layer.layers import kept_layer_count
from kvcompress.methods.token.budgets import schedule_ratios
from kvcompress.ragged import index_bytes
from kvcompress.registry import available_methods

FP32 = 4


@functools.lru_cache(maxsize=None)
def four_layer_model() -> torch.nn.Module:
    config = AutoConfig.for_model("llama", **{**_COMMON, "num_hidden_layers": 4})
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _generate(model, ids, cache, mask=None, steps=5):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **cache_arg(cache),
            output_logits=True, return_dict_in_generate=True,
        )


def _prefill(model, ids, cache, mask=None):
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_arg(cache))
    return cache


def _per_token(cfg) -> int:
    return cfg.num_key_value_heads * cfg.head_dim * 2 * FP32  # keys + values, all KV heads, fp32


# ---------------------------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize("score", ["lazy", "cosine", "first", "random"])
def test_layers_ratio_one_reproduces_the_full_cache(score: str) -> None:
    model = tiny_model("llama")
    ids, mask = left_pad(prompts((37, 64, 23)))
    ref = _generate(model, ids, DynamicCache(), mask)
    cache = kvcompress.compress(model, "layers", ratio=1.0, score=score)
    ours = _generate(model, ids, cache, mask)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert cache.shared["layers"]["kept_layers"] == [[0, 1]] * 3
    assert cache.shared["layers"]["prefill_saving"] == "memory-only"


def test_layers_half_kept_bytes_are_analytic() -> None:
    model = four_layer_model()
    cfg = model.config
    n, sink, window = 40, 4, 8
    cache = _prefill(model, prompts((n,))[0].view(1, -1), kvcompress.compress(model, "layers", ratio=0.5, score="first", sink=sink, window=window))
    assert cache.shared["layers"]["kept_layers"] == [[0, 1]]
    # 2 full layers of n tokens + 2 dropped layers of sink + window tokens (uniform counts: dense buffers, no index).
    assert cache.kept_bytes() == (2 * n + 2 * (sink + window)) * _per_token(cfg)
    assert cache.memory_report()["kept_tokens"] == [[40.0] * 2] * 2 + [[12.0] * 2] * 2


@pytest.mark.parametrize(
    ("score", "ratio", "expected"),
    [("first", 0.5, [0, 1]), ("last", 0.5, [2, 3]), ("every_k", 0.5, [0, 2]), ("every_k", 0.75, [0, 1, 2]), ("first", 0.1, [0])],
)
def test_layers_fixed_patterns(score: str, ratio: float, expected: list[int]) -> None:
    model = four_layer_model()
    cache = _prefill(model, prompts((30,))[0].view(1, -1), kvcompress.compress(model, "layers", ratio=ratio, score=score, window=4))
    assert cache.shared["layers"]["kept_layers"] == [expected]
    assert [int(layer.length) for layer in cache.layers] == [30 if i in expected else 8 for i in range(4)]


def test_kept_layer_count_is_ceil_and_at_least_one() -> None:
    assert [kept_layer_count(r, 10) for r in (0.01, 0.1, 0.3, 0.35, 1.0)] == [1, 1, 3, 4, 10]


def test_random_layer_control_is_seeded_and_row_independent() -> None:
    model = four_layer_model()
    ids, mask = left_pad(prompts((30, 20)))
    picks = []
    for seed in (0, 1, 2, 3):
        cache = _prefill(model, ids, kvcompress.compress(model, "layers", ratio=0.5, score="random", seed=seed, window=4), mask)
        rows = cache.shared["layers"]["kept_layers"]
        assert rows[0] == rows[1] and len(rows[0]) == 2
        picks.append(tuple(rows[0]))
    assert len(set(picks)) > 1


def _eager_attentions(model, ids):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, output_attentions=True).attentions
    finally:
        kvcompress.attach(model)


def test_lazy_score_matches_eager_attention_mass_on_sink_and_recent() -> None:
    model = four_layer_model()
    n, sink, window, w = 33, 2, 5, 3
    ids = prompts((n,), seed=5)[0].view(1, -1)
    cache = _prefill(model, ids, kvcompress.compress(model, "layers", ratio=0.5, sink=sink, window=window, lazy_queries=w))
    kept_pos = torch.zeros(n, dtype=torch.bool)
    kept_pos[:sink] = True
    kept_pos[n - window :] = True
    expected = [1.0 - float(att[0, :, -w:, kept_pos].sum(-1).mean()) for att in _eager_attentions(model, ids)]
    importance = cache.shared["layers"]["layer_importance"][0]
    assert importance == pytest.approx(expected, abs=1e-5)
    top = sorted(sorted(range(4), key=lambda i: -expected[i])[:2])
    assert cache.shared["layers"]["kept_layers"] == [top]


def test_cosine_score_matches_the_residual_update_of_each_attention_block() -> None:
    model = four_layer_model()
    ids = prompts((25,), seed=6)[0].view(1, -1)
    seen = {}

    def hook(module, args, kwargs, output):
        h = kwargs.get("hidden_states", args[0] if args else None)
        seen[module.layer_idx] = torch.nn.functional.cosine_similarity(h, h + output[0], dim=-1).mean().item()

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        cache = _prefill(model, ids, kvcompress.compress(model, "layers", ratio=0.25, score="cosine", window=4))
    finally:
        for h in handles:
            h.remove()
    assert cache.shared["layers"]["layer_importance"][0] == pytest.approx([1 - seen[i] for i in range(4)], abs=1e-5)


def test_layers_rows_choose_their_own_layers() -> None:
    """Scores are per row: a batch keeps, for each row, the layers it keeps alone (ragged storage per row)."""
    model = four_layer_model()
    rows = prompts((40, 29, 35), seed=11)
    alone = []
    for r in rows:
        c = _prefill(model, r.view(1, -1), kvcompress.compress(model, "layers", ratio=0.5, window=4, lazy_queries=4))
        alone.append(c.shared["layers"]["kept_layers"][0])
    ids, mask = left_pad(rows)
    cache = kvcompress.compress(model, "layers", ratio=0.5, window=4, lazy_queries=4, trace=True)
    _prefill(model, ids, cache, mask)
    assert cache.shared["layers"]["kept_layers"] == alone
    for i, row in enumerate(rows):
        for layer in range(4):
            held = cache.layers[layer].kept_tokens()[i].tolist()
            assert held == [float(len(row)) if layer in alone[i] else 8.0] * 2


# ---------------------------------------------------------------------------------------------------------------
# share (MiniCache)


def test_share_with_full_retention_reproduces_the_full_cache() -> None:
    model = four_layer_model()
    ids, mask = left_pad(prompts((37, 64, 23)))
    ref = _generate(model, ids, DynamicCache(), mask)
    cache = kvcompress.compress(model, "share", start=0, retain=1.0)
    ours = _generate(model, ids, cache, mask)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert cache.shared["share"]["merged_pairs"] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_share_full_retention_on_every_architecture(arch: str) -> None:
    model = tiny_model(arch)
    ids, mask = left_pad(prompts((37, 23)))
    ref = _generate(model, ids, DynamicCache(), mask, steps=3)
    cache = kvcompress.compress(model, "share", start=0, retain=1.0)
    ours = _generate(model, ids, cache, mask, steps=3)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert cache.shared["share"]["merged_pairs"] == [[0, 1]]


def test_prefill_cost_says_memory_only() -> None:
    cfg = four_layer_model().config
    for comp in (kvcompress.compress(four_layer_model(), "layers", ratio=0.5).compressors[0],
                 kvcompress.compress(four_layer_model(), "share").compressors[0]):
        cost = comp.prefill_cost(cfg, 100)
        assert cost["prefill_saving"] == "memory-only" and cost["prefill_skips_kv_layers"] == ()
        assert cost["extra_prefill_flops"] > 0


def _share_bytes(pairs: int, n: int, retain: float, d: int, index_bytes: int) -> tuple[int, int]:
    """Analytic bytes of a merged pair's (first, second) layer for one block of `pairs` (row, head) pairs × n tokens."""
    k = math.floor(retain * n + 0.5)
    m = n - k
    directions = 2 * pairs * m * d * FP32  # keys + values
    positions = pairs * k * 4  # int32
    magnitudes = 2 * pairs * m * FP32
    retained = 2 * pairs * k * d * FP32
    return index_bytes + directions + positions + magnitudes + retained, index_bytes + magnitudes + retained


def test_share_kept_bytes_are_directions_magnitudes_and_retained_tokens() -> None:
    model = four_layer_model()
    cfg = model.config
    n = 40
    cache = _prefill(model, prompts((n,))[0].view(1, -1), kvcompress.compress(model, "share"))  # start = L // 2 = 2
    pairs = cfg.num_key_value_heads
    index = 2 * 8 * pairs  # the segment's rows + heads (int64)
    first, second = _share_bytes(pairs, n, 0.05, cfg.head_dim, index)
    plain = n * _per_token(cfg) + index  # layers 0 and 1 are before `start`: their keys/values as they are
    assert [layer.kept_bytes() for layer in cache.layers] == [plain, plain, first, second]
    assert cache.kept_bytes() == 2 * plain + first + second
    assert cache.shared["share"] == {"prefill_saving": "memory-only", "merged_pairs": [[2, 3]]}
    # The shared direction tensors are held once and counted once.
    ptrs = [t.untyped_storage().data_ptr() for t in cache.tensors() if t.numel()]
    assert len(ptrs) == len(set(ptrs))
    codec_a, codec_b = cache.layers[2].segments[0].codec, cache.layers[3].segments[0].codec
    assert codec_a.pair is codec_b.pair and codec_a.pair.dir_k.shape == (pairs, n - 2, cfg.head_dim)


def test_share_reconstruction_is_slerp_direction_times_magnitude() -> None:
    model = tiny_model("llama")
    ids = prompts((30,))[0].view(1, -1)
    dense = DynamicCache()
    _prefill(model, ids, dense)
    cache = _prefill(model, ids, kvcompress.compress(model, "share", start=0, retain=0.1, t=0.6))
    a, b = dense.layers[0].keys[0], dense.layers[1].keys[0]  # (heads, n, d)
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    theta = (ua * ub).sum(-1).clamp(-1, 1).acos().unsqueeze(-1)
    direction = (torch.sin(0.4 * theta) * ua + torch.sin(0.6 * theta) * ub) / torch.sin(theta)
    ka, _ = cache.layers[0].segments[0].kv()
    kb, _ = cache.layers[1].segments[0].kv()
    retained = cache.layers[0].segments[0].codec.pair.retained.long()  # (heads, 3)
    merged = torch.ones(2, 30, dtype=torch.bool).scatter_(1, retained, False)
    torch.testing.assert_close(ka[merged], (a.norm(dim=-1, keepdim=True) * direction)[merged], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kb[merged], (b.norm(dim=-1, keepdim=True) * direction)[merged], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ka[~merged], a[~merged], atol=0, rtol=0)
    # The retained tokens are the 3 of each head with the largest key + value angle.
    va, vb = dense.layers[0].values[0], dense.layers[1].values[0]
    cos_v = (va / va.norm(dim=-1, keepdim=True) * vb / vb.norm(dim=-1, keepdim=True)).sum(-1).clamp(-1, 1)
    dist = theta.squeeze(-1) + cos_v.acos()
    assert torch.equal(retained.sort(-1).values, dist.topk(3, -1).indices.sort(-1).values)


def test_share_composes_with_streaming_and_skips_mismatched_pairs() -> None:
    model = four_layer_model()
    ids = prompts((40,))[0].view(1, -1)
    cache = _prefill(model, ids, kvcompress.compress(model, ["streaming", "share"], ratio=0.5, params={"share": {"start": 0}}))
    assert cache.shared["share"]["merged_pairs"] == [[0, 1], [2, 3]]
    # every_k keeps layers 0 and 2 full (40 tokens) and windows 1 and 3 (12): neither pair holds the same positions in
    # both layers, so nothing is merged and every layer counts its plain keys/values (+ its segment's row/head index).
    cache = _prefill(
        model, ids, kvcompress.compress(model, ["layers", "share"], ratio=0.5, params={"layers": {"score": "every_k", "window": 8}, "share": {"start": 0}})
    )
    assert "merged_pairs" not in cache.shared["share"]
    assert cache.kept_bytes() == (2 * 40 + 2 * 12) * _per_token(model.config) + 4 * 2 * 8 * 2


# ---------------------------------------------------------------------------------------------------------------
# layer_budget


def test_schedules_have_the_requested_mean_and_shape() -> None:
    for schedule in ("pyramid", "inverse_pyramid", "uniform"):
        for ratio in (0.1, 0.3, 0.7, 1.0):
            r = schedule_ratios(schedule, ratio, 8)
            assert sum(r) / 8 == pytest.approx(ratio, abs=1e-9) and all(0 < x <= 1 for x in r)
    r = schedule_ratios("pyramid", 0.2, 5)  # unsaturated: PyramidKV's linear schedule (min = ratio/beta)
    assert r == pytest.approx([0.39, 0.295, 0.2, 0.105, 0.01])
    assert schedule_ratios("inverse_pyramid", 0.2, 5) == pytest.approx(r[::-1])


def test_layer_budget_keeps_the_scheduled_count_per_layer() -> None:
    model = four_layer_model()
    n = 60
    cache = _prefill(model, prompts((n,))[0].view(1, -1), kvcompress.compress(model, "layer_budget", ratio=0.25, scorer="random"))
    ratios = cache.shared["layer_budget"]["layer_ratios"]
    assert ratios == pytest.approx(schedule_ratios("pyramid", 0.25, 4))
    assert [layer.length for layer in cache.layers] == [max(1, round(r * n)) for r in ratios]
    cache = _prefill(
        model, prompts((n,))[0].view(1, -1), kvcompress.compress(model, "layer_budget", ratios=[1.0, 0.5, 0.25, 0.1], scorer="streaming")
    )
    assert [layer.length for layer in cache.layers] == [60, 30, 15, 6]
    # The default scorer is snapkv: PyramidKV's allocation.
    cache = _prefill(model, prompts((n,))[0].view(1, -1), kvcompress.compress(model, "layer_budget", ratio=0.5))
    assert cache.compressors[0].scorer == "snapkv"
    assert [layer.length for layer in cache.layers] == [round(r * n) for r in schedule_ratios("pyramid", 0.5, 4)]


def test_layer_budget_ratio_one_is_the_full_cache() -> None:
    model = tiny_model("llama")
    ids, mask = left_pad(prompts((37, 64, 23)))
    ref = _generate(model, ids, DynamicCache(), mask)
    ours = _generate(model, ids, kvcompress.compress(model, "layer_budget", ratio=1.0, scorer="random"), mask)
    assert torch.equal(ours.sequences, ref.sequences)


# ---------------------------------------------------------------------------------------------------------------
# composition with the other axes


def test_layers_compose_with_token_axis_bytes_are_the_product() -> None:
    model = four_layer_model()
    n = 48
    ids = prompts((n,))[0].view(1, -1)
    cache = _prefill(
        model, ids, kvcompress.compress(model, ["layers", "streaming"], ratio=0.5, params={"layers": {"score": "last", "window": 12}})
    )
    # Kept layers: the token axis keeps ratio·n of n; dropped layers: the token axis keeps ratio of the 16-token window.
    assert [layer.length for layer in cache.layers] == [8, 8, 24, 24]
    assert cache.kept_bytes() == (2 * round(0.5 * 16) + 2 * round(0.5 * n)) * _per_token(model.config)
    cache = _prefill(model, ids, kvcompress.compress(model, "layers+random", ratio=0.5, params={"layers": {"score": "first", "window": 12}}))
    assert [layer.length for layer in cache.layers] == [24, 24, 8, 8]


def _heads_params() -> dict:
    from kvcompress.registry import get_method

    return {"scores": "prompt"} if "scores" in get_method("heads").__dataclass_fields__ else {}


def test_layers_compose_with_the_head_axis_bytes_are_analytic() -> None:
    if "heads" not in available_methods():
        pytest.skip("method not registered yet: heads")
    model = four_layer_model()
    n, window = 64, 12
    ids = prompts((n,))[0].view(1, -1)
    params = {"layers": {"score": "first", "window": window}, "heads": _heads_params()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # heads may say how its ratio rounds
        composed = _prefill(model, ids, kvcompress.compress(model, ["layers", "heads"], ratio=0.5, params=params))
        alone = _prefill(model, ids, kvcompress.compress(model, "heads", ratio=0.5, params={"heads": _heads_params()}))
    # Kept layers (0, 1) hold exactly what `heads` keeps alone; dropped layers hold their sink + window tokens in
    # every head (a windowed head's own sink + recent window covers those 16 tokens): uniform, no index.
    expected = sum(alone.layers[i].kept_bytes() for i in (0, 1)) + 2 * (4 + window) * _per_token(model.config)
    assert composed.kept_bytes() == expected
    assert [composed.layers[i].kept_bytes() for i in (0, 1)] == [alone.layers[i].kept_bytes() for i in (0, 1)]


def _quant_block_bytes(pairs: int, count: int, d: int, bits: int, group: int) -> int:
    """KIVI layout (methods/quant.py) with residual=0: whole groups of `group` tokens quantized (keys per channel
    over token groups, values per token over channel groups, fp16 scale + minimum) in an encoded segment carrying its
    row/head index (int64); the remainder (< group tokens per pair) stays in fp32 (its index metadata, when the
    layer is ragged, is added by the caller: kvcompress.ragged.index_bytes)."""
    n = count // group * group
    keys = pairs * n * d * bits // 8 + pairs * (n // group) * d * 2 * 2
    values = pairs * n * d * bits // 8 + pairs * n * math.ceil(d / group) * 2 * 2
    tail = pairs * (count - n) * d * 2 * FP32
    return keys + values + tail + (n > 0) * 2 * 8 * pairs


def test_layers_heads_snapkv_quant_end_to_end_bytes_are_the_product_of_the_axes() -> None:
    missing = [m for m in ("heads", "snapkv", "quant") if m not in available_methods()]
    if missing:
        pytest.skip(f"methods not registered yet: {', '.join(missing)}")
    model = four_layer_model()
    cfg = model.config
    n, sink, window, bits, group = 64, 4, 12, 4, 8
    ids = prompts((n,))[0].view(1, -1)
    params = {
        "layers": {"score": "first", "sink": sink, "window": window},
        "heads": _heads_params(),
        "quant": {"bits": bits, "group": group, "residual": 0},
    }
    method = ["layers", "heads", "snapkv", "quant"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = _generate(model, ids, kvcompress.compress(model, method, ratio=0.5, params=params), steps=4)
        assert out.sequences.shape[1] == n + 4
        cache = _prefill(model, ids, kvcompress.compress(model, method, ratio=0.5, params=params))
    # Per (layer, KV head) tokens = layer axis cap x head axis cap x token ratio, then the hidden axis' bytes:
    # kept layers 0-1: one full head (64 -> snapkv 32) and one window head (sink + recent = 36 -> 18): ragged, one
    # block each; dropped layers 2-3: 4 + 12 = 16 tokens in both heads (the window head's 36 covers them) -> 8 each.
    d = cfg.head_dim
    heads = next(c for c in cache.compressors if c.name == "heads")
    window_head = min(n, heads.sink + heads.recent)
    full_head, windowed = round(0.5 * n), round(0.5 * window_head)
    kept_layer = (_quant_block_bytes(1, full_head, d, bits, group) + _quant_block_bytes(1, windowed, d, bits, group)
                  + index_bytes((full_head % group, windowed % group)))  # fp32 remainders of unequal counts: ragged
    dropped_layer = _quant_block_bytes(cfg.num_key_value_heads, round(0.5 * (sink + window)), d, bits, group)
    assert [layer.kept_bytes() for layer in cache.layers] == [kept_layer] * 2 + [dropped_layer] * 2
    assert cache.kept_bytes() == 2 * kept_layer + 2 * dropped_layer


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("layers", {"score": "entropy"}, "unknown score 'entropy'; valid choices: cosine, every_k, first, last, lazy, random"),
        ("layers", {"window": -1}, "window=-1 is invalid; valid: an integer >= 0"),
        ("share", {"t": 1.5}, "t=1.5 is invalid; valid: a SLERP weight in [0, 1]"),
        ("share", {"retain": -0.1}, "retain=-0.1 is invalid; valid: a retained fraction in [0, 1]"),
        ("layer_budget", {"schedule": "zigzag"}, "unknown schedule 'zigzag'; valid choices: inverse_pyramid, pyramid, uniform"),
        ("layer_budget", {"scorer": "layers"}, "scorer='layers' is not a token-axis method with a ratio; valid: a token scorer such as random, streaming"),
        ("layer_budget", {"ratios": [0.5, 2]}, "ratios[]=2.0 is out of range; valid: a kept fraction in (0, 1]"),
    ],
)
def test_errors_are_one_line(method: str, params: dict, message: str) -> None:
    with pytest.raises(KVCompressError) as err:
        kvcompress.compress(tiny_model("llama"), method, **params)
    assert str(err.value) == message


def test_layer_budget_list_length_must_match_the_model() -> None:
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "layer_budget", ratios=[0.5, 0.5, 0.5])
    with pytest.raises(KVCompressError, match=r"ratios has 3 entries; valid: one per layer \(2\)"):
        _prefill(model, prompts((20,))[0].view(1, -1), cache)


def test_share_second_layer_counts_the_directions_once_it_is_their_only_holder() -> None:
    model = four_layer_model()
    cache = _prefill(model, prompts((40,))[0].view(1, -1), kvcompress.compress(model, "share"))
    second = cache.layers[3]
    pair = second.segments[0].codec.pair
    before = second.kept_bytes()
    cache.layers[2].segments = []  # e.g. a decode-time eviction re-stored layer 2: its codec is released
    assert second.kept_bytes() == before + sum(t.numel() * t.element_size() for t in pair.tensors())
