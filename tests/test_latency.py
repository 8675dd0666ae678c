"""kvcompress.latency: Fu 2024's numbers from the formulas, KV bytes per architecture, compression, bad inputs."""

from __future__ import annotations

import json
import math

import pytest

from kvcompress.latency import (
    CompressionProfile,
    Workload,
    estimate,
    kv_replication,
    load_efficiency,
    load_hardware,
    load_model_profile,
    project,
    truncate,
)

YI = "yi-34b-200k"


def paper(n: int, **kw: int):
    return estimate(YI, "a100-80gb", Workload(context=n, output_tokens=250, **kw), convention="paper")


# ---- the paper's running example (published figures as expected values; everything else computed) -----------
def test_kv_size_truncated_gib_display() -> None:
    assert truncate(paper(100_000).kv_gib, 1) == 22.8
    assert truncate(paper(4_000).kv_gib, 2) == 0.91


def test_prefill_4k_and_50k() -> None:
    assert round(paper(4_000).prefill_s, 2) == 0.89
    assert paper(50_000).prefill_s == pytest.approx(14.1, rel=0.02)


def test_decode_250_tokens() -> None:
    assert round(paper(4_000).decode_s, 1) == 8.5
    assert round(paper(50_000).decode_s, 1) == 9.8
    # the exact per-step convention charges a little more (KV grows by 250 tokens), never less
    exact = estimate(YI, "a100-80gb", Workload(50_000), convention="exact")
    assert paper(50_000).decode_s < exact.decode_s < paper(50_000).decode_s * 1.01


def test_concurrency() -> None:
    assert paper(50_000).concurrency == 1
    assert paper(4_000, tp=2).users_fit == pytest.approx(100, abs=1)


def test_tensor_parallel_divides_time_and_adds_memory() -> None:
    one, four = paper(50_000), paper(50_000, tp=4)
    assert four.prefill_s == pytest.approx(one.prefill_s / 4)
    assert four.decode_s == pytest.approx(one.decode_s / 4)
    assert four.users_fit == pytest.approx((4 * 80 - 68) / one.kv_gib)


def test_efficiency_presets_slow_things_down() -> None:
    peak = estimate(YI, "a100-80gb", Workload(50_000), efficiency="peak")
    meas = estimate(YI, "a100-80gb", Workload(50_000), efficiency="measured-a100")
    assert meas.prefill_s == pytest.approx(peak.prefill_s / 0.70)
    assert meas.decode_s == pytest.approx(peak.decode_s / 0.75)
    assert load_efficiency("measured-a100").flops == pytest.approx(0.70, abs=0.03)


# ---- KV bytes per architecture ------------------------------------------------------------------------------
def test_kv_bytes_per_token_llama_8b() -> None:
    m = load_model_profile("llama-3.1-8b")
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert m.attention_type == "GQA"
    r = estimate(m, "a100-80gb", Workload(10_000))
    assert r.kv_bytes == 10_000 * 131_072
    assert r.decode_bytes_per_step == pytest.approx(m.active_weight_bytes + 10_000 * 131_072)


def test_mha_gqa_mqa_kv_bytes() -> None:
    yi = load_model_profile(YI)
    mha, mqa = yi.with_kv_heads(56), yi.with_kv_heads(1)
    assert (mha.attention_type, yi.attention_type, mqa.attention_type) == ("MHA", "GQA", "MQA")
    assert mha.kv_bytes_per_token == 2 * 60 * 56 * 128 * 2
    assert mqa.kv_bytes_per_token == 2 * 60 * 1 * 128 * 2
    assert mha.kv_bytes(100_000) / yi.kv_bytes(100_000) == 7


def test_sliding_window_model_caps_kv() -> None:
    m = load_model_profile("mistral-7b")
    assert m.sliding_window == 4096 and set(m.layer_types) == {"sliding"}
    assert m.kv_bytes(2_000) == 2_000 * 131_072
    assert m.kv_bytes(50_000) == 4096 * 131_072
    mixed = load_model_profile({"model_type": "gemma3_text", "num_hidden_layers": 4, "hidden_size": 64,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                "intermediate_size": 128, "vocab_size": 100, "sliding_window": 10,
                                "layer_types": ["sliding_attention"] * 3 + ["full_attention"]})
    per_layer = 2 * 2 * 16 * 2
    assert mixed.kv_bytes(100) == (3 * 10 + 100) * per_layer


def test_model_profile_from_config_object_and_directory(tmp_path) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256)
    m = load_model_profile(cfg)
    preset = load_model_profile("llama-3.1-8b")
    assert m.kv_bytes_per_token == 131_072
    assert m.params_total == preset.params_total == pytest.approx(8.03e9, rel=1e-3)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_model_profile(str(tmp_path)).kv_bytes_per_token == 131_072


def test_moe_total_in_memory_active_for_compute() -> None:
    m = load_model_profile({"model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                            "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert m.params_total == pytest.approx(46.7e9, rel=0.01)  # Mixtral-8x7B
    assert m.params_active == pytest.approx(12.9e9, rel=0.01)
    r = estimate(m, "a100-80gb", Workload(1000, tp=2), convention="paper")
    assert r.users_fit == pytest.approx((160 - m.params_total * 2 / 1e9) / (r.kv_bytes / 2**30))


# ---- compression --------------------------------------------------------------------------------------------
def test_half_tokens_halves_kv_and_doubles_concurrency() -> None:
    m = load_model_profile(YI)
    half = CompressionProfile.uniform(m, 50_000, token_fraction=0.5)
    r = estimate(m, "a100-80gb", Workload(50_000, tp=2), compression=half, convention="paper")
    assert r.kv_bytes == pytest.approx(r.baseline.kv_bytes / 2)
    w = m.active_weight_bytes
    assert r.decode_bytes_per_step - w == pytest.approx((r.baseline.decode_bytes_per_step - w) / 2)
    assert r.ratios["concurrency"] == pytest.approx(2.0)
    assert r.ratios["context_switch_s"] == pytest.approx(0.5)
    assert r.kept_fractions["token"] == pytest.approx(0.5) and r.kept_fractions["bytes"] == pytest.approx(0.5)


def test_from_report_half_tokens_per_head() -> None:
    m = load_model_profile("llama-3.1-8b")
    report = {"kept_tokens": [[2000.0] * 8 for _ in range(32)], "context_tokens": 4000, "dtype_bytes": 2}
    prof = CompressionProfile.from_report(report, m)
    assert prof.kv_bytes() == pytest.approx(m.kv_bytes(4000) / 2)
    r = estimate(m, "a100-80gb", Workload(4000), compression=prof)
    assert r.ratios["kv_bytes"] == pytest.approx(0.5)


def test_4bit_group32_charges_metadata() -> None:
    m = load_model_profile("llama-3.1-8b")
    q = CompressionProfile.uniform(m, 1000, key_bits=4, value_bits=4, group_size=32)
    # per (token, head): K and V 128 elements × 4 bits = 128 B, plus 2 × 4 groups × (fp16 scale + zero) = 32 B
    assert q.entry_bytes(0) == 128 * 4 / 8 * 2 + 2 * (128 // 32) * 2 * 2
    assert q.kv_bytes() / m.kv_bytes(1000) == pytest.approx(160 / 512)
    assert q.kept_fractions()["hidden"] == pytest.approx(160 / 512)


def test_kept_fractions_telescope_to_bytes() -> None:
    m = load_model_profile(YI)
    p = CompressionProfile.uniform(m, 20_000, token_fraction=0.5, head_fraction=0.5, layer_fraction=0.5,
                                   rank_fraction=0.25)
    f = p.kept_fractions()
    assert f["layer"] == 0.5 and f["head"] == 0.5 and f["token"] == 0.5 and f["hidden"] == 0.25
    assert f["layer"] * f["head"] * f["token"] * f["hidden"] == pytest.approx(f["bytes"])


def test_project_keeps_fractions_on_another_model() -> None:
    small = load_model_profile("llama-3.1-8b")
    report = {"kept_tokens": [[1000.0 if h % 2 else 4000.0 for h in range(8)] for _ in range(32)],
              "context_tokens": 4000, "key_bits": 4, "value_bits": 16, "dtype_bytes": 2}
    prof = CompressionProfile.from_report(report, small)
    target = load_model_profile(YI)
    proj = project(prof, target, 50_000)
    assert proj.kept_fractions()["token"] == pytest.approx(prof.kept_fractions()["token"])
    assert proj.kept_fractions()["bytes"] == pytest.approx(prof.kept_fractions()["bytes"])
    assert proj.key_bits[0] == 4 and proj.value_bits[0] == 16


def test_extra_prefill_flops_are_charged() -> None:
    m = load_model_profile(YI)
    p = CompressionProfile.uniform(m, 4000, token_fraction=0.5, extra_prefill_flops=312e12)
    r = estimate(m, "a100-80gb", Workload(4000), compression=p)
    assert r.prefill_s - r.baseline.prefill_s == pytest.approx(1.0)


# ---- bad inputs ---------------------------------------------------------------------------------------------
def test_unknown_hardware_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown hardware 'tpu-v9'.*a100-80gb.*h100-sxm"):
        load_hardware("tpu-v9")
    assert load_hardware("a100-80gb").hbm_bandwidth == 2.039e12


def test_bad_context_and_tp() -> None:
    with pytest.raises(ValueError, match="context=0"):
        Workload(context=0)
    with pytest.raises(ValueError, match="context=-5"):
        Workload(context=-5)
    with pytest.raises(ValueError, match=r"tp=3.*valid: 1, 2, 4, 8"):
        estimate(YI, "a100-80gb", Workload(1000, tp=3))
    mqa = load_model_profile(YI).with_kv_heads(1)
    assert kv_replication(mqa, 4) == 4  # each GPU holds a replica of the single KV head


def test_missing_config_field() -> None:
    with pytest.raises(ValueError, match="lacks num_hidden_layers"):
        load_model_profile({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})
    with pytest.raises(ValueError, match="unknown model"):
        load_model_profile("no-such-model")


def test_report_to_dict_is_json() -> None:
    r = estimate(YI, "a100-80gb", Workload(4000), label="deployment")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["label"] == "deployment" and d["baseline"]["kv_bytes"] == d["kv_bytes"]
    assert d["ratio"]["kv_bytes"] == 1.0 and not math.isnan(d["session_throughput_tok_s"])
