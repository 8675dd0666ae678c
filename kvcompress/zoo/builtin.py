"""Registers the constructed testbed as the built-in model ``testbed`` (``configs/model/testbed.yaml``).

Imported by :func:`kvcompress.models.load_model` when a config names ``builtin: testbed``. The weights are built on
first use into the cache directory (:func:`kvcompress.zoo.testbed_path`) and loaded back with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` — the real loading path.
"""

from __future__ import annotations

import torch

from kvcompress.models import LoadedModel, register_builtin

NOTE = (
    "constructed testbed (hand-set weights, not trained): accuracy shows whether the compressor keeps what a known "
    "retrieval circuit needs (retrieval head = layer 1, query head 0, KV head 0), not how a learned LLM would score"
)


def _testbed(dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import testbed_path

    path = testbed_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model.eval(), tokenizer, "testbed", constructed=True, note=NOTE)


register_builtin("testbed", _testbed)
