"""Uncompressed runs (``full``, or any method at ratio=1) are the stock DynamicCache run: same tokens, same logits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, left_pad, prompts, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.compressor import Axis
from kvcompress.registry import get_method

# Selection methods (layer / head / token axes) at ratio=1 keep everything: they must be bit-identical.
# Hidden-axis methods at ratio=1 (full rank, all channels) are checked to 1e-4 in their own tests.
RATIO_ONE = [
    m
    for m in kvcompress.available_methods()
    if m != "full" and get_method(m).axis is not Axis.HIDDEN and "ratio" in get_method(m).__dataclass_fields__
]


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            **cache_arg(cache),
            output_logits=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["full", *RATIO_ONE])
@pytest.mark.parametrize("batch", [1, 3])
def test_identical_to_dynamic_cache(arch: str, method: str, batch: int) -> None:
    model = tiny_model(arch)
    rows = prompts()[:batch] if batch > 1 else prompts()[1:2]
    ids, mask = left_pad(rows)
    reference = _generate(model, ids, mask, DynamicCache())
    ratio = None if method == "full" else 1.0
    cache = kvcompress.compress(model, method, ratio=ratio)
    ours = _generate(model, ids, mask, cache)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.logits, reference.logits):
        assert torch.equal(a, b)
    report = cache.memory_report()
    assert report["kept_bytes"] == report["dense_bytes"]
    assert report["kept_fraction"] == 1.0
