"""Head-axis scores: retrieval-head detection, the score artifact, and its inspection view.

* :func:`detect` runs needle probes (the project's needle generator and haystack) through the model, decodes the
  answer greedily, and scores every (layer, query head) from **decode-step** attention only (q_len = 1, through
  :attr:`KVCompressCache.observers`; no prefill attention matrix is ever built):

  - ``retrieval`` — the retrieval score of Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context
    Factuality"): at each decode step, a head makes a *copy event* when its top-1 attended position lies inside the
    needle and holds the token being generated; a head's score is its copy events / answer tokens, averaged over the
    **correctly answered** samples only.
  - ``mass`` — an attention-mass score in the spirit of HeadKV's retrieval-reasoning score (Fu et al. 2024): the
    attention probability a head puts on the needle tokens, averaged over the answer's decode steps of every sample
    (correct or not), for models too weak to answer.

  Query-head scores are aggregated to KV heads by the **max** over the query heads a KV head serves (GQA): a KV head
  is needed in full as soon as one of its query heads retrieves. The ranking score is ``retrieval`` when at least
  one probe was answered correctly and some head copied, else ``mass``; ties are broken by the other score, then by
  (layer, head) order.
* The artifact is a small JSON file keyed by the model's **config hash** (:func:`config_hash`: the text config's
  architecture fields, without volatile keys such as ``_name_or_path``, dtype or the attention implementation),
  stored in ``$KVCOMPRESS_CACHE/heads/<hash>.json`` (default ``~/.cache/kvcompress/heads/``).
* ``python -m kvcompress.methods.head detect model=testbed`` writes it (progress bar); ``python -m kvcompress.methods.head show
  model=testbed`` prints a layer × head table and writes a heatmap PNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvcompress import artifacts
from kvcompress.artifacts import config_hash
from kvcompress.errors import KVCompressError

FORMAT = "kvcompress-head-scores"
FORMAT_VERSION = 1

#: config keys that do not describe the architecture (paths, dtype, runtime switches, generation defaults)


def cache_dir() -> Path:
    """``$KVCOMPRESS_CACHE/heads`` (:func:`kvcompress.artifacts.artifact_dir`)."""
    return artifacts.artifact_dir("heads")


def artifact_path(config_or_model: Any) -> Path:
    return cache_dir() / f"{config_hash(config_or_model)}.json"


def save_scores(scores: dict, path: str | Path | None = None) -> Path:
    """Write a score artifact (atomically); default location: :func:`artifact_path` of its config hash."""
    target = Path(path) if path is not None else cache_dir() / f"{scores['config_hash']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(scores, indent=1) + "\n")
    tmp.replace(target)
    return target


_LOADED: dict[tuple[str, float], dict] = {}


def load_scores(path: str | Path, config_or_model: Any | None = None) -> dict:
    """Read and validate a score artifact; with a config (or model), check that it was made for that model."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KVCompressError(f"head-score artifact {str(p)!r} does not exist; valid: a file written by "
                              "`python -m kvcompress.methods.head detect model=...`")
    key = (str(p.resolve()), p.stat().st_mtime)
    data = _LOADED.get(key)
    if data is None:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise KVCompressError(f"head-score artifact {str(p)!r} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise KVCompressError(f"{str(p)!r} is not a head-score artifact (format {FORMAT!r} expected)")
        _LOADED[key] = data
    if config_or_model is not None:
        want = config_hash(config_or_model)
        if data.get("config_hash") != want:
            raise KVCompressError(
                f"head-score artifact {str(p)!r} was made for another model (config hash {data.get('config_hash')}, "
                f"this model has {want}); valid: an artifact from `python -m kvcompress.methods.head detect` on this model"
            )
    return data


def find_scores(config_or_model: Any) -> dict | None:
    """The cached artifact for this model's config hash, or None."""
    p = artifact_path(config_or_model)
    return load_scores(p, config_or_model) if p.is_file() else None


def kv_order(scores: dict) -> list[tuple[int, int]]:
    """Every (layer, KV head), best first: primary score, then the other score, then (layer, head)."""
    primary = scores[scores["primary"] + "_kv"]
    other = scores[("mass" if scores["primary"] == "retrieval" else "retrieval") + "_kv"]
    pairs = [(layer, h) for layer in range(len(primary)) for h in range(len(primary[layer]))]
    return sorted(pairs, key=lambda p: (-primary[p[0]][p[1]], -other[p[0]][p[1]], p[0], p[1]))


def full_kv_heads(cache: Any, prompt_tokens: int) -> set[tuple[int, int]]:
    """The (layer, KV head) pairs a compressed cache (batch 1) holds in full: those keeping at least the prompt's
    ``prompt_tokens`` entries (``heads`` / ``heads_random`` keep the others to sink + recent)."""
    kept = cache.kept_tokens()
    return {(layer, h) for layer, row in enumerate(kept) for h, n in enumerate(row) if n >= prompt_tokens}


def ensure_scores(model: Any, tokenizer: Any, *, verbose: bool = True, **detect_kwargs: Any) -> Path | None:
    """Make sure the score artifact of ``model`` exists (the run CLI calls this before evaluating ``heads``).

    Computes it on first use with a message; returns its path, or None when the model has no tokenizer (then the
    head methods fall back to per-prompt scoring, saying so).
    """
    p = artifact_path(model)
    if p.is_file():
        load_scores(p, model)
        return p
    if tokenizer is None:
        if verbose:
            print("heads: the model has no tokenizer, so no needle probes can be run; head methods will score heads "
                  "per prompt (out-of-window attention mass)", flush=True)
        return None
    from kvcompress.methods.head.detect import detect

    if verbose:
        print(f"heads: no head scores for this model yet (config hash {config_hash(model)}); detecting retrieval "
              f"heads with needle probes, saving to {p}", flush=True)
    scores = detect(model, tokenizer, progress=verbose, **detect_kwargs)
    return save_scores(scores, p)


def detect(*args: Any, **kwargs: Any) -> dict:
    """See :func:`kvcompress.methods.head.detect.detect`."""
    from kvcompress.methods.head.detect import detect as _detect

    return _detect(*args, **kwargs)


def score_table(scores: dict, which: str | None = None, kv: bool = False) -> str:
    """A layer × head table of one score (default: the primary one), as text."""
    which = which or scores["primary"]
    grid = scores[f"{which}_kv" if kv else which]
    heads = max(len(r) for r in grid)
    label = "kv head" if kv else "head"
    lines = [f"{which} score per layer x {label} (model {scores.get('model', '?')}, hash {scores['config_hash']})"]
    lines.append("layer " + " ".join(f"{h:>6d}" for h in range(heads)))
    for layer, row in enumerate(grid):
        lines.append(f"{layer:>5d} " + " ".join(f"{v:6.3f}" for v in row))
    return "\n".join(lines)


def heatmap(scores: dict, out: str | Path, which: str | None = None) -> Path:
    """Write a layer × query-head heatmap PNG of one score (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    which = which or scores["primary"]
    grid = np.asarray(scores[which], dtype=float)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * grid.shape[1] + 2), max(2.5, 0.3 * grid.shape[0] + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{which} score — {scores.get('model', '')}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = [
    "config_hash", "cache_dir", "artifact_path", "save_scores", "load_scores", "find_scores", "kv_order",
    "full_kv_heads", "ensure_scores", "detect", "score_table", "heatmap",
]
