"""The constructed retrieval testbed: a stock ``LlamaForCausalLM`` whose weights are **set by hand**, not trained.

**This is a constructed model.** Its needle accuracy shows whether a KV-cache compressor keeps the information a
known retrieval circuit needs; it says nothing about how a learned LLM would score.

Architecture (``LlamaConfig``): 3 layers, hidden 256, 4 query heads and 2 KV heads (GQA, 2 query heads per KV head),
head_dim 128, RoPE with ``rope_theta = 1e30`` (pairs 0–9 rotate fast enough to encode position, pairs 12–63 turn by
less than 0.2 rad over 32K positions), zero MLPs, tied embeddings, fp32, sdpa; the word-level tokenizer of
:mod:`kvcompress.zoo.tokenizer` (grouped digits). Position limit: 32768.

Residual stream (256 dims)::

    E     0–127   token identity: code_t = [u_t / sqrt2 (52 dims) , w_t / sqrt2 (76 dims)], u, w random unit vectors
    P1  128–179   u of the previous token          (written by layer 0, head 0)
    P2  180–231   u of the token two back           (written by layer 0, head 1)
    FLAG    232   1 on <s> only (attention sink)
    CONST   233   constant 8 on every token (Llama has no biases; RMSNorm keeps it at a known scale)

Circuit (heads are query heads; KV head = query head // 2):

* **layer 0, heads 0 and 1 — previous-token heads** (KV head 0). Keys and queries come from CONST only and live in
  RoPE pairs 0–9 with weights from a linear program, the query rotated by 1 (head 0) or 2 (head 1) positions, so the
  score is ``S · Σ_f b_f cos(ω_f (Δ − j))``: it peaks at distance Δ = j and every other distance up to 33K is at least
  0.187 lower, × S = 120 → ≥ 22 nats. The value is code_t; o_proj writes its u part to P1 (head 0) / P2 (head 1).
* **layer 1, head 0 — the retrieval (induction) head** (KV head 0). Query = [u(current token), P1(current)], key =
  [P1, P2] in the slowly rotating pairs, so position n scores ``S_ind · (<u_m, u_{n−1}> + <u_{m−1}, u_{n−2}>)``:
  highest where the two tokens before n equal the current token and the one before it (a **bigram** match). The
  value is code_t; o_proj adds 6 · code(token at n) to E, and the tied unembedding turns that into the argmax. So
  the model continues any bigram with what followed its earlier occurrence: after "... for <key> is" it copies the
  needle's value token by token.
* everything else is filler that writes nothing: layer 0 heads 2 (sink: attends to <s>) and 3 (local: current
  token), layer 1 head 1 (uniform; zero query) and heads 2/3 (sink/local), layer 2 heads 0/2 (sink) and 1/3 (local,
  distance 1 and 0). Ablating any of these KV heads changes no output.

Ground truth (also in ``kvcompress_testbed.json`` next to the weights): retrieval head (layer 1, query head 0) on KV
head (1, 0); previous-token heads (0, 0) and (0, 1) on KV head (0, 0), which only ever needs the last two tokens.

Measured (full cache, ``model.generate`` after ``from_pretrained``, ``python -m kvcompress.sweep testbed``): 100% exact
match on magic_number needles with 3 distractor keys at lengths 256, 1K, 4K, 8K and 16K × depths 0, 0.1, …, 1
(seed 0; seeds 1–5 at 256/1K/4K also 100%), with 10 distractors, and on passkey; the seed-0 grid with timing is
recorded in ``paper_tables/testbed.md`` (row in ``paper_tables/rows/testbed.jsonl``). Compression behaves as the
circuit predicts: ``streaming`` at 10% answers only needles inside its recent window; ``random`` at ratio r answers
a 2-token value with probability between r² and r (the first answer token comes from the prefill forward, which sees
the whole prompt; the second needs the needle's entry in the retrieval head's cache, kept with probability ≈ r, and
is sure when the last prompt token also survives in the previous-token head's cache); keeping only the needle's
tokens plus a short window still answers.

Limits: the match is a *bigram*, so a needle whose own bigrams recur in the haystack is ambiguous: the Kamradt
sentence ("... on a sunny day") is copied exactly up to 1K but at 4K "on a" also occurs in the pydoc haystack and
about 40% of answers continue from there. Value tokens must not form bigrams that occur elsewhere in the prompt
(the generator keeps keys out of the haystack and values' 3-digit groups disjoint).

Build: ``python -m kvcompress.zoo build [--out DIR]`` (about a second; deterministic). ``testbed_path()`` builds it
on first use into ``$KVCOMPRESS_CACHE/testbed-<VERSION>`` (default ``~/.cache/kvcompress``). Using it (greedy
answers, the full-cache needle grid, binomial bands): :mod:`kvcompress.zoo.testbed_check`, re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .testbed_check import answer, binomial_band, check_grid, grid_markdown  # noqa: F401  (re-exported)

VERSION = "1"
METADATA_FILE = "kvcompress_testbed.json"

N_LAYERS, HIDDEN, N_Q, N_KV, HEAD_DIM, FFN = 3, 256, 4, 2, 128, 64
ROPE_THETA = 1e30
MAX_POSITIONS = 32768
CODE_DIM = 52  # u: the part of a token's code used for matching
E = slice(0, 128)
P1 = slice(128, 128 + CODE_DIM)
P2 = slice(P1.stop, P1.stop + CODE_DIM)
FLAG = P2.stop
CONST = FLAG + 1
CONST_VALUE = 8.0
SEED = 20240604

#: Linear-program weights of RoPE pairs 0..9 for the positional heads (maximise the worst-case margin between the
#: target distance and any other distance in [0, 33000]; see module docstring).
POS_WEIGHTS = (0.39309, 0.10061, 0.1016, 0.06786, 0.06486, 0.06252, 0.06942, 0.06879, 0.05959, 0.01167)
POS_PAIRS = tuple(range(10))
BLOCK_A_PAIRS = tuple(range(12, 38))  # query u(current) . key P1
BLOCK_B_PAIRS = tuple(range(38, 64))  # query P1(current) . key P2
SINK_DIM = 63  # x of pair 63 (the slowest)
S_POS, S_SINK, S_IND, GAIN = 120.0, 24.0, 48.0, 6.0

RETRIEVAL_HEADS = [[1, 0]]
RETRIEVAL_KV_HEADS = [[1, 0]]
PREVIOUS_TOKEN_HEADS = [[0, 0], [0, 1]]
PREVIOUS_TOKEN_KV_HEADS = [[0, 0]]
HEAD_ROLES = {
    "0": ["previous-token (distance 1) -> P1", "previous-token (distance 2) -> P2", "sink (<s>), writes nothing",
          "local (current token), writes nothing"],
    "1": ["retrieval / induction (bigram match), copies the token into E", "uniform (zero query), writes nothing",
          "sink (<s>), writes nothing", "local (current token), writes nothing"],
    "2": ["sink (<s>), writes nothing", "local (distance 1), writes nothing", "sink (<s>), writes nothing",
          "local (current token), writes nothing"],
}


def _pair_dims(pairs) -> list[int]:
    return [p for p in pairs] + [p + HEAD_DIM // 2 for p in pairs]


def inv_freq() -> torch.Tensor:
    """Exactly the model's RoPE inverse frequencies (float32, as ``LlamaRotaryEmbedding`` computes them)."""
    return 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).to(dtype=torch.float) / HEAD_DIM))


def positional_margin(max_distance: int = 33000, offset: int = 1) -> float:
    """Worst-case score gap (before × S_POS) between the target distance and any other distance ≤ max_distance."""
    w = torch.tensor(POS_WEIGHTS, dtype=torch.float64)
    w = w / w.sum()
    om = inv_freq().double()[list(POS_PAIRS)]
    d = torch.arange(0, max_distance + 1, dtype=torch.float64)
    score = torch.cos(torch.outer(d - offset, om)) @ w
    score[offset] = -math.inf
    return float(1.0 - score.max())


def _k_pos() -> torch.Tensor:
    w = torch.tensor(POS_WEIGHTS, dtype=torch.float64)
    w = w / w.sum()
    k = torch.zeros(HEAD_DIM, dtype=torch.float64)
    k[list(POS_PAIRS)] = w.sqrt()
    return k


def _q_pos(offset: int) -> torch.Tensor:
    """Query whose RoPE score against _k_pos peaks at distance ``offset``: each pair rotated by −offset·ω."""
    w = torch.tensor(POS_WEIGHTS, dtype=torch.float64)
    w = w / w.sum()
    om = inv_freq().double()[list(POS_PAIRS)]
    q = torch.zeros(HEAD_DIM, dtype=torch.float64)
    half = HEAD_DIM // 2
    idx = torch.tensor(POS_PAIRS)
    q[idx] = w.sqrt() * torch.cos(offset * om)
    q[idx + half] = -w.sqrt() * torch.sin(offset * om)
    return q


def _codes(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    u = torch.randn(vocab_size, CODE_DIM, generator=g, dtype=torch.float64)
    w = torch.randn(vocab_size, 128 - CODE_DIM, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    w = w / w.norm(dim=1, keepdim=True)
    return torch.cat([u, w], dim=1) / math.sqrt(2.0)


def make_config(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_Q,
        num_key_value_heads=N_KV,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )


def construct_state(vocab_size: int, bos: int) -> dict[str, torch.Tensor]:
    """All weights of the constructed model, by name (float32)."""
    H, D = HIDDEN, HEAD_DIM
    codes = _codes(vocab_size)
    emb = torch.zeros(vocab_size, H, dtype=torch.float64)
    emb[:, E] = codes
    emb[bos, E] = 0.0
    emb[bos, FLAG] = 1.0
    emb[:, CONST] = CONST_VALUE
    # RMS of the residual entering each layer: embedding (|code| = 1) plus P1, P2 (unit) after layer 0.
    kappa = [math.sqrt((CONST_VALUE**2 + 1.0) / H), math.sqrt((CONST_VALUE**2 + 3.0) / H)]
    kappa.append(kappa[1])
    scale = lambda s: math.sqrt(s * math.sqrt(D))  # noqa: E731 — per-side factor so q.k / sqrt(D) == s
    a = 1.0 / math.sqrt(2.0)  # norm of the u part inside a code

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(H)}
    k_pos, sink_idx = _k_pos(), SINK_DIM
    for layer in range(N_LAYERS):
        kap = kappa[layer]
        const_hat = CONST_VALUE / kap  # normalised CONST entry
        flag_hat = 1.0 / kap
        wq = torch.zeros(N_Q * D, H, dtype=torch.float64)
        wk = torch.zeros(N_KV * D, H, dtype=torch.float64)
        wv = torch.zeros(N_KV * D, H, dtype=torch.float64)
        wo = torch.zeros(H, N_Q * D, dtype=torch.float64)

        def q_rows(h):
            return slice(h * D, (h + 1) * D)

        # Default for every KV head: filler keys (positional from CONST + sink from FLAG), values = code.
        for kv in range(N_KV):
            wk[q_rows(kv), CONST] = k_pos * scale(S_POS) / const_hat
            wk[kv * D + sink_idx, FLAG] = scale(S_SINK) / flag_hat
            wv[kv * D : kv * D + 128, E] = torch.eye(128, dtype=torch.float64) * kap

        def sink_query(h):
            wq[h * D + sink_idx, CONST] = scale(S_SINK) / const_hat

        def local_query(h, offset):
            wq[q_rows(h), CONST] = _q_pos(offset) * scale(S_POS) / const_hat

        if layer == 0:
            local_query(0, 1)
            local_query(1, 2)
            eye = torch.eye(CODE_DIM, dtype=torch.float64) / a
            wo[P1, 0 : CODE_DIM] = eye  # head 0 value u part (scaled a) -> P1 (unit)
            wo[P2, D : D + CODE_DIM] = eye  # head 1 -> P2
            sink_query(2)
            local_query(3, 0)
        elif layer == 1:
            # KV head 0 = retrieval: key [P1 -> block A, P2 -> block B]; value = code.
            wk[0:D, :] = 0.0
            da, db = _pair_dims(BLOCK_A_PAIRS), _pair_dims(BLOCK_B_PAIRS)
            s = scale(S_IND)
            for j in range(CODE_DIM):
                wk[da[j], P1.start + j] = s * kap
                wk[db[j], P2.start + j] = s * kap
                wq[da[j], E.start + j] = s * kap / a  # u(current) lives in E[0:52] scaled by a
                wq[db[j], P1.start + j] = s * kap
            wo[E, 0:128] = torch.eye(128, dtype=torch.float64) * GAIN  # head 0: copy the attended code into E
            # head 1: zero query (uniform attention), writes nothing
            sink_query(2)
            local_query(3, 0)
        else:
            sink_query(0)
            local_query(1, 1)
            sink_query(2)
            local_query(3, 0)
        pre = f"model.layers.{layer}."
        sd[pre + "self_attn.q_proj.weight"] = wq
        sd[pre + "self_attn.k_proj.weight"] = wk
        sd[pre + "self_attn.v_proj.weight"] = wv
        sd[pre + "self_attn.o_proj.weight"] = wo
        sd[pre + "mlp.gate_proj.weight"] = torch.zeros(FFN, H)
        sd[pre + "mlp.up_proj.weight"] = torch.zeros(FFN, H)
        sd[pre + "mlp.down_proj.weight"] = torch.zeros(H, FFN)
        sd[pre + "input_layernorm.weight"] = torch.ones(H)
        sd[pre + "post_attention_layernorm.weight"] = torch.ones(H)
    return {k: v.to(torch.float32).contiguous() for k, v in sd.items()}


def metadata(vocab_size: int) -> dict:
    return {
        "constructed": True,
        "name": "kvcompress-testbed",
        "version": VERSION,
        "note": "Constructed (hand-set weights), not trained: its accuracy shows whether a compressor keeps what a "
        "known retrieval circuit needs, not how a learned LLM would score.",
        "architecture": "LlamaForCausalLM",
        "num_layers": N_LAYERS,
        "num_attention_heads": N_Q,
        "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITIONS,
        "retrieval_heads": RETRIEVAL_HEADS,
        "retrieval_kv_heads": RETRIEVAL_KV_HEADS,
        "previous_token_heads": PREVIOUS_TOKEN_HEADS,
        "previous_token_kv_heads": PREVIOUS_TOKEN_KV_HEADS,
        "previous_token_kv_heads_need": "only the last 2 positions",
        "filler_kv_heads": [[0, 1], [1, 1], [2, 0], [2, 1]],
        "head_roles": HEAD_ROLES,
        "retrieval_rule": "bigram induction: after tokens (x, y) the model emits the token that followed the "
        "latest-scoring earlier occurrence of (x, y); needle answers are copied token by token",
        "needle_template": "magic_number (kvcompress.eval.needle), prompt ends with 'The special magic number for "
        "<key> is'",
        "positional_margin_33k": round(positional_margin(), 4),
        "scales": {"S_pos": S_POS, "S_sink": S_SINK, "S_ind": S_IND, "gain": GAIN},
    }


def build(out_dir: str | Path) -> Path:
    """Build tokenizer + model into ``out_dir`` (created; existing files overwritten). Deterministic."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from .tokenizer import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    vocab_size = len(tok)
    config = make_config(vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(construct_state(vocab_size, tok.bos_token_id), assign=True, strict=False)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    model.save_pretrained(str(out))
    (out / METADATA_FILE).write_text(json.dumps(metadata(vocab_size), indent=2) + "\n")
    return out


def cache_root() -> Path:
    env = os.environ.get("KVCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcompress"


def built_testbed_dir() -> Path:
    """Where the testbed is (or will be) built: ``cache_root() / f"testbed-{VERSION}"``."""
    return cache_root() / f"testbed-{VERSION}"


def is_built(path: Path) -> bool:
    """Whether ``path`` holds a complete build (its metadata file is written last)."""
    return (path / METADATA_FILE).is_file()


def testbed_path(rebuild: bool = False) -> Path:
    """Directory of the built testbed (``config.json``, weights, tokenizer, ``kvcompress_testbed.json``).

    Built on first use into ``cache_root() / f"testbed-{VERSION}"`` (atomic: built in a temporary sibling and
    renamed, so concurrent first uses are safe).
    """
    target = built_testbed_dir()
    if is_built(target) and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / METADATA_FILE).is_file():  # an incomplete directory from elsewhere
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".testbed-{VERSION}-", dir=target.parent))
    try:
        build(tmp)
        if rebuild and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / METADATA_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(path: str | Path | None = None, *, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` loaded the real way: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else testbed_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn_implementation)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok
