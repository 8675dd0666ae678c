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
    from transformers import AutoModelForCausalLM

    from . import testbed_path

    path = testbed_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return LoadedModel(model.eval(), _tokenizer(), "testbed", constructed=True, note=NOTE)


def _tokenizer():
    """The testbed's tokenizer without building (or loading) its weights: the built one when the testbed exists,
    else the same deterministic tokenizer made in memory."""
    from transformers import AutoTokenizer

    from .testbed import built_testbed_dir, is_built
    from .tokenizer import build_tokenizer

    built = built_testbed_dir()
    return AutoTokenizer.from_pretrained(str(built)) if is_built(built) else build_tokenizer()


register_builtin("testbed", _testbed, _tokenizer)
