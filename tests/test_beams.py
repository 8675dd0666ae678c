"""Beam search on every layout: re-indexing rows (``reorder_cache`` / ``batch_select_indices``) of dense, ragged and
encoded layers gives what selecting the rows of the uncompressed view gives, and ``generate(num_beams=2)`` runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress import views
from kvcompress.compat import cache_arg

CASES = [("snapkv", dict(ratio=0.5, allocation="adakv")), ("heads", dict(ratio=0.5)), ("quant", dict(residual=0)),
         ("heads+quant", dict(ratio=0.5, params={"quant": {"residual": 0}}))]


def _layout(layer) -> str:
    return "encoded" if layer.segments else ("ragged" if layer.ragged is not None else "dense")


def _rows(layer) -> list[list[torch.Tensor]]:
    """Per (row, head): the valid keys in position order, decoded (what attention sees)."""
    view = views.rectangle(layer, include_encoded=True)
    return [[view.keys[r, h][view.valid[r, h]] for h in range(view.keys.shape[1])] for r in range(view.keys.shape[0])]


@pytest.mark.parametrize("method,kw", CASES, ids=[c[0] for c in CASES])
def test_reorder_selects_rows_of_every_layout(method: str, kw: dict) -> None:
    model = tiny_model("llama")
    ids, mask = left_pad(prompts((70, 64, 50)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = kvcompress.compress(model, method.split("+"), **kw)
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_arg(cache))
    layouts = {_layout(layer) for layer in cache.layers}
    assert layouts - {"dense"}, layouts  # the case exercises a ragged or encoded layer
    before = [_rows(layer) for layer in cache.layers]
    kept = cache.kept_bytes()
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    for layer, old in zip(cache.layers, before):
        new = _rows(layer)
        for r, source in enumerate(order.tolist()):
            for h, keys in enumerate(new[r]):
                assert torch.equal(keys, old[source][h])
    assert cache.kept_bytes() > 0 and kept > 0


@pytest.mark.parametrize("method,kw", CASES, ids=[c[0] for c in CASES])
def test_generate_with_two_beams(method: str, kw: dict) -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, 80), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = kvcompress.compress(model, method.split("+"), **kw)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=2,
                             do_sample=False, **cache_arg(cache))
    assert out.shape == (1, 86) and cache.kept_bytes() < cache.dense_bytes()
