"""Reversible attachment: ``kvcompress.attach`` returns a handle whose ``detach()`` restores the model's attention
implementation and removes every hook; ``with kvcompress.attached(model):`` does it on exit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import kvcompress
from kvcompress import api
from kvcompress.compat import cache_arg


def _fresh() -> torch.nn.Module:
    """A model of its own (``tiny_model`` is cached and shared by the suite: never detach or re-type that one)."""
    return tiny_model.__wrapped__("llama")


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attached_restores_the_implementation_and_removes_every_hook(implementation: str) -> None:
    model = _fresh()
    model.set_attn_implementation(implementation)
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    before, hooks = model(ids).logits, _hooks(model)
    with kvcompress.attached(model) as handle:
        assert model.config._attn_implementation == api.ATTENTION_NAME and _hooks(model) > hooks
        cache = kvcompress.compress(model, "snapkv", ratio=0.5)  # compress inside reuses the same attachment
        assert model.__dict__["_kvc_attachment"] is handle
        model(ids, **cache_arg(cache))
        assert cache.kept_bytes() < cache.dense_bytes()
    assert model.config._attn_implementation == implementation and _hooks(model) == hooks
    assert not any("_kvc_hooked" in m.__dict__ or "_kvc_hidden_states" in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_a_detached_model_never_reaches_kvcompress_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fresh()
    calls = []
    real = api.kvcompress_attention
    monkeypatch.setitem(api.AttentionInterface._global_mapping, api.ATTENTION_NAME,
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    handle = kvcompress.attach(model)
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert calls
    calls.clear()
    handle.detach()
    handle.detach()  # idempotent
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert not calls


def test_attached_leaves_an_already_attached_model_attached() -> None:
    model = _fresh()
    outer = kvcompress.attach(model)
    with kvcompress.attached(model) as inner:
        assert inner is outer
    assert model.config._attn_implementation == api.ATTENTION_NAME and outer.attached
    outer.detach()
    assert model.config._attn_implementation == "sdpa"
    again = kvcompress.attach(model)  # attaching after a detach works as the first time
    assert again is not outer and again.attached and model.config._attn_implementation == api.ATTENTION_NAME
