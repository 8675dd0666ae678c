"""Tiny random-init models of every supported architecture (seconds to build, no downloads)."""

from __future__ import annotations

import functools

import torch

from kvcompress.models import random_model

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_EXTRA = {
    "mistral": dict(sliding_window=None),
    "qwen2": dict(sliding_window=None, use_sliding_window=False),
    "qwen3": dict(sliding_window=None, use_sliding_window=False),
    # MoE: the attention is Llama-like, the experts only change the MLP
    "mixtral": dict(sliding_window=None, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(sliding_window=None, use_sliding_window=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(sliding_window=None, use_sliding_window=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
}


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` (kvcompress.models.random_model), logits sharpened so greedy decoding is far
    from ties."""
    return random_model(arch, seed=seed, sharpen=8.0, **_COMMON, **_EXTRA.get(arch, {}))


def prompts(lengths: tuple[int, ...] = (37, 64, 23), seed: int = 1, vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask
