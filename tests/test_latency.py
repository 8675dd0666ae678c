"""kvcompress.latency: Fu 2024's numbers from the formulas, KV bytes per architecture, compression, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from kvcompress.errors import KVCompressError
from kvcompress.latency import (
    CompressionProfile,
    FixedParts,
    Serving,
    Window,
    Workload,
    activation_reserve,
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
    # exact: the KV grows by 250 tokens (more), the embedding table is not read and P is 34.39e9, not 34e9
    exact = estimate(YI, "a100-80gb", Workload(50_000), convention="exact")
    assert exact.decode_s == pytest.approx(paper(50_000).decode_s, rel=0.01)


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
    # weights read by a decode step (no embedding table, one row gathered) + the KV + the new entry's write
    weights = (m.params_total - m.embedding_params + m.hidden_size) * 2
    assert r.decode_bytes_per_step == pytest.approx(weights + 10_001 * 131_072)


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
    w = m.paper_params * 2  # the paper's 68e9 B
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
    p = m.paper_params  # the paper's 34e9
    t_pre = b * (2 * p * n + m.attention_flops(n)) / hw.flops_bf16
    t_dec = n_out * (p * 2 + b * m.kv_bytes(n)) / hw.hbm_bandwidth
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
    assert len(numeric) >= 6  # flops, bandwidth, memory (GB and bytes), PCIe, all-reduce latency
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


# ==== the five formula fixes of the `exact` convention (each: the formula and a worked number) ==================
L8 = "llama-3.1-8b"


def test_fix1_prefill_charges_both_attention_matmuls() -> None:
    # A₂(n) = Σ_l 2·n_q·(d_h + d_v)·n(n+1)/2 (QKᵀ and AV, causal) = 2 · A₁(n) (Fu 2024's QKᵀ alone, L·d·n(n+1))
    yi, n = load_model_profile(YI), 50_000
    a1 = yi.num_layers * yi.hidden_size * n * (n + 1)
    assert yi.attention_flops(n) == a1 == 1.075221504e15
    assert yi.attention_flops(n, matmuls=2) == 2 * a1 == 2.150443008e15
    # worked number: Yi-34B-200K at 50K on an A100: paper 14.34 s, exact 17.62 s
    #   (2·P_body·n + 2·V·d + A₂) / 312e12 = (2·33.93e9·50,000 + 2·0.459e9 + 2.150e15) / 312e12
    exact, old = estimate(YI, "a100-80gb", Workload(n)), paper(n)
    expected = (2 * yi.body_params_active * n + 2 * yi.lm_head_params + 2 * a1) / 312e12
    assert exact.prefill_s == pytest.approx(expected, rel=1e-12)
    assert round(old.prefill_s, 2) == 14.34 and round(exact.prefill_s, 2) == 17.62


def test_fix2_prefill_has_no_embedding_flops_and_one_lm_head() -> None:
    # exact: 2·P_body·n + 2·V·d + A₂(n), P_body = P − V·d (input table) − V·d (untied lm_head); Fu 2024: 2·P·n + A₁(n)
    m, n = load_model_profile(L8), 4000
    v_d = 128_256 * 4096
    assert m.embedding_params == m.lm_head_params == v_d
    assert m.body_params_active == m.params_total - 2 * v_d == 6_979_588_096
    exact = estimate(m, "a100-80gb", Workload(n))
    flops = 2 * 6_979_588_096 * n + 2 * v_d + m.attention_flops(n, matmuls=2)
    assert exact.metrics.prefill_flops == pytest.approx(flops, rel=1e-12)
    assert exact.prefill_s == pytest.approx(flops / 312e12, rel=1e-12)  # compute bound
    # worked number: the paper's count is 10.5% high at 4K for Llama-3.1-8B (12.8% for Qwen2.5-7B)
    old = paper_of(L8, n)
    assert old.prefill_s / exact.prefill_s == pytest.approx(1.1051, abs=1e-4)
    assert paper_of("qwen2.5-7b", n).prefill_s / estimate("qwen2.5-7b", "a100-80gb", Workload(n)).prefill_s \
        == pytest.approx(1.1284, abs=1e-4)


def paper_of(model: str, n: int, **kw: int):
    return estimate(model, "a100-80gb", Workload(context=n, output_tokens=250, **kw), convention="paper")


def test_fix3_decode_does_not_read_the_embedding_table() -> None:
    # a decode step of B tokens reads P_body + V·d (lm_head) + B·d (the gathered rows), never the V·d input table
    m = load_model_profile(L8)
    assert m.decode_weight_params(1) == 6_979_588_096 + 525_336_576 + 4096 == 7_504_928_768
    r = estimate(m, "a100-80gb", Workload(4000))
    kv = 4000 * 131_072
    steps = sum(max((7_504_928_768 * 2 + (kv + t * 131_072) + 131_072) / 2.039e12,
                    (2 * (m.body_params_active + m.lm_head_params) + m.decode_attention_flops(4000 + t)) / 312e12)
                for t in range(250))
    assert r.decode_s == pytest.approx(steps, rel=1e-12)
    # worked number: 7.63 ms/token; the paper's all-weights charge is 6.65% more (8.13 ms)
    assert round(r.decode_ms_per_token, 2) == 7.63
    assert paper_of(L8, 4000).decode_ms_per_token / r.decode_ms_per_token == pytest.approx(1.0665, abs=1e-4)


def test_fix4_paper_params_stay_in_the_paper_convention() -> None:
    # Yi's preset: paper_params = 34e9 (Fu 2024's rounding) is charged by `paper` only; `exact` counts 34.389e9
    yi = load_model_profile(YI)
    assert yi.paper_params == 34e9 and yi.params_total == 34_388_917_248
    assert paper(4000).metrics.weight_bytes == 68e9
    exact = estimate(YI, "a100-80gb", Workload(4000), serving=Serving(memory_utilization=1.0, activation_reserve=0))
    assert exact.metrics.weight_bytes == 2 * 34_388_917_248
    # worked number: users at 4K with all of HBM: (85.899e9 − 68.778e9) / KV(4,250) = 16.39 (paper: 13.11)
    assert exact.users_fit == pytest.approx((85_899_345_920 - 2 * 34_388_917_248) / (4250 * 245_760), rel=1e-12)
    assert round(exact.users_fit, 2) == 16.39 and round(paper(4000).users_fit, 2) == 13.11


def _heads_profile(model, full_heads, context=1000, window=36.0):
    """Per layer, ``full_heads`` KV heads keep everything, the others a window (a `heads`-method report)."""
    rows = [[float(context) if h in full_heads else window for h in range(model.num_kv_heads)]
            for _ in range(model.num_layers)]
    return CompressionProfile.from_report({"kept_tokens": rows, "context_tokens": context}, model)


def test_fix5_projection_averages_heads_and_layers() -> None:
    # a run on 32 KV heads keeping 8 of them (25%; heads 0, 4, …, 28) projected onto Yi's 8 KV heads: each target
    # head averages 4 source heads (overlap weights), so every target head keeps 25%. Sampling source head
    # ⌊(h + ½)·32/8⌋ = 2, 6, …, 30 would have projected 0%.
    src = load_model_profile("llama-2-7b")
    prof = _heads_profile(src, set(range(0, 32, 4)), window=0.0)
    assert prof.kept_fractions()["bytes"] == pytest.approx(0.25)
    proj = project(prof, load_model_profile(YI), 50_000)
    assert all(k == pytest.approx(0.25 * 50_000) for row in proj.kept_tokens for k in row)
    # layers likewise: a 2-layer run (layer 1 kept whole, layer 0 half) onto 3 target layers: 0.5, 0.75, 1.0
    tiny = load_model_profile({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100})
    three = load_model_profile({"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 64,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                                "vocab_size": 100})
    two = CompressionProfile.from_report({"kept_tokens": [[50.0, 50.0], [100.0, 100.0]], "context_tokens": 100}, tiny)
    assert [row[0] for row in project(two, three, 1000).kept_tokens] == pytest.approx([500.0, 750.0, 1000.0])
    assert project(two, three, 1000).kept_fractions()["bytes"] == pytest.approx(0.75)  # the mean is kept


def test_fixed_size_window_of_heads_is_projected_as_tokens() -> None:
    # heads: 2 of 8 KV heads full, 6 a sink + recent window of 36 tokens, at 1,000 tokens: 0.25 + 0.75·0.036 kept.
    # At 50K the 6 windowed heads still hold 36 tokens: 0.25 + 0.75·36/50,000, not the short run's 0.277.
    yi = load_model_profile(YI)
    prof = _heads_profile(yi, {0, 1})
    fixed = FixedParts(windows=(Window("heads", 4, 32),))
    assert prof.kept_fractions()["bytes"] == pytest.approx(0.25 + 0.75 * 0.036)
    proj = project(prof, yi, 50_000, fixed=fixed)
    assert [proj.kept_tokens[0][h] for h in (0, 1, 2, 7)] == pytest.approx([50_000, 50_000, 36, 36])
    assert proj.kept_fractions()["bytes"] == pytest.approx(0.25 + 0.75 * 36 / 50_000)
    # tokens decoded after the prefill (δ = 3, appended to every slot) are read off the report and kept as such
    decoded = CompressionProfile.from_report({"kept_tokens": [[1003.0] * 2 + [39.0] * 6] * 60, "context_tokens": 1003},
                                             yi)
    assert fixed.decoded_tokens(decoded.kept_tokens, decoded.capacity(), 1003) == 3
    assert project(decoded, yi, 50_000, fixed=fixed).kept_tokens[0][2] == pytest.approx(39)


def test_fixed_size_window_of_dropped_layers() -> None:
    # layers (window=None): a dropped layer keeps sink 4 + min(1024, n // 8): 4 + 125 at 1,000 tokens, 4 + 1,024
    # at 50K (SimLayerKV's window), so half the layers dropped give 0.5 + 0.5·1028/50,000 there
    yi = load_model_profile(YI)
    rows = [[1000.0] * 8 if i % 2 else [129.0] * 8 for i in range(60)]
    prof = CompressionProfile.from_report({"kept_tokens": rows, "context_tokens": 1000}, yi)
    window = Window("layers", 4, None)
    assert window.tokens(1000) == 129 and window.tokens(50_000) == 1028
    proj = project(prof, yi, 50_000, fixed=FixedParts(windows=(window,)))
    assert proj.kept_fractions()["bytes"] == pytest.approx(0.5 + 0.5 * 1028 / 50_000)


def test_fixed_size_budget_is_projected_as_tokens() -> None:
    yi = load_model_profile(YI)
    prof = CompressionProfile.from_report({"kept_tokens": [[128.0] * 8] * 60, "context_tokens": 1000}, yi)
    proj = project(prof, yi, 50_000, fixed=FixedParts(budget=128, budget_method="snapkv"))
    assert proj.kept_fractions()["bytes"] == pytest.approx(128 / 50_000)  # not 12.8%


def _quant_report(model, context: int, residual: int = 128, group: int = 32, bits: int = 4) -> dict:
    """What a bf16 `quant` cache reports at ``context`` tokens: P plain (bf16) tokens per slot, the rest ``bits``-bit
    codes with fp16 scale + minimum per group of 32 (keys per channel over tokens, values per token over channels):
    bits + 32/32 fixed bits per element (the scales are another dtype than... here: the same, so kept in fixed)."""
    plain = context - group * ((context - residual) // group)
    coded = context - plain
    fixed = coded * (bits + 2 * 16 / group) / context
    frac = plain / context
    return {"kept_tokens": [[float(context)] * model.num_kv_heads] * model.num_layers, "context_tokens": context,
            "dtype_bytes": 2, "fixed_bits": [fixed] * model.num_layers, "dtype_fraction": [frac] * model.num_layers}


def test_fixed_size_residual_of_quant_is_projected_as_128_tokens() -> None:
    # quant (KIVI 4-bit, G = 32, R = 128) evaluated at 1,000 tokens: P = 1,000 − 32·⌊872/32⌋ = 136 bf16 tokens per
    # slot, 864 encoded at 4 + 1 bits. At 50K: 128 bf16 tokens + 49,872 at 5 bits:
    #   bytes ratio = (128·16 + 49,872·5) / (50,000·16) = 0.31424  →  users × 3.18 (not the short run's 2.x)
    yi = load_model_profile(YI)
    prof = CompressionProfile.from_report(_quant_report(yi, 1000), yi)
    assert prof.kept_fractions()["bytes"] == pytest.approx((136 * 16 + 864 * 5) / (1000 * 16))
    fixed = FixedParts(residual=128, chunk=32, residual_method="quant")
    assert fixed.plain_tokens(1000) == 136 and fixed.target_plain_tokens(50_000) == 128
    proj = project(prof, yi, 50_000, fixed=fixed)
    ratio = (128 * 16 + 49_872 * 5) / (50_000 * 16)
    assert proj.kept_fractions()["bytes"] == pytest.approx(ratio, rel=1e-9)
    r = estimate(yi, "a100-80gb", Workload(50_000), compression=proj)
    assert r.ratios["concurrency"] == pytest.approx(1 / ratio, rel=1e-9) and round(1 / ratio, 2) == 3.18
    without = project(prof, yi, 50_000)  # fractions only: the run's 13.6% bf16 share is carried over
    assert estimate(yi, "a100-80gb", Workload(50_000), compression=without).ratios["concurrency"] < 2.5


def test_token_fraction_of_a_tenth_gives_ten_times_the_users() -> None:
    m = load_model_profile(L8)
    for serving in (Serving(), Serving(memory_utilization=1.0, activation_reserve=0)):
        r = estimate(m, "a100-80gb", Workload(32_000), compression=CompressionProfile.uniform(m, 32_000, 0.1),
                     serving=serving)
        assert r.ratios["concurrency"] == pytest.approx(10.0, rel=1e-12) and r.ratios["kv_bytes"] == pytest.approx(0.1)
    # ... until the weights limit: the KV budget is what is left after the weights (70B on one A100: nothing)
    big = load_model_profile("llama-3.1-70b")
    r = estimate(big, "a100-80gb", Workload(4000), compression=CompressionProfile.uniform(big, 4000, 0.1))
    assert r.users_fit == 0 and not r.fits and r.session_throughput_tok_s is None


# ==== validation: one-line errors, `fits` ========================================================================
@pytest.mark.parametrize("make, message", [
    (lambda: CompressionProfile.uniform(load_model_profile(YI), 1000, key_bits=0), r"key_bits=0 is invalid; valid: bits"),
    (lambda: CompressionProfile.uniform(load_model_profile(YI), 1000, value_bits=-4), r"value_bits=-4 is invalid"),
    (lambda: CompressionProfile.uniform(load_model_profile(YI), 1000, token_fraction=0), r"token_fraction=0 is out of"),
    (lambda: CompressionProfile.from_report({"kept_tokens": [[1.0] * 8] * 60, "context_tokens": 10, "key_bits": -1},
                                            load_model_profile(YI)), r"key_bits\[0\]=-1.0 is invalid; valid: bits"),
    (lambda: CompressionProfile.from_report({"kept_tokens": [[-1.0] * 8] * 60, "context_tokens": 10},
                                            load_model_profile(YI)), r"negative or NaN entry"),
    (lambda: estimate(YI, "a100-80gb", Workload(1000), compression=CompressionProfile.from_report(
        {"kept_tokens": [[0.0] * 8] * 60, "context_tokens": 1000}, load_model_profile(YI))), r"keeps nothing"),
    (lambda: estimate(YI, "a100-80gb", Workload(200_000)), r"200,250 tokens .*exceeds yi-34b-200k's limit of "
                                                            r"200,000 positions; valid: context \+ output <= 200,000"),
    (lambda: estimate(YI, "a100-80gb", Workload(1000, tp=3)), r"tp=3 does not fit .*valid: 1, 2, 4, 8"),
    (lambda: estimate(YI, "tpu-v9", Workload(1000)), r"unknown hardware 'tpu-v9'; valid choices: a100-40gb, .*b200.*"
                                                     r"mi300x"),
    (lambda: estimate("llama-9", "a100-80gb", Workload(1000)), r"unknown model .*'llama-9'; valid choices: "
                                                               r"deepseek-v2-lite, .*yi-34b-200k"),
    (lambda: Serving(memory_utilization=1.5), r"memory_utilization=1.5 is invalid; valid: a fraction in \(0, 1\]"),
    (lambda: Serving(activation_reserve=-1), r"activation_reserve=-1 is invalid"),
    (lambda: Serving(weight_dtype="int3"), r"unknown dtype 'int3'; valid choices: .*fp8"),
    (lambda: estimate(YI, "a100-80gb", Workload(1000), serving=Serving(prefix_tokens=2000)),
     r"prefix_tokens=2000 exceeds the context of 1000 tokens"),
    (lambda: estimate(YI, "a100-80gb", Workload(1000), convention="fu"), r"unknown convention 'fu'; valid choices: "
                                                                         r"exact, paper"),
])
def test_bad_inputs_get_one_line_errors(make, message) -> None:
    with pytest.raises(KVCompressError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_the_paper_convention_follows_the_paper_past_the_limit() -> None:
    assert paper(1_000_000).concurrency == 0  # Fu 2024 sweeps Yi-34B-200K to 1M; only `exact` enforces the limit


def test_fits_and_does_not_fit() -> None:
    # Llama-3.1-70B (141.1 GB of bf16 weights) on one A100-80GB: "does not fit", no throughput (was 12.95 tok/s)
    r = estimate("llama-3.1-70b", "a100-80gb", Workload(4000))
    assert not r.fits and r.concurrency == 0 and r.session_throughput_tok_s is None
    assert r.capacity_throughput_tok_s is None
    assert r.fit.startswith("does not fit: weights 141.1 GB + activation reserve 0.6 GB exceed 0.9 × 1 × 85.9 GB")
    ok = estimate("llama-3.1-70b", "a100-80gb", Workload(4000, tp=4))
    assert ok.fits and ok.fit == "fits" and ok.session_throughput_tok_s > 0
    many = estimate(YI, "a100-80gb", Workload(50_000, users=3))
    assert not many.fits and many.fit.startswith("does not fit: 3 users need 37.0 GB of KV, 8.1 GB left")
    assert json.loads(json.dumps(r.to_dict()))["session_throughput_tok_s"] is None


# ==== serving options ============================================================================================
def test_memory_utilization_and_activation_reserve() -> None:
    # users = (u·N·memory_bytes − W − N·R_act) / KV(n + 250); R_act(auto) = 2048·2·(2d + ((n_q+2n_kv)·d_h + n_q·d_v
    # + 3f)/N) + 256·V·4: Llama-3.1-8B = 2048·2·(8192 + 6144 + 4096 + 43008) + 256·128256·4 = 382,992,384 B
    m = load_model_profile(L8)
    assert activation_reserve(m) == 2048 * 2 * (2 * 4096 + 48 * 128 + 32 * 128 + 3 * 14336) + 256 * 128_256 * 4
    assert activation_reserve(m) == 382_992_384
    r = estimate(m, "a100-80gb", Workload(32_000))
    kv_end = 32_250 * 131_072
    assert r.users_fit == pytest.approx((0.9 * 85_899_345_920 - m.params_total * 2 - 382_992_384) / kv_end)
    assert round(r.users_fit, 2) == 14.40
    bare = estimate(m, "a100-80gb", Workload(32_000), serving=Serving(memory_utilization=1.0, activation_reserve=0))
    assert bare.users_fit == pytest.approx((85_899_345_920 - m.params_total * 2) / kv_end) and round(bare.users_fit, 2) \
        == 16.52
    fixed = estimate(m, "a100-80gb", Workload(32_000), serving=Serving(activation_reserve=2e9))
    assert fixed.serving["activation_reserve_bytes"] == 2e9


def test_weight_and_kv_dtypes_are_separate() -> None:
    m = load_model_profile(L8)
    base = estimate(m, "h100-sxm", Workload(32_000))
    fp8_kv = estimate(m, "h100-sxm", Workload(32_000), serving=Serving(kv_dtype="fp8"))
    assert fp8_kv.kv_bytes == base.kv_bytes / 2 and fp8_kv.metrics.weight_bytes == base.metrics.weight_bytes
    fp8_w = estimate(m, "h100-sxm", Workload(32_000), serving=Serving(weight_dtype="fp8"))
    assert fp8_w.metrics.weight_bytes == base.metrics.weight_bytes / 2 and fp8_w.kv_bytes == base.kv_bytes
    assert fp8_w.serving["flops_format"] == "fp8" and fp8_w.serving["flops_peak"] == 1978.9e12
    # compute bound: the H100's FP8 rate halves the prefill; the A100 has no FP8 tensor cores (weight-only: bf16 rate)
    assert fp8_w.prefill_s == pytest.approx(base.prefill_s / 2, rel=0.01)
    a100 = estimate(m, "a100-80gb", Workload(32_000), serving=Serving(weight_dtype="fp8"))
    assert a100.serving["flops_format"] == "bfloat16"
    assert a100.prefill_s == pytest.approx(estimate(m, "a100-80gb", Workload(32_000)).prefill_s, rel=1e-9)
    fp4 = estimate(m, "b200", Workload(32_000), serving=Serving(weight_dtype="fp4"))
    assert fp4.metrics.weight_bytes == m.params_total * 0.5 and fp4.serving["flops_peak"] == 9e15
    # a compressed cache's own dtype is re-expressed in kv_dtype; the weights keep theirs (no FP8 cache halving them)
    prof = CompressionProfile.uniform(m, 32_000, token_fraction=0.5)
    both = estimate(m, "h100-sxm", Workload(32_000), compression=prof, serving=Serving(kv_dtype="fp8"))
    assert both.kv_bytes == pytest.approx(base.kv_bytes / 4) and both.metrics.weight_bytes == base.metrics.weight_bytes


def test_hardware_profiles_cover_the_serving_gpus() -> None:
    assert {"a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "mi300x", "l40s"} <= set(list_hardware())
    b200, mi = load_hardware("b200"), load_hardware("mi300x")
    assert (b200.flops_bf16, b200.flops_fp8, b200.flops_fp4, b200.hbm_bandwidth) == (2.25e15, 4.5e15, 9e15, 8e12)
    assert (mi.flops_bf16, mi.flops_fp8, mi.flops_fp4, mi.hbm_bandwidth) == (1307.4e12, 2614.9e12, None, 5.3e12)
    assert load_hardware("l40s").link_bandwidth() == 32e9  # no NVLink: TP over PCIe
    assert load_hardware("h100-sxm").link_bandwidth() == 450e9


def test_moe_reads_the_experts_a_decode_batch_touches() -> None:
    # Mixtral-8x7B: a step of B tokens touches E·(1 − (1 − k/E)^B) experts per layer: 2 at B = 1, 7.5 at B = 16
    m = load_model_profile("mixtral-8x7b")
    assert m.experts_touched(1) == pytest.approx(2) and m.experts_touched(16) == pytest.approx(8 * (1 - 0.75**16))
    expert = 3 * 4096 * 14336
    assert m.decode_weight_params(16) - m.decode_weight_params(1) == pytest.approx(
        32 * (m.experts_touched(16) - 2) * expert + 15 * 4096)
    r1 = estimate(m, "h100-sxm", Workload(4000, tp=2))
    assert r1.decode_bytes_per_step == pytest.approx(m.decode_weight_params(1) * 2 + 4001 * 131_072)
    assert r1.metrics.weight_bytes == pytest.approx(46.7e9 * 2, rel=0.01)  # every expert in HBM


def test_mla_caches_one_latent_per_token() -> None:
    # DeepSeek-V2-Lite: 27 layers × (512 + 64) latent elements × 2 B = 31,104 B per token (MHA-style accounting of
    # 16 heads × 2 × 128 would be 7.1× that); 15.7B parameters; every TP rank holds the whole latent (r = N)
    m = load_model_profile("deepseek-v2-lite")
    assert m.attention_type == "MLA" and m.kv_bytes_per_token == 27 * 576 * 2 == 31_104
    assert 27 * 16 * 2 * 128 * 2 / m.kv_bytes_per_token == pytest.approx(7.11, abs=0.01)
    assert m.params_total == pytest.approx(15.7e9, rel=0.01)
    assert kv_replication(m, 2) == 2
    assert estimate(m, "a100-80gb", Workload(4000, tp=2)).kv_bytes == 2 * 4000 * 31_104
    prof = CompressionProfile.uniform(m, 4000, token_fraction=0.5)
    assert prof.key_dim[0] == 576 and prof.value_dim[0] == 0 and prof.kept_fractions()["bytes"] == pytest.approx(0.5)


def test_tp_communication_two_all_reduces_per_layer() -> None:
    # T_comm(B) = 2·L·(α + 2(N−1)/N · B·d·2 B / link): Llama-3.1-70B, TP 8 on H100 (450 GB/s per direction,
    # α = 10 µs): 160·(10 µs + 1.75·16,384 / 450e9) = 1.6102 ms per decode step
    m = load_model_profile("llama-3.1-70b")
    with_comm = estimate(m, "h100-sxm", Workload(4000, tp=8))
    free = estimate(m, "h100-sxm", Workload(4000, tp=8), serving=Serving(tp_communication=False))
    per_step = 160 * (10e-6 + 2 * 7 / 8 * 8192 * 2 / 450e9)
    assert with_comm.metrics.tp_comm_s == pytest.approx(250 * per_step) and per_step == pytest.approx(1.6102e-3, rel=1e-4)
    assert with_comm.decode_s - free.decode_s == pytest.approx(250 * per_step)
    assert estimate(m, "h100-sxm", Workload(4000, tp=8), convention="paper").metrics.tp_comm_s == 0  # Fu 2024


def test_prefix_tokens_are_held_once_and_prefilled_once() -> None:
    # p shared tokens: users = (budget − KV(p)) / (KV(n + 250) − KV(p)); each request prefills its n − p tokens
    m = load_model_profile(L8)
    s = Serving(memory_utilization=1.0, activation_reserve=0, prefix_tokens=30_000)
    r = estimate(m, "a100-80gb", Workload(32_000), serving=s)
    budget = 85_899_345_920 - m.params_total * 2
    assert r.users_fit == pytest.approx((budget - 30_000 * 131_072) / (2_250 * 131_072))
    flops = 2 * m.body_params_active * 2000 + 2 * m.lm_head_params + m.prefix_attention_flops(30_000, 32_000)
    assert r.metrics.prefill_flops == pytest.approx(flops)


def test_report_carries_every_serving_option() -> None:
    d = estimate("mixtral-8x7b", "h100-sxm", Workload(4000, tp=2), serving=Serving(kv_dtype="fp8")).to_dict()
    assert {"memory_utilization", "activation_reserve", "activation_reserve_bytes", "weight_dtype", "kv_dtype",
            "flops_format", "prefix_tokens", "tp_communication", "kv_replication", "attention", "moe"} <= set(d["serving"])
    assert d["serving"]["kv_dtype"] == "fp8" and d["serving"]["moe"]["per_token"] == 2
    assert "not_applied" in estimate(YI, "a100-80gb", Workload(4000), convention="paper").to_dict()["serving"]


# ==== the latency check: the model within 1% of an independent first-principles count ============================
def test_model_agrees_with_first_principles_at_every_grid_point() -> None:
    from kvcompress.tables.latency_check import first_principles, grid, modelled

    checked = 0
    for model, tp, hw, n in grid():
        if load_model_profile(model).max_position_embeddings < n + 250:
            continue
        r, fp = modelled(model, hw, n, tp), first_principles(model, hw, n, tp)
        assert r.kv_gib == pytest.approx(fp["kv_gib"], rel=1e-9)
        assert r.metrics.weight_bytes / 1e9 == pytest.approx(fp["weights_gb"], rel=1e-9)
        assert r.prefill_s == pytest.approx(fp["prefill_s"], rel=0.01)
        assert r.decode_ms_per_token == pytest.approx(fp["decode_ms"], rel=0.01)
        assert r.users_fit == pytest.approx(fp["users"], rel=0.01)
        checked += 1
    assert checked == 46  # 54 grid points less the 8 past a model's limit
