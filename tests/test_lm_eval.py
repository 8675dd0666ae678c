"""lm-eval integration: the registered ``kvcompress`` model through the CLI entry point and ``simple_evaluate``, with
the made-up local tasks in tests/data/lm_eval_tasks (one generate_until, one multiple_choice) on the testbed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from kvcompress.compat import cache_arg

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "data" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory):
    import os

    os.environ.setdefault("KVCOMPRESS_CACHE", str(tmp_path_factory.mktemp("kvc_cache")))
    from kvcompress.zoo import testbed_path

    return str(testbed_path())


@pytest.fixture(scope="module")
def kvlm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import kvcompress.lm_eval as kvlm
    return kvlm


@pytest.fixture(scope="module")
def full_lm(kvlm, testbed_dir):
    return kvlm.KVCompressLM(pretrained=testbed_dir, method="full", device="cpu", batch_size=1)


def _requests(lm):
    ctx = "The grass is green. The special magic number for apple is 4827193. The sky is blue. The sun is yellow. " * 3
    ctx += "What is the special magic number for apple? The special magic number for apple is"
    reqs = []
    for cont in (" 4827193", " 3651204", " green", " 4827193 and more words here"):
        reqs.append(((ctx, cont), lm.tok_encode(ctx), lm.tok_encode(cont, add_special_tokens=False)))
    return reqs


def test_registered_and_validates_before_loading(kvlm, testbed_dir):
    from lm_eval.api.registry import get_model

    from kvcompress.errors import KVCompressError

    assert get_model("kvcompress") is kvlm.KVCompressLM
    kvlm.register()  # idempotent
    with pytest.raises(KVCompressError, match="unknown method 'nope'"):
        kvlm.KVCompressLM(pretrained="/does/not/exist", method="nope")
    with pytest.raises(KVCompressError, match="ratio"):
        kvlm.KVCompressLM(pretrained="/does/not/exist", method="streaming", ratio=3)
    with pytest.raises(KVCompressError, match="streaming"):
        kvlm.KVCompressLM.create_from_arg_string("pretrained=/does/not/exist,method=streaming,streaming.nonsense=1")


def test_loglikelihood_full_equals_plain_forward(full_lm):
    """With nothing compressed, the context/continuation split gives lm-eval's plain one-forward log-likelihoods."""
    from lm_eval.models.huggingface import HFLM

    reqs = _requests(full_lm)
    ours = full_lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    plain = HFLM._loglikelihood_tokens(full_lm, reqs, disable_tqdm=True)  # parent path: one plain forward
    for (a, ga), (b, gb) in zip(ours, plain):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert ours[0][0] > ours[1][0]  # the needle's value is the likelier continuation


def test_loglikelihood_goes_through_compressed_cache(kvlm, testbed_dir, full_lm):
    lm = kvlm.KVCompressLM.create_from_arg_string(
        f"pretrained={testbed_dir},method=streaming,ratio=0.25,streaming.sink=2", {"device": "cpu", "batch_size": 1}
    )
    assert lm.kvc_params == {"streaming": {"sink": 2}}
    reqs = _requests(lm)
    ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    full = full_lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    report = lm.last_cache.memory_report()
    assert report["kept_bytes"] < 0.5 * report["dense_bytes"]  # the context was compressed
    assert report["context_tokens"] == len(reqs[3][1]) + len(reqs[3][2]) - 1  # context + continuation[:-1]  # context + continuation went through this cache
    # one-token continuations are scored by the prefill forward (whole context), as the first generated token is
    assert len(reqs[2][2]) == 1 and ours[2][0] == pytest.approx(full[2][0], abs=1e-4)
    # later continuation tokens attend to the compressed context: the needle's second token is no longer found
    assert ours[0][0] < full[0][0] - 1.0
    # lm-eval's results config gets the memory over every request (one cache each)
    info = lm.get_model_info()
    assert info["kvcompress_method"] == "streaming" and info["kvcompress_caches"] == len(reqs)
    assert 0 < info["kvcompress_kept_bytes"] < 0.5 * info["kvcompress_dense_bytes"]
    assert info["kvcompress_kept_fraction"] == pytest.approx(info["kvcompress_kept_bytes"] / info["kvcompress_dense_bytes"])
    assert 0.2 < info["kvcompress_kept_fraction_prefill"] < 0.35


def test_cli_entry_point(kvlm, testbed_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the task YAMLs name their JSONL files relative to the repository root
    monkeypatch.setattr("sys.argv", ["kvcompress.lm_eval"])
    kvlm.main([
        "--model", "kvcompress", "--model_args", f"pretrained={testbed_dir},method=streaming,ratio=0.5",
        "--tasks", "kvc_tiny_gen,kvc_tiny_mc", "--include_path", str(TASKS), "--device", "cpu",
        "--batch_size", "1", "--output_path", str(tmp_path / "out"),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "kvc_tiny_gen" in out and "kvc_tiny_mc" in out and "method': 'streaming'" in out
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert set(results["results"]) == {"kvc_tiny_gen", "kvc_tiny_mc"}
    # streaming at 0.5 keeps only the needle near the end (1 of 3 generations); multiple choice keeps all 3 since
    # the first value token is scored by the prefill over the whole prompt
    assert results["results"]["kvc_tiny_gen"]["exact_match,first_word"] == pytest.approx(1 / 3)
    assert results["results"]["kvc_tiny_mc"]["acc,none"] == 1.0


def test_simple_evaluate_with_instance(full_lm, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)
    res = lm_eval.simple_evaluate(
        model=full_lm, tasks=["kvc_tiny_gen"], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), limit=2
    )
    assert res["results"]["kvc_tiny_gen"]["exact_match,first_word"] == 1.0  # full cache: the testbed copies needles
    assert full_lm.last_cache is not None and full_lm.last_cache.memory_report()["kept_fraction"] == 1.0
    assert res["config"]["kvcompress_method"] == "full" and res["config"]["kvcompress_kept_fraction"] == 1.0


def test_continuation_logits_equal_teacher_forced_decoding(kvlm, testbed_dir):
    """The continuation forward (q_len > 1, causal among its tokens) equals feeding it one token at a time."""
    import torch

    import kvcompress

    lm = kvlm.KVCompressLM(pretrained=testbed_dir, method="snapkv", ratio=0.3, device="cpu", batch_size=1)
    g = torch.Generator().manual_seed(0)
    inps = torch.randint(10, 5000, (1, 119), generator=g)  # context of 100 tokens + 20 continuation tokens, minus 1
    lm._kvc_cont_len = 20
    try:
        logits = lm._model_call(inps)
    finally:
        lm._kvc_cont_len = None
    assert logits.shape == (1, 20, lm.model.config.vocab_size)
    cache = kvcompress.compress(lm.model, "snapkv", ratio=0.3)
    with torch.no_grad():
        steps = [lm.model(inps[:, :100], **cache_arg(cache)).logits[:, -1:]]
        with cache.paused():
            steps += [lm.model(inps[:, i : i + 1], **cache_arg(cache)).logits for i in range(100, 119)]
    assert torch.allclose(logits, torch.cat(steps, 1), atol=1e-3)
    assert lm.last_cache.memory_report()["kept_fraction"] < 0.5
