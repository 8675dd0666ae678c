"""kvcompress.latency: Fu 2024's numbers from the formulas, KV bytes per architecture, compression, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from kvcompress.latency import (
    CompressionProfile,
    Workload,
    estimate,
    kv_replication,
    latency_block,
    list_hardware,
    load_efficiency,
    load_hardware,
    load_model_profile,
    project,
    truncate,
)

YI = "yi-34b-200k"
HARDWARE_DIR = Path(__file__).resolve().parents[1] / "configs" / "hardware"


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


def test_session_throughput_for_b_users() -> None:
    # 13 users at 4K (the users that fit on one A100-80GB): TPS(B) = B·N_out / (T_pre(B) + T_dec(B)), docstring
    m, hw, b, n, n_out = load_model_profile(YI), load_hardware("a100-80gb"), 13, 4000, 250
    r = estimate(m, hw, Workload(n, n_out, users=b), convention="paper")
    t_pre = b * (2 * m.params_active * n + m.attention_flops(n)) / hw.flops_bf16
    t_dec = n_out * (m.active_weight_bytes + b * m.kv_bytes(n)) / hw.hbm_bandwidth
    assert m.attention_flops(n) == m.num_layers * m.hidden_size * n * (n + 1)  # Yi: n_q·d_h = d
    assert r.prefill_s == pytest.approx(t_pre, rel=1e-12) and r.decode_s == pytest.approx(t_dec, rel=1e-12)
    assert r.session_throughput_tok_s == pytest.approx(b * n_out / (t_pre + t_dec), rel=1e-12)
    assert r.concurrency == b and r.fits


def test_prefill_skipping_kv_layers_saves_their_kv_projection_flops() -> None:
    # S = 2 (K and V) · 2 FLOPs per multiply-add · d · n_kv · d_h · n per skipped layer, times B users
    m, hw, n, b = load_model_profile(YI), load_hardware("a100-80gb"), 4000, 3
    skipped = (0, 7, 59)
    prof = dataclasses.replace(CompressionProfile.dense(m, n), prefill_skips_kv_layers=skipped)
    r = estimate(m, hw, Workload(n, users=b), compression=prof)
    saved = b * len(skipped) * 2 * 2 * m.hidden_size * m.num_kv_heads * m.head_dim * n / hw.flops_bf16
    assert r.baseline.prefill_s - r.prefill_s == pytest.approx(saved, rel=1e-9)
    assert prof.prefill_saving() == "skips K/V of layers [0, 7, 59]"
    assert CompressionProfile.dense(m, n).prefill_saving() == "memory-only"


def test_latency_block_says_whether_prefill_saving_is_real() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100)
    report = {"kept_tokens": [[100.0, 100.0], [10.0, 10.0]], "context_tokens": 100, "dtype_bytes": 4}
    plain = latency_block(cfg, report, model_name="my-run-model")
    skip = latency_block(cfg, {**report, "prefill_skips_kv_layers": [1]})
    assert plain["evaluated"]["prefill_saving"] == plain["deployment"]["prefill_saving"] == "memory-only"
    assert plain["evaluated"]["model"] == plain["deployment"]["projected_from"]["model"] == "my-run-model"
    assert skip["evaluated"]["prefill_saving"] == "skips K/V of layers [1]"
    # target layer j reads source layer ⌊(j + ½)·2/60⌋: the upper 30 of Yi's 60 layers skip their K/V
    yi, hw = load_model_profile(YI), load_hardware("a100-80gb")
    assert skip["deployment"]["prefill_saving"] == f"skips K/V of layers {list(range(30, 60))}"
    saved = 30 * 4 * yi.hidden_size * yi.num_kv_heads * yi.head_dim * 50_000 / hw.flops_bf16
    dep, base = skip["deployment"], plain["deployment"]
    assert base["prefill_s"] - dep["prefill_s"] == pytest.approx(saved, rel=1e-9)


def test_projection_scales_dtype_bits_and_keeps_fixed_bits() -> None:
    # An fp32 source: per element, 0.5 elements in the cache dtype (coefficients) + 5 fixed bits (4-bit codes and
    # fp16 scales). On a bf16 target that is 5 + 0.5·16 bits, not 5 + 0.5·32 (nor the fp32 bits as they were).
    small = load_model_profile({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                                "vocab_size": 100, "torch_dtype": "float32"})
    fixed, frac = [5.0, 0.0], [0.5, 0.5]
    report = {"kept_tokens": [[100.0, 100.0]] * 2, "context_tokens": 100, "dtype_bytes": 4, "fixed_bits": fixed,
              "dtype_fraction": frac}
    prof = CompressionProfile.from_report(report, small)
    assert prof.key_bits == prof.value_bits == [f + d * 32 for f, d in zip(fixed, frac)]
    yi = load_model_profile(YI)
    proj = project(prof, yi, 50_000)
    expected = [fixed[min(1, math.floor((j + 0.5) * 2 / 60))] + 0.5 * 16 for j in range(60)]
    assert proj.key_bits == proj.value_bits == expected
    assert proj.kept_fractions()["bytes"] == pytest.approx(sum(expected) / (60 * 16))
    # a bf16 source is projected as before: its effective bits unchanged, with or without the split
    bf16 = dataclasses.replace(small, dtype_bytes=2)
    same = {**report, "dtype_bytes": 2}
    with_split = project(CompressionProfile.from_report(same, bf16), yi, 50_000)
    without = project(CompressionProfile.from_report({**same, "fixed_bits": None, "dtype_fraction": None,
                                                      "key_bits": [13.0, 8.0], "value_bits": [13.0, 8.0]}, bf16),
                      yi, 50_000)
    assert with_split.key_bits == without.key_bits and with_split.kv_bytes() == without.kv_bytes()
    with pytest.raises(ValueError, match=r"key_bits\[0\]=9.0 differs from fixed_bits \+ dtype_fraction"):
        CompressionProfile.from_report({**report, "key_bits": [9.0, 16.0]}, small)
    with pytest.raises(ValueError, match="fixed_bits and dtype_fraction must be given together"):
        CompressionProfile.from_report({**report, "dtype_fraction": None}, small)


# ---- presets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, published", [
    ("qwen2.5-7b", 7.62e9),  # Qwen/Qwen2.5-7B model card on Hugging Face: 7.62B parameters
    ("llama-3.1-70b", 70.6e9),  # meta-llama/Llama-3.1-70B model card on Hugging Face: 70.6B parameters
])
def test_preset_parameter_counts_match_published_totals(preset: str, published: float) -> None:
    m = load_model_profile(preset)
    assert m.params_total == pytest.approx(published, rel=0.01)  # biases are ignored by the formula
    assert m.params_active == m.params_total and m.gated_ffn and not m.tie_word_embeddings


def test_tied_embeddings_and_non_gated_ffn_parameter_paths() -> None:
    L, d, nq, nkv, dh, f, V = 3, 64, 4, 2, 16, 256, 1000
    base = {"num_hidden_layers": L, "hidden_size": d, "num_attention_heads": nq, "num_key_value_heads": nkv,
            "head_dim": dh, "intermediate_size": f, "vocab_size": V}
    attn = d * nq * dh + 2 * d * nkv * dh + nq * dh * d
    gated_untied = load_model_profile({**base, "model_type": "llama"})
    gelu_tied = load_model_profile({**base, "model_type": "gpt2", "hidden_act": "gelu", "tie_word_embeddings": True})
    assert gated_untied.gated_ffn and not gelu_tied.gated_ffn and gelu_tied.tie_word_embeddings
    assert gated_untied.params_total == L * (attn + 3 * d * f + 2 * d) + d + 2 * V * d
    assert gelu_tied.params_total == L * (attn + 2 * d * f + 2 * d) + d + V * d


# ---- hardware profiles --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_hardware())
def test_hardware_yaml_loads_and_every_number_has_a_source_comment(name: str) -> None:
    path = HARDWARE_DIR / f"{name}.yaml"
    hw = load_hardware(name)
    assert hw.name == name and hw.memory_bytes <= hw.memory_gb * 2**30 * 1.0001
    lines = path.read_text().splitlines()
    data = yaml.safe_load(path.read_text())

    def is_number(value: object) -> bool:  # PyYAML reads 312.0e12 (exponent without sign) as a string
        try:
            return not isinstance(value, bool) and math.isfinite(float(value))
        except (TypeError, ValueError):
            return False

    numeric = [i for i, ln in enumerate(lines) if re.match(r"^\w+:", ln) and is_number(data[ln.split(":")[0]])]
    assert len(numeric) >= 5  # flops, bandwidth, memory (GB and bytes), PCIe
    for i in numeric:
        assert "#" in lines[i] or (i > 0 and lines[i - 1].lstrip().startswith("#")), f"{path.name}: {lines[i]!r}"
    # the driver-reported capacity's comment states it in MiB: the value must be that many MiB
    mib = re.search(r"([\d,]+) MiB", lines[next(i for i in numeric if lines[i].startswith("memory_bytes")) - 1])
    assert mib and int(mib.group(1).replace(",", "")) * 2**20 == hw.memory_bytes


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
    with pytest.raises(ValueError, match=r"tp=3 .*either divide the KV heads or be a multiple of them .*replicated"
                                         r".*vLLM.*valid: 1, 2, 4, 8"):
        estimate(YI, "a100-80gb", Workload(1000, tp=3))
    with pytest.raises(ValueError, match=r"tp=16 .*valid: 1, 2, 4, 8, 56$"):  # 16 is a multiple of 8 but not of 56
        estimate(YI, "a100-80gb", Workload(1000, tp=16))
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
