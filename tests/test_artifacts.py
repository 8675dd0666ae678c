"""Per-model artifacts keyed by what they depend on (issue 17): the weights fingerprint, head scores and low-rank bases
keyed by config hash + weights, validated on load, recomputed (saying why) when stale or invalid, kept in memory when
the cache directory is not writable."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from tiny_models import prompts, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvcompress
import kvcompress.methods.hidden.calibration as lr
from kvcompress import zoo
from kvcompress.artifacts import ArtifactError, config_hash, model_of, weights_fingerprint
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.methods.head.scores import (
    artifact_path,
    ensure_scores,
    find_scores,
    full_kv_heads,
    kv_order,
    load_scores,
    save_scores,
)

PROBES = {"lengths": [256], "depths": [0.5]}  # one needle probe: enough for the testbed's planted retrieval head


@pytest.fixture(scope="module")
def testbed(cache_root):
    path = zoo.testbed_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def clean_scores(testbed) -> dict:
    """A valid artifact of the testbed (what ``detect`` writes)."""
    from kvcompress.methods.head.detect import detect

    return detect(*testbed, progress=False, **PROBES)


def _permute_kv_heads(model, layer: int, order: list[int]):
    """Reorder one layer's KV heads with their query heads (rows of q/k/v, columns of o_proj): the same function,
    with the retrieval head at another index."""
    attn = model.model.layers[layer].self_attn
    cfg = model.config
    d, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    rows = lambda heads: torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    q_order = [kv * group + i for kv in order for i in range(group)]
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[rows(q_order)])
        attn.k_proj.weight.copy_(attn.k_proj.weight[rows(order)])
        attn.v_proj.weight.copy_(attn.v_proj.weight[rows(order)])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, rows(q_order)])
    return model


def _needle(model, tok, cache) -> tuple[float, int]:
    """Exact match of one needle prompt (512 tokens, depth 0.4) through ``cache``, and the prompt's token count."""
    from kvcompress.eval.needle import make_needle_samples, score_exact_match
    from kvcompress.zoo.testbed import answer

    sample = make_needle_samples(tok, [512], [0.4])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ratio 0.02 rounds up to one head
        return score_exact_match(answer(model, tok, sample, cache), sample.answer), sample.num_tokens


# -- the weights fingerprint -----------------------------------------------------------------------------------

def test_fingerprint_ignores_the_load_dtype_and_sees_in_place_edits(testbed) -> None:
    model, _ = testbed
    fp = weights_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    bf16 = AutoModelForCausalLM.from_pretrained(str(zoo.testbed_path()), dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert weights_fingerprint(bf16) == fp  # one checkpoint, one key, in float32 or bfloat16
    assert weights_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp  # converted in place: new tensors
    edited = copy.deepcopy(model)
    assert weights_fingerprint(edited) == fp
    weight = edited.model.embed_tokens.weight
    with torch.no_grad():
        weight.mul_(1.5)  # in place: the cached fingerprint must not be reused
    assert weights_fingerprint(edited) != fp
    with torch.no_grad():
        weight.div_(1.5)
    assert weights_fingerprint(edited) == fp


def test_permuting_the_retrieval_layers_heads_changes_the_fingerprint(testbed) -> None:
    model, _ = testbed
    permuted = _permute_kv_heads(copy.deepcopy(model), 1, [1, 0])
    assert config_hash(permuted) == config_hash(model)
    assert weights_fingerprint(permuted) != weights_fingerprint(model)
    assert artifact_path(permuted) != artifact_path(model)


def test_model_of_finds_the_model_compress_was_given() -> None:
    original = tiny_model("llama")
    kvcompress.compress(original, "full")
    assert model_of(original.model.layers[1].self_attn) is original
    model = copy.deepcopy(original)
    attention = model.model.layers[1].self_attn
    assert model_of(attention) is None  # a copy of an attached model is not its original
    kvcompress.compress(model, "full")
    assert model_of(attention) is model


# -- head scores ------------------------------------------------------------------------------------------------

def test_a_permuted_model_does_not_reuse_the_originals_head_scores(testbed, capsys) -> None:
    """The testbed with layer 1's KV heads swapped computes the same function with the retrieval head at KV head
    (1, 1): it gets its own artifact (re-detected by ``compress``'s prepare step), so ``heads`` keeps the right head
    and still answers; the original's scores would have kept (1, 0) and lost the needle."""
    model, tok = testbed
    ensure_scores(model, tok, verbose=False, **PROBES)
    assert kv_order(find_scores(model))[0] == (1, 0)
    permuted = _permute_kv_heads(copy.deepcopy(model), 1, [1, 0])
    assert find_scores(permuted) is None
    capsys.readouterr()
    cache = kvcompress.compress(permuted, "heads", ratio=0.02, tokenizer=tok)
    assert "no head scores for this model yet" in capsys.readouterr().out
    assert kv_order(find_scores(permuted))[0] == (1, 1)
    accuracy, prompt_tokens = _needle(permuted, tok, cache)
    assert accuracy == 1.0 and full_kv_heads(cache, prompt_tokens) == {(1, 1)}
    stale = kvcompress.compress(permuted, "heads", ratio=0.02, scores=str(artifact_path(model)))
    with pytest.raises(KVCompressError, match="weights fingerprint"):
        _prefill(permuted, stale)


def _prefill(model, cache) -> None:
    with torch.no_grad():
        model(torch.arange(3, 43).view(1, -1), **cache_arg(cache))


def _set(grid: str, i: int, j: int, value: float):
    def tamper(data: dict) -> None:
        data[grid][i][j] = value
    return tamper


TAMPERED = {
    "nan": (_set("retrieval", 1, 0, float("nan")), "retrieval[1][0] = nan"),
    "truncated": (lambda d: d["mass_kv"].pop(), "mass_kv is not a 3 x 2 grid (row lengths [2, 2])"),
    "above one": (_set("retrieval_kv", 0, 1, 1.5), "retrieval_kv[0][1] = 1.5"),
    "weights": (lambda d: d.update(weights="0" * 16), "weights fingerprint 0000000000000000 != "),
    "num_layers": (lambda d: d.update(num_layers=5), "num_layers=5, this model has 3"),
    "version 1": (lambda d: d.update(version=1), "format version 1"),
    "primary": (lambda d: d.update(primary="copy"), "primary='copy'"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_cached_artifact_is_re_detected_with_a_message(testbed, clean_scores, case: str, capsys) -> None:
    model, tok = testbed
    tamper, reason = TAMPERED[case]
    data = copy.deepcopy(clean_scores)
    tamper(data)
    path = save_scores(data, artifact_path(model))
    with pytest.raises(ArtifactError, match=re.escape(f"cannot be used: {reason}")):
        find_scores(model)  # never used as it is
    capsys.readouterr()
    assert ensure_scores(model, tok, verbose=False, **PROBES) == path
    out = capsys.readouterr().out
    assert out.startswith(f"heads: cached head scores at {path} are not usable for this model ({reason}")
    assert out.rstrip().endswith("re-detecting") and out.count("\n") == 1
    fresh = load_scores(path, model)  # the artifact on disk is valid again
    assert {k: v for k, v in fresh.items() if k != "probes"} == {k: v for k, v in clean_scores.items() if k != "probes"}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_artifact_given_by_path_is_a_one_line_error(testbed, clean_scores, case: str, tmp_path) -> None:
    model, _ = testbed
    tamper, reason = TAMPERED[case]
    data = copy.deepcopy(clean_scores)
    tamper(data)
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(data))
    cache = kvcompress.compress(model, "heads", ratio=0.25, scores=str(path))
    with pytest.raises(KVCompressError) as err:
        _prefill(model, cache)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and reason in message and "; valid: " in message
    assert path.read_text() == json.dumps(data)  # not recomputed


def test_an_invalid_cached_artifact_without_a_tokenizer_is_not_used(cache_root) -> None:
    """No tokenizer, so nothing can be re-detected: the method scores heads per prompt and the warning says why."""
    model = copy.deepcopy(tiny_model("llama"))
    cfg = model.config
    grid = lambda heads: [[0.5] * heads for _ in range(cfg.num_hidden_layers)]
    data = {"format": "kvcompress-head-scores", "version": 2, "config_hash": config_hash(model),
            "weights": weights_fingerprint(model), "num_layers": cfg.num_hidden_layers,
            "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads, "primary": "mass",
            "retrieval": grid(cfg.num_attention_heads), "mass": grid(cfg.num_attention_heads),
            "retrieval_kv": grid(cfg.num_key_value_heads), "mass_kv": grid(cfg.num_key_value_heads)}
    data["mass_kv"][1][0] = float("nan")
    save_scores(data)
    cache = kvcompress.compress(model, "heads", ratio=0.5)
    warning = r"cannot be used: mass_kv\[1\]\[0\] = nan.*scoring heads per prompt"
    with pytest.warns(UserWarning, match=warning), torch.no_grad():
        model(prompts((50,))[0].view(1, -1), **cache_arg(cache))


def test_a_cache_without_compress_scores_heads_per_prompt_and_says_why() -> None:
    from kvcompress.cache import KVCompressCache
    from kvcompress.registry import make_compressor

    model = copy.deepcopy(tiny_model("llama"))
    kvcompress.compress(model, "full")  # attach the copy ...
    other = copy.deepcopy(model)  # ... and use a copy (kvcompress attention, hooks) the model lookup has never seen
    cache = KVCompressCache(other.config, [make_compressor("heads", ratio=0.5)])
    with pytest.warns(UserWarning, match="model of this cache is unknown.*scoring heads per prompt"), torch.no_grad():
        other(prompts((50,))[0].view(1, -1), **cache_arg(cache))


# -- low-rank bases ---------------------------------------------------------------------------------------------

def _bad_bases(good: lr.Bases, case: str) -> lr.Bases:
    keys, key_energy, fingerprints = good.keys.clone(), good.key_energy.clone(), list(good.fingerprints)
    if case == "nan":
        keys[1, 0, 3, 2] = float("nan")
    elif case == "random":
        keys = torch.randn(keys.shape, generator=torch.Generator().manual_seed(0))
    elif case == "energy":
        key_energy = key_energy.flip(-1)
    elif case == "fingerprint":
        fingerprints[1] += 1.0
    elif case == "shape":
        keys = keys[:, :, :8]
    return lr.Bases(keys, good.values, key_energy, good.value_energy, fingerprints, good.source, good.tokens)


@pytest.mark.parametrize("case,reason", [
    ("nan", "keys has non-finite values"),
    ("random", "keys bases are not orthonormal"),
    ("energy", "key_energy is negative or increasing"),
    ("fingerprint", "layer 1's k_proj/v_proj fingerprint differs"),
    ("shape", "keys has shape (2, 2, 8, 16), this model needs (2, 2, 16, 16)"),
])
def test_invalid_lowrank_bases_are_recalibrated_with_a_message(tmp_path, monkeypatch, capsys, case: str,
                                                               reason: str) -> None:
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    model = copy.deepcopy(tiny_model("llama"))
    good = lr.calibrate(model, tokens=64)
    path = lr.artifact_path(model, None, False)
    assert good.path == path and path.name.startswith(f"{config_hash(model)}-{weights_fingerprint(model)}-")
    _bad_bases(good, case).save(path)  # the per-layer fingerprints match (except in "fingerprint")
    lr._LOADED.pop(str(path))  # as in a new process
    capsys.readouterr()
    bases = lr.ensure_calibrated(model, tokens=64)
    out = capsys.readouterr().out
    assert out.startswith(f"lowrank: cached bases at {path} are not usable for this model ({reason}")
    assert out.endswith("); recalibrating\n") and out.count("\n") == 1
    assert torch.equal(bases.keys, good.keys) and torch.equal(bases.key_energy, good.key_energy)
    lr._LOADED.pop(str(path))
    assert lr.Bases.load(path).problem(model) is None  # rewritten


# -- a read-only cache ------------------------------------------------------------------------------------------

@pytest.fixture(params=["read-only", "not a directory"])
def unwritable_cache(request, tmp_path, monkeypatch):
    """``$KVCOMPRESS_CACHE`` where nothing can be written: a directory with mode 0o555 (skipped as root, which may
    write anyway), or a path below a regular file (unwritable for root too)."""
    if request.param == "read-only":
        root = tmp_path / "cache"
        root.mkdir()
        root.chmod(0o555)
        if os.access(root, os.W_OK):
            root.chmod(0o755)
            pytest.skip("the process can write to a 0o555 directory (root)")
    else:
        (tmp_path / "file").write_text("")
        root = tmp_path / "file" / "cache"
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(root))
    yield root
    if request.param == "read-only":
        root.chmod(0o755)


def test_head_scores_stay_in_memory_when_the_cache_is_not_writable(testbed, unwritable_cache) -> None:
    model, tok = testbed
    with pytest.warns(UserWarning, match="heads: cannot write head scores to .*; keeping them in memory"):
        path = ensure_scores(model, tok, verbose=False, **PROBES)
    assert not path.exists() and kv_order(find_scores(model))[0] == (1, 0)
    cache = kvcompress.compress(model, "heads", ratio=0.02, tokenizer=tok)  # no second detection, no warning
    accuracy, prompt_tokens = _needle(model, tok, cache)
    assert accuracy == 1.0 and full_kv_heads(cache, prompt_tokens) == {(1, 0)}


def test_lowrank_bases_stay_in_memory_when_the_cache_is_not_writable(unwritable_cache) -> None:
    model = copy.deepcopy(tiny_model("llama"))
    ids = prompts((80,))[0].view(1, -1)
    with torch.no_grad():
        reference = model(ids, **cache_arg(DynamicCache())).logits
    with pytest.warns(UserWarning, match="lowrank: cannot write the calibrated bases to .*; keeping them in memory"):
        cache = kvcompress.compress(model, "lowrank", ratio=1.0, residual=0)
    assert not lr.artifact_path(model, None, False).exists()
    with torch.no_grad():
        logits = model(ids, **cache_arg(cache)).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
