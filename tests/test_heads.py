"""Head axis: retrieval-head detection (artifact, CLI), `heads` / `heads_random` / `adaptive_heads`."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from reference import masked_reference_logits
from transformers import AutoModelForCausalLM, LlamaConfig

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.methods.head import __main__ as heads_cli
from kvcompress.methods.head.scores import (
    artifact_path,
    config_hash,
    ensure_scores,
    find_scores,
    full_kv_heads,
    kv_order,
    save_scores,
    weights_fingerprint,
)
from kvcompress.ragged import index_bytes


@pytest.fixture(scope="module")
def testbed(cache_root):
    from kvcompress.zoo.testbed import load, testbed_path

    return load(testbed_path())


@pytest.fixture(scope="module")
def scored(cache_root, testbed):
    """The testbed with its head-score artifact in the module's cache (detected here if no test made it yet)."""
    model, tok = testbed
    if find_scores(model) is None:
        ensure_scores(model, tok, verbose=False, lengths=[256], depths=[0.5])
    return testbed


def test_detect_ranks_planted_retrieval_head_first_and_show(cache_root, testbed, tmp_path, capsys) -> None:
    """The constructed testbed's copy head (layer 1, query head 0, KV head 0) is planted by construction."""
    model, tok = testbed
    assert heads_cli.main(["detect", "model=testbed", "lengths=[256]", "depths=[0.3,0.7]"]) == 0
    scores = find_scores(model)
    assert scores is not None and scores["primary"] == "retrieval"
    assert scores["probes"]["correct"] == 2
    grid = torch.tensor(scores["retrieval"])
    assert divmod(int(grid.argmax()), grid.shape[1]) == (1, 0)
    assert float(grid[1, 0]) == pytest.approx(1.0) and float(grid.sum() - grid[1, 0]) == 0.0
    assert kv_order(scores)[0] == (1, 0)
    # show: table + heatmap
    png = tmp_path / "heat.png"
    assert heads_cli.main(["show", "model=testbed", f"png={png}"]) == 0
    out = capsys.readouterr().out
    assert "retrieval score per layer x head" in out and png.stat().st_size > 0
    # ensure_scores finds it without recomputing
    assert ensure_scores(model, tok, verbose=False) == artifact_path(model)


def test_heads_keeps_needle_and_random_control_uses_same_budget(scored) -> None:
    from kvcompress.eval.needle import make_needle_samples, score_exact_match
    from kvcompress.zoo.testbed import answer

    model, tok = scored
    sample = make_needle_samples(tok, [512], [0.4])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c_heads = kvcompress.compress(model, "heads", ratio=0.02)
        assert score_exact_match(answer(model, tok, sample, c_heads), sample.answer) == 1.0
        c_rand = kvcompress.compress(model, "heads_random", ratio=0.02, seed=0)
        answer(model, tok, sample, c_rand)
    assert full_kv_heads(c_heads, sample.num_tokens) == {(1, 0)}  # the retrieval KV head is held in full
    assert c_heads.kept_bytes() == c_rand.kept_bytes()  # same number of full heads, one each


def test_heads_quarter_keeps_needle_accuracy_random_heads_lose_it(scored) -> None:
    """Issue 6 acceptance on a small needle grid: ``heads`` at ratio 0.25 within 5 points of the full cache, and
    ``heads_random`` clearly lower.

    ratio 0.25 of the testbed's 6 KV heads keeps k = 2 in full; the other heads keep 4 sink + 32 recent tokens, so a
    needle at depth 0.2–0.8 of a 512/1K prompt lies outside their window. Only the retrieval KV head needs the needle
    (the previous-token heads need the last 2 positions, the rest write nothing), so a random draw answers every
    prompt iff it holds the retrieval head in full (checked per seed) — probability q = k / 6 = 1/3 per seed — and
    its expected accuracy is q, 2/3 below ``heads``. "Clearly lower": the mean over S seeds is at most the upper edge
    of the Binomial(S, q) band (5% tail) / S, and that edge is itself more than 5 points below ``heads``.
    """
    from kvcompress.eval.needle import make_needle_samples, score_exact_match
    from kvcompress.methods.head.heads import heads_to_keep
    from kvcompress.zoo.testbed import RETRIEVAL_KV_HEADS, answer, binomial_band

    model, tok = scored
    samples = make_needle_samples(tok, [512, 1024], [0.2, 0.5, 0.8], seed=4)
    retrieval = tuple(RETRIEVAL_KV_HEADS[0])

    def run(method: str, **params) -> tuple[float, set[tuple[int, int]]]:
        hits, full_heads = 0, set()
        for s in samples:
            cache = kvcompress.compress(model, method, ratio=0.25, **params)
            hits += score_exact_match(answer(model, tok, s, cache), s.answer)
            full_heads = full_kv_heads(cache, s.num_tokens)  # the same for every prompt (one draw / one ranking)
        return hits / len(samples), full_heads

    full = sum(score_exact_match(answer(model, tok, s), s.answer) for s in samples) / len(samples)
    total = model.config.num_hidden_layers * model.config.num_key_value_heads
    k = heads_to_keep(0.25, total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.25 of 6 heads rounds up (tested below)
        heads_acc, heads_full = run("heads")
        per_seed = [run("heads_random", seed=seed) for seed in range(6)]
    assert full == 1.0 and heads_acc >= full - 0.05 and retrieval in heads_full and len(heads_full) == k
    for acc, drawn in per_seed:
        assert len(drawn) == k and acc == (1.0 if retrieval in drawn else 0.0), (acc, drawn)
    q = k / total
    edge = binomial_band(len(per_seed), q, tail=0.05)[1] / len(per_seed)
    assert edge < heads_acc - 0.05
    assert sum(acc for acc, _ in per_seed) / len(per_seed) <= edge


def test_ratio_with_a_fractional_head_count_rounds_up_and_says_so(cache_root) -> None:
    from kvcompress.methods.head.heads import heads_to_keep

    model = _tiny()
    save_scores(_artifact(model, [(0, 0), (1, 0), (1, 3), (0, 2)]))
    total = model.config.num_hidden_layers * model.config.num_key_value_heads
    ratio = 0.3  # 0.3 x 8 KV heads = 2.4 heads
    k = heads_to_keep(ratio, total)
    assert k == math.ceil(ratio * total) and k / total != ratio
    prompt = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(8))
    for method in ("heads", "heads_random"):
        cache = kvcompress.compress(model, method, ratio=ratio)
        message = (f"ratio={ratio:g} of {total} KV heads rounds up to {k} heads kept in full "
                   f"(kept fraction {k / total:.3f})")
        with pytest.warns(UserWarning, match=re.escape(message)), torch.no_grad():
            model(prompt, **cache_arg(cache))
        assert sum(row.count(60.0) for row in cache.kept_tokens()) == k, method


def test_detector_falls_back_to_attention_mass_when_the_model_cannot_answer(cache_root) -> None:
    """The testbed with its retrieval head's output zeroed still attends to the needle but copies nothing: no probe is
    answered, so the detector ranks by attention mass on the needle, and the planted head comes first."""
    from kvcompress.methods.head.detect import detect
    from kvcompress.zoo.testbed import HEAD_DIM, RETRIEVAL_HEADS, RETRIEVAL_KV_HEADS, load, testbed_path

    model, tok = load(testbed_path())
    layer, head = RETRIEVAL_HEADS[0]
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0.0
    scores = detect(model, tok, lengths=[256], depths=[0.3, 0.7], progress=False)
    assert scores["probes"]["correct"] == 0 and scores["primary"] == "mass"
    assert not any(v for row in scores["retrieval"] for v in row)
    mass = torch.tensor(scores["mass"])
    assert divmod(int(mass.argmax()), mass.shape[1]) == (layer, head)
    assert kv_order(scores)[0] == tuple(RETRIEVAL_KV_HEADS[0])


def _tiny(kv_heads: int = 4, q_heads: int = 8):
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=q_heads,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _artifact(model, best: list[tuple[int, int]]) -> dict:
    cfg = model.config
    kv = [[0.0] * cfg.num_key_value_heads for _ in range(cfg.num_hidden_layers)]
    for rank, (layer, head) in enumerate(best):
        kv[layer][head] = 1.0 - 0.1 * rank
    zeros = [[0.0] * cfg.num_attention_heads for _ in range(cfg.num_hidden_layers)]
    return {
        "format": "kvcompress-head-scores", "version": 2, "config_hash": config_hash(model),
        "weights": weights_fingerprint(model), "model": "tiny",
        "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads, "primary": "retrieval", "retrieval": zeros, "mass": zeros,
        "retrieval_kv": kv, "mass_kv": [[0.0] * cfg.num_key_value_heads for _ in kv],
    }


def test_heads_bytes_are_analytic_and_logits_match_masked_reference(cache_root) -> None:
    model = _tiny()
    save_scores(_artifact(model, [(0, 0), (1, 0)]))
    s, sink, recent, head_dim = 80, 4, 32, 16
    prompt = torch.randint(3, 128, (1, s), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ratio 0.25 of 8 KV heads is exactly 2: no rounding message
        cache = kvcompress.compress(model, "heads", ratio=0.25, sink=sink, recent=recent)
        with torch.no_grad():
            out = model(prompt, **cache_arg(cache))
    # full heads x context + window heads x window, keys and values, fp32, + the ragged layout's index metadata
    analytic = 2 * ((1 * s + 3 * (sink + recent)) * head_dim * 2 * 4 + index_bytes((s, *[sink + recent] * 3)))
    assert cache.kept_bytes() == analytic
    assert cache.kept_tokens() == [[80.0, 36.0, 36.0, 36.0]] * 2
    logits, tokens = [out.logits[0, -1]], []
    with torch.no_grad():
        for _ in range(6):
            tokens.append(int(logits[-1].argmax()))
            logits.append(model(torch.tensor([[tokens[-1]]]), **cache_arg(cache)).logits[0, -1])
    window = list(range(sink)) + list(range(s - recent, s))
    kept = [[list(range(s)), window, window, window]] * 2
    ref = masked_reference_logits(model, prompt[0], tokens, kept)
    for a, b in zip(logits[: len(ref)], ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_heads_random_same_budget_and_seeded(cache_root) -> None:
    model = _tiny()
    prompt = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(6))

    def run(**kw):
        cache = kvcompress.compress(model, "heads_random", ratio=0.25, **kw)
        with torch.no_grad():
            model(prompt, **cache_arg(cache))
        return cache.kept_tokens(), cache.kept_bytes()

    a, b, c = run(seed=0), run(seed=0), run(seed=11)
    assert a == b
    assert sum(row.count(60.0) for row in a[0]) == 2 and sum(row.count(60.0) for row in c[0]) == 2
    assert a[1] == c[1]


def test_adaptive_heads_distributes_layer_budget_with_floor(cache_root) -> None:
    from kvcompress.methods.token.budgets import allocate

    assert allocate(40, [20, 20, 20, 20], [1.0, 0.0, 0.0, 0.0], 2) == [20, 7, 7, 6]
    assert sum(allocate(33, [50] * 3, [0.5, 0.3, 0.2], 1)) == 33
    model = _tiny()
    save_scores(_artifact(model, [(0, 1), (1, 2), (0, 0)]))
    prompt = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(7))
    cache = kvcompress.compress(model, "adaptive_heads", ratio=0.2)
    with torch.no_grad():
        model(prompt, **cache_arg(cache))
    kept = cache.kept_tokens()
    assert sum(kept[0]) == sum(kept[1]) == 4 * 20  # the layer total is the uniform budget
    assert kept[0][1] == max(kept[0]) and min(kept[0]) >= 4  # best head gets most, floor 0.2 * 20
    assert kept[1][2] == max(kept[1])
    # bytes are real: the ragged layout holds exactly the kept tokens (+ its index metadata)
    per_layer_index = [index_bytes([int(c) for c in row]) if len(set(row)) > 1 else 0 for row in kept]
    assert cache.kept_bytes() == sum(kept[0] + kept[1]) * 16 * 2 * 4 + sum(per_layer_index)


def test_no_artifact_falls_back_to_prompt_scoring_with_a_warning(cache_root) -> None:
    model = _tiny(kv_heads=2, q_heads=4)
    assert find_scores(model) is None
    cache = kvcompress.compress(model, "heads", ratio=0.5)
    with pytest.warns(UserWarning, match="scoring heads per prompt"):
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 70)), **cache_arg(cache))
    assert sorted(cache.kept_tokens()[0]) == [36.0, 70.0]
    assert ensure_scores(model, None, verbose=False) is None


def test_bad_inputs_are_one_line_errors(cache_root, tmp_path) -> None:
    model = _tiny()
    for bad in (0, 1.5, -0.1):
        with pytest.raises(KVCompressError, match="ratio"):
            kvcompress.compress(model, "heads", ratio=bad)
        with pytest.raises(KVCompressError, match="ratio"):
            kvcompress.compress(model, "heads_random", ratio=bad)
    other = _artifact(_tiny(kv_heads=2, q_heads=4), [(0, 0)])
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    cache = kvcompress.compress(model, "heads", ratio=0.25, scores=str(path))
    with pytest.raises(KVCompressError, match="another model") as err:
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 50)), **cache_arg(cache))
    assert "\n" not in str(err.value)
    with pytest.raises(KVCompressError, match="does not exist"):
        cache = kvcompress.compress(model, "heads", ratio=0.25, scores=str(tmp_path / "missing.json"))
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 50)), **cache_arg(cache))
    with pytest.raises(KVCompressError, match="floor"):
        kvcompress.compress(model, "adaptive_heads", ratio=0.5, floor=2.0)
    assert heads_cli.main(["frobnicate"]) == 2
