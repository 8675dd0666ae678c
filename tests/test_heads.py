"""Head axis: retrieval-head detection (artifact, CLI), `heads` / `heads_random` / `adaptive_heads`."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from reference import masked_reference_logits
from transformers import AutoModelForCausalLM, LlamaConfig

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.heads import __main__ as heads_cli
from kvcompress.heads import artifact_path, config_hash, ensure_scores, find_scores, kv_order, save_scores


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvc_cache")
    old = os.environ.get("KVCOMPRESS_CACHE")
    os.environ["KVCOMPRESS_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("KVCOMPRESS_CACHE", None)
    else:
        os.environ["KVCOMPRESS_CACHE"] = old


@pytest.fixture(scope="module")
def testbed(cache_root):
    from kvcompress.zoo.testbed import load, testbed_path

    return load(testbed_path())


def test_detect_ranks_planted_retrieval_head_first_and_show(cache_root, testbed, tmp_path, capsys) -> None:
    """The constructed testbed's copy head (layer 1, query head 0, KV head 0) is planted by construction."""
    model, tok = testbed
    assert heads_cli.main(["detect", "model=testbed", "lengths=256", "depths=0.3,0.7"]) == 0
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


def test_heads_keeps_needle_and_random_control_uses_same_budget(cache_root, testbed) -> None:
    from kvcompress.eval.needle import make_needle_samples, score_exact_match
    from kvcompress.zoo.testbed import answer

    model, tok = testbed
    if find_scores(model) is None:
        ensure_scores(model, tok, verbose=False, lengths=[256], depths=[0.5])
    sample = make_needle_samples(tok, [512], [0.4])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c_heads = kvcompress.compress(model, "heads", ratio=0.02)
        assert score_exact_match(answer(model, tok, sample, c_heads), sample.answer) == 1.0
        c_rand = kvcompress.compress(model, "heads_random", ratio=0.02, seed=0)
        answer(model, tok, sample, c_rand)
    assert c_heads.kept_tokens()[1][0] >= sample.num_tokens  # the retrieval KV head is held in full
    assert c_heads.kept_bytes() == c_rand.kept_bytes()  # same number of full heads, one each


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
        "format": "kvcompress-head-scores", "version": 1, "config_hash": config_hash(model), "model": "tiny",
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
    # full heads x context + window heads x window, keys and values, fp32, + the ragged segments' (row, head) index
    analytic = 2 * ((1 * s + 3 * (sink + recent)) * head_dim * 2 * 4 + 4 * 2 * 8)
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
    from kvcompress.methods.adaptive_heads import allocate

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
    # bytes are real: ragged segments hold exactly the kept tokens
    per_layer_index = [4 * 2 * 8 if len(set(row)) > 1 else 0 for row in kept]
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
