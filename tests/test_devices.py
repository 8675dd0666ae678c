"""Device correctness without a GPU: every method runs with the model and inputs on a second device.

The second device is :func:`kvcompress.device_probe.virtual_device` — a stand-in for CUDA whose data lives on the CPU:
an op that mixes it with a CPU tensor raises, exactly where CUDA would. Every registered method (and the decode-phase
and ragged variants) runs a left-padded batch through prefill and decode on it and must generate exactly what it
generates on the CPU. A static check backs it up: no tensor factory in the cache, the methods, scoring, the codecs or
the evaluations is called without ``device=`` (code paths a small run does not reach are covered too).
"""

from __future__ import annotations

import ast
import copy
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.device_probe import VIRTUAL, CrossDeviceError, count_ops, to_cpu, virtual_device
from kvcompress.registry import get_method

ROOT = Path(__file__).resolve().parents[1]
METHODS = kvcompress.available_methods()
#: decode-phase evictions, ragged (AdaKV) layers and decode-time flushes of a codec, beyond each method's defaults
VARIANTS = [(m, {}) for m in METHODS] + [
    ("streaming", {"phase": "decode"}),
    ("h2o", {"phase": "decode"}),
    ("tova", {"phase": "decode"}),
    ("snapkv", {"phase": "decode", "interval": 2, "window": 8}),
    ("snapkv", {"allocation": "adakv"}),
    ("quant", {"residual": 0, "group": 4}),
    ("think", {"residual": 0}),
]


def _ratio(method: str) -> float | None:
    return 0.3 if "ratio" in get_method(method).__dataclass_fields__ else None


def _generate(model, ids, mask, method, params):
    cache = kvcompress.compress(model, method, ratio=_ratio(method), **params)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **cache_arg(cache))
    return out, cache


def test_probe_refuses_mixing_and_counts_syncs() -> None:
    with virtual_device() as dev:
        x = torch.ones(3, 4, device=VIRTUAL)
        assert x.device == VIRTUAL and (x * torch.tensor(2.0)).device == VIRTUAL  # a CPU scalar is allowed
        assert x[torch.tensor([0, 2])].shape == (2, 4)  # CPU indices into a device tensor are allowed (CUDA moves them)
        with pytest.raises(CrossDeviceError):
            x + torch.ones(4)
        with pytest.raises(CrossDeviceError):
            torch.ones(3)[torch.tensor([1], device=VIRTUAL)]
        assert dev.syncs == []
        bool(x.sum() > 0), x.tolist(), x.nonzero(), x[x > 0], x.cpu()
        assert [what for what, _ in dev.syncs] == ["_local_scalar_dense", "tolist", "nonzero", "boolean-mask indexing",
                                                "copy to host"]


def test_dynamic_cache_runs_on_the_probe() -> None:
    from transformers import DynamicCache

    model = copy.deepcopy(tiny_model("llama"))
    ids, mask = left_pad(prompts())
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with virtual_device():
        model.to(VIRTUAL)
        with torch.no_grad():
            out = model.generate(ids.to(VIRTUAL), attention_mask=mask.to(VIRTUAL), max_new_tokens=5, do_sample=False,
                                 **cache_arg(DynamicCache()))
    assert torch.equal(to_cpu(out), reference)


@pytest.mark.parametrize("method,params", VARIANTS, ids=[m + "".join(f"-{k}={v}" for k, v in p.items())
                                                         for m, p in VARIANTS])
def test_method_on_a_second_device(method: str, params: dict) -> None:
    """Prefill + decode of a left-padded batch on the virtual device: no cross-device op anywhere, the same tokens as
    on the CPU, and every accounting call works."""
    model = copy.deepcopy(tiny_model("llama"))
    ids, mask = left_pad(prompts())
    if method == "lowrank":
        from kvcompress.methods.hidden.calibration import calibrate

        calibrate(model, save=False)  # CPU bases: the method must bring them to the keys' device
    reference, ref_cache = _generate(model, ids, mask, method, params)
    with virtual_device():
        model.to(VIRTUAL)
        out, cache = _generate(model, ids.to(VIRTUAL), mask.to(VIRTUAL), method, params)
        report = cache.memory_report()
        kept = cache.kept_tokens()
    assert torch.equal(to_cpu(out), reference)
    assert kept == ref_cache.kept_tokens()
    assert report["kept_bytes"] == ref_cache.memory_report()["kept_bytes"]
    if get_method(method).axis is not None:
        assert report["kept_bytes"] < report["dense_bytes"]


# ---------------------------------------------------------------------------------------------------------------
# Static check: tensor factories name their device

FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "asarray", "rand", "randn",
             "randint", "randperm", "eye", "linspace", "logspace", "scalar_tensor", "tril_indices", "triu_indices",
             "empty_strided"}
#: the cache, the methods, scoring, the codecs, the accounting and the evaluations
CHECKED = ["kvcompress/cache.py", "kvcompress/compressor.py", "kvcompress/selection.py", "kvcompress/ragged.py",
           "kvcompress/attention.py", "kvcompress/api.py", "methods", "eval"]


def _factory_calls_without_device(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.{node.func.attr}(...)")
    return found


def test_every_tensor_factory_names_its_device() -> None:
    files = [p for entry in CHECKED
             for p in ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir() else [ROOT / entry])]
    offenders = [hit for path in files for hit in _factory_calls_without_device(path)]
    assert not offenders, "tensor factories without device= (use the data's device, or device='cpu' for host-only "\
        "metadata):\n" + "\n".join(offenders)


def test_static_check_sees_a_missing_device(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nx = torch.arange(3)\ny = torch.zeros(2, device='cpu')\n")
    assert [h.split(" ", 1)[1] for h in _factory_calls_without_device_any(bad)] == ["torch.arange(...)"]


def _factory_calls_without_device_any(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return _factory_calls_without_device(path)
    finally:
        ROOT = saved


def test_op_counter_counts() -> None:
    with count_ops() as ops:
        torch.ones(3) + 1
    assert sum(ops.values()) == 2


def test_cross_device_error_names_the_op() -> None:
    with virtual_device(), pytest.raises(CrossDeviceError, match="aten.add.Tensor"):
        torch.ones(2, device=VIRTUAL) + torch.ones(2)


def _place(module: torch.nn.Module, device: torch.device) -> None:
    """Put ``module`` on ``device`` and move its inputs there (what accelerate's hooks do for a ``device_map``)."""
    from torch.utils._pytree import tree_map

    module.to(device)
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    module.register_forward_pre_hook(lambda m, args, kwargs: (tree_map(move, args), tree_map(move, kwargs)),
                                     with_kwargs=True)


@pytest.mark.parametrize("method,params", [("full", {}), ("snapkv", {}), ("adaptive_heads", {}), ("quant", {}),
                                           ("h2o", {"phase": "decode"}), ("layers", {}), ("heads", {}),
                                           ("share", {"start": 0})])
def test_model_split_across_devices_keeps_each_layer_cache_on_its_device(method: str, params: dict) -> None:
    """Layer 0 on the CPU, layer 1 (and the head) on the second device: each layer's cache lives on its layer's
    device; cross-layer methods (``layers``, ``heads``) decide across them; ``share`` does not merge a pair split
    across devices (one shared direction cannot serve both)."""
    model = copy.deepcopy(tiny_model("llama"))
    ids, mask = left_pad(prompts())
    reference, _ = _generate(model, ids, mask, method, params)
    with virtual_device():
        for module in (model.model.layers[1], model.model.norm, model.lm_head):
            _place(module, VIRTUAL)
        out, cache = _generate(model, ids, mask, method, params)
        report = cache.memory_report()
    assert [layer.keys.device.type for layer in cache.layers] == ["cpu", VIRTUAL.type]
    assert report["kept_bytes"] > 0
    if method == "share":
        assert "merged_pairs" not in cache.shared["share"]
    else:
        assert torch.equal(to_cpu(out), reference)


@pytest.mark.parametrize("evaluation,overrides", [("needle", {"lengths": [256], "depths": [0.5]}),
                                                  ("fidelity", {"samples": 1, "context": 96, "new_tokens": 4})])
def test_evaluations_run_on_a_second_device(evaluation: str, overrides: dict) -> None:
    """The evaluation loops put their inputs on the model's device: the same scores as on the CPU."""
    import importlib

    from omegaconf import OmegaConf

    from kvcompress.models import load_model

    loaded = load_model(OmegaConf.load(ROOT / "configs/model/testbed.yaml"), None, "cpu")
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / f"configs/eval/{evaluation}.yaml"), overrides)
    module = importlib.import_module(f"kvcompress.eval.{evaluation}")

    def score(model):
        out = module.run(model, lambda: kvcompress.compress(model, "snapkv", ratio=0.3), cfg, seed=0,
                         tokenizer=loaded.tokenizer)
        out.pop("_cache", None)
        return out

    reference = score(loaded.model)
    with virtual_device():
        result = score(copy.deepcopy(loaded.model).to(VIRTUAL))
    assert result == reference
