"""The shared matrix: every registered method, picked up from the registry, in batches and against its budget.

Batch non-interference: each row of a left-padded batch of 3 prompts of different lengths generates exactly what
it generates alone, and changing one row's prompt never changes another row's output or kept set.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.compressor import Axis
from kvcompress.registry import get_method

METHODS = kvcompress.available_methods()
RATIO = 0.3


def _ratio_for(method: str) -> float | None:
    return RATIO if "ratio" in get_method(method).__dataclass_fields__ else None


def _run(model, rows, method):
    ids, mask = left_pad(rows)
    cache = kvcompress.compress(model, method, ratio=_ratio_for(method), trace=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **cache_arg(cache))
    width = ids.shape[1]
    tokens = [out[i, width:].tolist() for i in range(len(rows))]
    kept = [
        [cache.kept_positions(layer, row) for layer in range(model.config.num_hidden_layers)]
        for row in range(len(rows))
    ]
    # Kept positions are logical (they include the row's left padding); make them relative to the row's first token.
    pads = [width - len(r) for r in rows]
    kept = [[[[p - pads[i] for p in head] for head in layer] for layer in row] for i, row in enumerate(kept)]
    return tokens, kept, cache


@pytest.mark.parametrize("method", METHODS)
def test_rows_are_independent(method: str) -> None:
    model = tiny_model("llama")
    rows = prompts((37, 64, 23))
    tokens, kept, _ = _run(model, rows, method)
    for i, row in enumerate(rows):
        alone_tokens, alone_kept, _ = _run(model, [row], method)
        assert tokens[i] == alone_tokens[0], f"row {i} differs from its batch-1 run"
        assert kept[i] == alone_kept[0]
    changed = [rows[0], prompts((50,), seed=7)[0], rows[2]]
    tokens2, kept2, _ = _run(model, changed, method)
    assert tokens2[0] == tokens[0] and tokens2[2] == tokens[2]
    assert kept2[0] == kept[0] and kept2[2] == kept[2]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_padding_never_counts_and_budget_per_row(method: str) -> None:
    model = tiny_model("llama")
    rows = prompts((37, 64, 23))
    _, kept, cache = _run(model, rows, method)
    token_axis = get_method(method).axis is Axis.TOKEN and _ratio_for(method) is not None
    for i, row in enumerate(rows):
        for layer in kept[i]:
            for head in layer:
                prompt_part = [p for p in head if p < len(row)]
                assert min(prompt_part) >= 0, "a padding position was kept"
                if token_axis and not cache.compressors[0].adaptive:
                    assert len(prompt_part) == max(1, round(RATIO * len(row)))
    assert cache.memory_report()["kept_bytes"] < cache.memory_report()["dense_bytes"]
