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
* The artifact is a small JSON file keyed by what the scores depend on, the model's **config hash** and **weights
  fingerprint** (:func:`kvcompress.artifacts.model_key`: the text config's architecture fields without volatile keys
  such as ``_name_or_path``, dtype or the attention implementation; strided samples of the embedding and attention
  weights, so a fine-tune or a checkpoint of the same architecture gets its own scores), stored in
  ``$KVCOMPRESS_CACHE/heads/<config hash>-<weights fingerprint>.json`` (default ``~/.cache/kvcompress/heads/``); it
  records both (``config_hash``, ``weights``; format version 2).
* :func:`load_scores` validates an artifact before it is used: format and version, config hash and weights
  fingerprint (for a model; a config alone checks the hash), ``num_layers`` / ``num_heads`` / ``num_kv_heads`` equal
  to the model's, every grid of exactly layers × query heads (``retrieval``, ``mass``) or layers × KV heads
  (``retrieval_kv``, ``mass_kv``) with finite values in [0, 1], and ``primary`` one of the two scores; a problem is a
  one-line :class:`~kvcompress.artifacts.ArtifactError`. :func:`ensure_scores` (the automatic path) re-detects a
  missing, stale or invalid cached artifact, saying why; an artifact given by path that does not fit is an error.
  If the cache directory is not writable, the scores are kept in memory for the process, with a warning.
* ``python -m kvcompress.methods.head detect model=testbed`` writes it (progress bar); ``python -m kvcompress.methods.head show
  model=testbed`` prints a layer × head table and writes a heatmap PNG.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from kvcompress import artifacts
from kvcompress.artifacts import ArtifactError, config_hash, weights_fingerprint
from kvcompress.errors import KVCompressError

FORMAT = "kvcompress-head-scores"
FORMAT_VERSION = 2
SCORES = ("retrieval", "mass")

KIND = "head-score artifact"
_REDETECT = "an artifact from `python -m kvcompress.methods.head detect` on this model"

#: scores detected in this process whose artifact could not be written (read-only cache), by artifact path
_IN_MEMORY: dict[str, dict] = {}
#: parsed artifacts by (path, mtime, size)
_LOADED: dict[tuple[str, int, int], dict] = {}


def cache_dir() -> Path:
    """``$KVCOMPRESS_CACHE/heads`` (:func:`kvcompress.artifacts.artifact_dir`)."""
    return artifacts.artifact_dir("heads")


def artifact_path(model: torch.nn.Module) -> Path:
    """``$KVCOMPRESS_CACHE/heads/<config hash>-<weights fingerprint>.json`` (:func:`kvcompress.artifacts.model_key`)."""
    return cache_dir() / f"{artifacts.model_key(model)}.json"


def save_scores(scores: dict, path: str | Path | None = None) -> Path:
    """Write a score artifact (atomically); default location: its config hash and weights fingerprint under
    :func:`cache_dir`. An unwritable location raises ``OSError``."""
    target = Path(path) if path is not None else cache_dir() / f"{scores['config_hash']}-{scores['weights']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(scores, indent=1) + "\n")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _dims(config_or_model: Any) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model or config."""
    text = artifacts.text_config(config_or_model)
    heads = text.num_attention_heads
    return text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads


def _grid_problem(data: dict, name: str, rows: int, cols: int) -> tuple[str, str] | None:
    grid = data.get(name)
    valid = f"{name}: {rows} x {cols} finite scores in [0, 1] (layers x {'KV' if name.endswith('_kv') else 'query'} heads)"
    if not isinstance(grid, list) or len(grid) != rows or any(not isinstance(r, list) or len(r) != cols for r in grid):
        shape = ([len(r) if isinstance(r, list) else type(r).__name__ for r in grid] if isinstance(grid, list)
                 else type(grid).__name__)
        return f"{name} is not a {rows} x {cols} grid (row lengths {shape})", valid
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
                return f"{name}[{i}][{j}] = {v!r}", valid
    return None


def _problem(data: Any, config_or_model: Any | None) -> tuple[str, str] | None:
    """What makes ``data`` unusable (for this model, when given) as ``(reason, valid)``, or None."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "not a head-score artifact", f"a JSON object with format {FORMAT!r}"
    if data.get("version") != FORMAT_VERSION:
        return (f"format version {data.get('version')!r} (version 1 is not keyed by the weights)",
                f"version {FORMAT_VERSION}, {_REDETECT}")
    keys = ("num_layers", "num_heads", "num_kv_heads")
    if config_or_model is not None:
        want = config_hash(config_or_model)
        if data.get("config_hash") != want:
            return f"made for another model (config hash {data.get('config_hash')}, this model {want})", _REDETECT
        if isinstance(config_or_model, torch.nn.Module):
            want = weights_fingerprint(config_or_model)
            if data.get("weights") != want:
                return f"weights fingerprint {data.get('weights')} != {want} of this model", _REDETECT
        for key, want in zip(keys, _dims(config_or_model)):
            if data.get(key) != want:
                return f"{key}={data.get(key)!r}, this model has {want}", _REDETECT
    for key in keys:
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{key}={v!r}", f"{key}: a positive integer"
    if data.get("primary") not in SCORES:
        return f"primary={data.get('primary')!r}", "primary: retrieval or mass"
    layers, heads, kv = (data[k] for k in keys)
    for name in SCORES:
        problem = _grid_problem(data, name, layers, heads) or _grid_problem(data, name + "_kv", layers, kv)
        if problem:
            return problem
    return None


def load_scores(path: str | Path, config_or_model: Any | None = None) -> dict:
    """Read and validate a score artifact (see the module docstring); with a model, check that it was made for its
    config and weights (a config alone: its config hash and sizes). Raises a one-line
    :class:`~kvcompress.artifacts.ArtifactError` (a :class:`KVCompressError`) naming the file, the problem and what is
    valid."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KVCompressError(f"head-score artifact {str(p)!r} does not exist; valid: a file written by "
                              "`python -m kvcompress.methods.head detect model=...`")
    stat = p.stat()
    key = (str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    data = _LOADED.get(key)
    if data is None:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(KIND, p, f"not valid JSON ({err})", _REDETECT) from None
        _LOADED[key] = data
    problem = _problem(data, config_or_model)
    if problem:
        raise ArtifactError(KIND, p, *problem)
    return data


def find_scores(model: torch.nn.Module) -> dict | None:
    """The scores of this model (config hash and weights fingerprint): those kept in memory when the cache was not
    writable, else the cached artifact (validated: an :class:`~kvcompress.artifacts.ArtifactError` when it does not
    fit), else None."""
    p = artifact_path(model)
    if str(p) in _IN_MEMORY:
        return _IN_MEMORY[str(p)]
    return load_scores(p, model) if p.is_file() else None


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
    """Make sure the scores of ``model`` (its config and weights) exist: the path of its artifact, computed on first use
    with a message (the ``prepare`` step of the head methods calls this).

    A cached artifact that does not fit (another format version, other weights, bad values: see :func:`load_scores`)
    is never used: it is re-detected, with a one-line message saying why. When the artifact cannot be written
    (read-only cache), a warning says so and the scores are kept in memory for this process (:func:`find_scores`
    returns them; the returned path then does not exist). Returns None when the model has no tokenizer (then the head
    methods fall back to per-prompt scoring, saying so).
    """
    p = artifact_path(model)
    if str(p) in _IN_MEMORY:
        return p
    invalid = None
    if p.is_file():
        try:
            load_scores(p, model)
            return p
        except ArtifactError as err:
            invalid = f"heads: cached head scores at {p} are not usable for this model ({err.reason})"
    if tokenizer is None:
        if invalid or verbose:
            print(f"{invalid + ', and' if invalid else 'heads:'} the model has no tokenizer, so no needle probes can be "
                  "run; head methods will score heads per prompt (out-of-window attention mass)", flush=True)
        return None
    from kvcompress.methods.head.detect import detect

    if invalid:
        print(f"{invalid}; re-detecting", flush=True)
    elif verbose:
        print(f"heads: no head scores for this model yet (config hash {config_hash(model)}, weights fingerprint "
              f"{weights_fingerprint(model)}); detecting retrieval heads with needle probes, saving to {p}", flush=True)
    scores = detect(model, tokenizer, progress=verbose, **detect_kwargs)
    try:
        return save_scores(scores, p)
    except OSError as err:
        warnings.warn(f"heads: cannot write head scores to {p} ({err.strerror or err}); keeping them in memory for "
                      "this process", stacklevel=2)
        _IN_MEMORY[str(p)] = scores
        return p


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
    title = (f"{which} score per layer x {label} (model {scores.get('model', '?')}, hash {scores['config_hash']}, "
             f"weights {scores.get('weights', '?')})")
    lines = [title]
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
    "config_hash", "weights_fingerprint", "cache_dir", "artifact_path", "save_scores", "load_scores", "find_scores", "kv_order",
    "full_kv_heads", "ensure_scores", "detect", "score_table", "heatmap",
]
