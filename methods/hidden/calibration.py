"""Calibration of the principal bases of the ``lowrank`` method, saved as a model-side artifact.

``calibrate(model, tokenizer)`` runs the model once over calibration text with an uncompressed (``full``) cache and,
for every layer and KV head, takes the eigenvectors of the **uncentered** second-moment matrix ``XᵀX`` of the
**post-RoPE** keys (as the cache holds them) and of the values, sorted by decreasing eigenvalue. Projecting onto the
top ``r`` of them is the rank-``r`` approximation with the least squared error on the calibration keys; with every
direction (``r = head_dim``) the basis is orthonormal and the reconstruction exact up to float rounding.
Uncentered, so no mean has to be stored or added back.

Calibration text: the project's built-in corpus (``eval/haystack.py``'s ``"pydoc"`` sentences, first ``tokens``
tokens) when the model has a tokenizer; ``text=`` for user text (a string, or a path to a ``.txt`` file); a model with
no tokenizer (e.g. a random tiny model) is calibrated on ``tokens`` seeded random token ids.

Artifact: ``$KVCOMPRESS_CACHE/lowrank/<config hash>-<weights fingerprint>-<source>.safetensors`` (default
``~/.cache/kvcompress``), keyed by what the bases depend on: the model's text config, its weights
(:func:`kvcompress.artifacts.model_key`) and the calibration source; it also records a fingerprint of every layer's
``k_proj``/``v_proj`` weights. A cached artifact is validated before use — tensor shapes ``(L, H, D, D)`` /
``(L, H, Dv, Dv)`` / energies ``(L, H, D)`` / ``(L, H, Dv)`` matching the model, all finite, every basis orthonormal
(``max |BᵀB − I| ≤ 1e-3``), energies ≥ 0 and non-increasing, the per-layer fingerprints equal to the model's — and
one that fails is recalibrated with a one-line message saying why. If the artifact cannot be written (read-only
cache), a warning says so and the bases are kept in memory for the process. The bases are model-side data like the
weights: their bytes (:attr:`Bases.nbytes`) are reported separately, never as cache bytes.

The method's ``prepare`` step (run by :func:`kvcompress.compress`) calls :func:`ensure_calibrated`, which loads the
artifact or calibrates and registers the model; if an encode still finds no bases (a cache built without
``compress``), a one-line error says how to calibrate.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcompress import artifacts
from kvcompress.artifacts import attention_modules, layer_fingerprint
from kvcompress.artifacts import text_config as _text_config
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError

DEFAULT_TOKENS = 1024
#: largest ``|BᵀB − I|`` entry of a loaded basis
ORTHONORMAL_TOL = 1e-3
_LOCK = threading.RLock()
_LOADED: dict[str, Bases] = {}
_INVALID: dict[tuple[str, int, int], str] = {}  # artifact files found invalid, by (path, mtime, size): the reason
_MODELS: dict[int, tuple[weakref.ref, Any]] = {}  # id(config) -> (model, tokenizer)


def artifact_dir() -> Path:
    """``$KVCOMPRESS_CACHE/lowrank`` (:func:`kvcompress.artifacts.artifact_dir`)."""
    return artifacts.artifact_dir("lowrank")


def _source_tag(text: str | None, has_tokenizer: bool) -> str:
    if text is not None:
        return "text-" + hashlib.sha256(_read_text(text).encode()).hexdigest()[:12]
    return "pydoc" if has_tokenizer else "ids"


def _read_text(text: str) -> str:
    if len(text) < 4096 and "\n" not in text and text.endswith(".txt") and Path(text).expanduser().is_file():
        return Path(text).expanduser().read_text(encoding="utf-8", errors="replace")
    return text


@dataclass
class Bases:
    """Per-(layer, KV head) orthonormal bases, columns by decreasing eigenvalue: keys ``(L, H, D, D)``, values
    ``(L, H, Dv, Dv)`` (float32), with the eigenvalues (energy per direction) ``(L, H, D)``.

    The artifact keeps them on the CPU; :meth:`layer` hands out one layer's bases on the device of the keys that use
    them (moved once per layer and device, then reused)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_energy: torch.Tensor
    value_energy: torch.Tensor
    fingerprints: list[float]
    source: str
    tokens: int
    path: Path | None = None
    #: moved copies handed out by :meth:`layer`, by (layer, device)
    _moved: dict = field(default_factory=dict, repr=False, compare=False)

    def layer(self, i: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s key and value bases ``(H, D, D)``, ``(H, Dv, Dv)`` on ``device``, float32 (the codecs
        project in float32). Moved once per (layer, device) and cached, so every block of a layer shares one copy."""
        device = torch.device(device)
        if self.keys.device == device:
            return self.keys[i], self.values[i]
        key = (i, str(device))
        moved = self._moved.get(key)
        if moved is None:
            moved = self._moved[key] = (self.keys[i].to(device), self.values[i].to(device))
        return moved

    @property
    def nbytes(self) -> int:
        """Model-side bytes (full bases and energies; a rank-r method uses only the first r columns)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.key_energy, self.value_energy))

    def matches(self, attention: torch.nn.Module) -> bool:
        i = attention.layer_idx
        if i >= len(self.fingerprints):
            return False
        fp = layer_fingerprint(attention)
        return abs(fp - self.fingerprints[i]) <= 1e-6 * max(1.0, abs(fp))

    def problem(self, model: torch.nn.Module) -> str | None:
        """Why these bases cannot serve ``model`` (shapes, non-finite values, a basis that is not orthonormal, energies
        negative or increasing, another layer fingerprint), or None."""
        mods = attention_modules(model)
        text = _text_config(model)
        h = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        d, dv = (mods[0].k_proj.weight.shape[0] // h, mods[0].v_proj.weight.shape[0] // h) if mods else (0, 0)
        want = {"keys": (len(mods), h, d, d), "values": (len(mods), h, dv, dv), "key_energy": (len(mods), h, d),
                "value_energy": (len(mods), h, dv)}
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                return f"{name} has shape {tuple(t.shape)}, this model needs {shape}"
            if not bool(torch.isfinite(t).all()):
                return f"{name} has non-finite values"
        for name in ("keys", "values"):
            basis = getattr(self, name).double()
            eye = torch.eye(basis.shape[-1], dtype=torch.float64, device=basis.device)
            deviation = float((basis.transpose(-1, -2) @ basis - eye).abs().max()) if basis.numel() else 0.0
            if deviation > ORTHONORMAL_TOL:
                return f"{name} bases are not orthonormal (max |B^T B - I| = {deviation:.3g} > {ORTHONORMAL_TOL:g})"
        for name in ("key_energy", "value_energy"):
            e = getattr(self, name)
            if bool((e < 0).any()) or bool((e[..., 1:] > e[..., :-1]).any()):
                return f"{name} is negative or increasing (valid: >= 0, non-increasing)"
        stale = [m.layer_idx for m in mods if not self.matches(m)]
        if stale:
            return f"layer {stale[0]}'s k_proj/v_proj fingerprint differs from this model's"
        return None

    def save(self, path: Path) -> None:
        """Write the artifact atomically; an unwritable location raises ``OSError``."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        meta = {"fingerprints": json.dumps(self.fingerprints), "source": self.source, "tokens": str(self.tokens),
                "basis": "uncentered PCA of post-RoPE keys / values"}
        try:
            save_file({"keys": self.keys.contiguous(), "values": self.values.contiguous(),
                       "key_energy": self.key_energy.contiguous(), "value_energy": self.value_energy.contiguous()},
                      str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Bases:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in ("keys", "values", "key_energy", "value_energy")}
        return cls(t["keys"], t["values"], t["key_energy"], t["value_energy"], json.loads(meta["fingerprints"]),
                   meta["source"], int(meta["tokens"]), path)


def artifact_path(model: torch.nn.Module, text: str | None = None, has_tokenizer: bool = True) -> Path:
    """``$KVCOMPRESS_CACHE/lowrank/<config hash>-<weights fingerprint>-<source>.safetensors``."""
    return artifact_dir() / f"{artifacts.model_key(model)}-{_source_tag(text, has_tokenizer)}.safetensors"


def calibration_ids(model: torch.nn.Module, tokenizer: Any = None, text: str | None = None,
                    tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """The calibration prompt ``(1, n)``: the first ``tokens`` tokens of the text (built-in corpus by default)."""
    if tokenizer is None:
        if text is not None:
            raise KVCompressError("calibration text needs the model's tokenizer; valid: calibrate(model, tokenizer, text=...)")
        vocab = _text_config(model.config).vocab_size
        g = torch.Generator().manual_seed(0)  # a host generator: the same ids on every device (moved by the caller)
        return torch.randint(3, vocab, (1, tokens), generator=g, device="cpu")
    if text is None:
        from kvcompress.eval.haystack import corpus_text

        text = corpus_text("pydoc")[: tokens * 16]
    ids = tokenizer(_read_text(text), return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < 8:
        raise KVCompressError(f"calibration text has {ids.shape[1]} tokens; valid: at least 8")
    return ids


def _register(model: torch.nn.Module, tokenizer: Any) -> None:
    _MODELS[id(model.config)] = (weakref.ref(model), tokenizer)


def _eigbasis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(H, N, D)`` → (basis ``(H, D, D)`` columns by decreasing eigenvalue, eigenvalues ``(H, D)``)."""
    x = x.double()
    cov = x.transpose(-1, -2) @ x / max(1, x.shape[1])
    evals, evecs = torch.linalg.eigh(cov)
    return evecs.flip(-1).float(), evals.flip(-1).clamp(min=0).float()


@torch.no_grad()
def calibrate(model: torch.nn.Module, tokenizer: Any = None, text: str | None = None, tokens: int = DEFAULT_TOKENS,
              save: bool = True) -> Bases:
    """Compute (and save) the per-(layer, KV head) key/value bases of ``model`` on calibration text."""
    import kvcompress

    ids = calibration_ids(model, tokenizer, text, tokens).to(next(model.parameters()).device)
    cache = kvcompress.compress(model, "full")
    model(ids, **cache_arg(cache))
    ks, vs, kes, ves = [], [], [], []
    for layer in cache.layers:
        k, e = _eigbasis(layer.keys[0, :, : layer.length])
        ks.append(k), kes.append(e)
        v, e = _eigbasis(layer.values[0, :, : layer.length])
        vs.append(v), ves.append(e)
    fps = [layer_fingerprint(m) for m in attention_modules(model)]
    # computed where the model runs; kept on the CPU like a loaded artifact (moved per layer when used)
    bases = Bases(torch.stack(ks).cpu(), torch.stack(vs).cpu(), torch.stack(kes).cpu(), torch.stack(ves).cpu(), fps,
                  _source_tag(text, tokenizer is not None), int(ids.shape[1]))
    path = artifact_path(model, text, tokenizer is not None)
    if save:
        try:
            bases.save(path)
        except OSError as err:
            warnings.warn(f"lowrank: cannot write the calibrated bases to {path} ({err.strerror or err}); keeping them "
                          "in memory for this process", stacklevel=2)
    with _LOCK:
        _LOADED[str(path)] = bases
        _register(model, tokenizer)
    return bases


def ensure_calibrated(model: torch.nn.Module, tokenizer: Any = None, text: str | None = None,
                      tokens: int = DEFAULT_TOKENS) -> Bases:
    """Load the model's bases if a valid artifact for its config, weights and calibration source exists, else calibrate
    (saying why when a cached artifact does not fit); remembers the model for lazy use."""
    with _LOCK:
        _register(model, tokenizer)
        path = artifact_path(model, text, tokenizer is not None)
        bases = _try_load(path, model)
    return bases if bases is not None else calibrate(model, tokenizer, text, tokens)


def _try_load(path: Path, model: torch.nn.Module) -> Bases | None:
    """The bases at ``path``: calibrated or loaded earlier in this process, or read from the file and validated
    (:meth:`Bases.problem`); None when missing or invalid (then a one-line message says why)."""
    bases = _LOADED.get(str(path))
    if bases is not None or not path.is_file():
        return bases
    stat = path.stat()
    seen = (str(path), stat.st_mtime_ns, stat.st_size)
    if seen in _INVALID:  # said once
        return None
    try:
        bases = Bases.load(path)
        problem = bases.problem(model)
    except Exception as err:  # noqa: BLE001 — a torn or foreign file
        problem = f"unreadable ({type(err).__name__}: {err})".replace("\n", " ")
    if problem:
        _INVALID[seen] = problem
        print(f"lowrank: cached bases at {path} are not usable for this model ({problem}); recalibrating", flush=True)
        return None
    _LOADED[str(path)] = bases
    return bases


def _find_model(attention: torch.nn.Module) -> tuple[torch.nn.Module | None, Any]:
    """The model that owns ``attention`` with its tokenizer: registered by :func:`calibrate` /
    :func:`ensure_calibrated` (which the method's ``prepare`` step calls), else the model ``kvcompress.compress`` was
    given (:func:`kvcompress.artifacts.model_of`, no tokenizer); ``(None, None)`` when neither is known."""
    entry = _MODELS.get(id(attention.config))
    registered = entry[0]() if entry is not None else None
    owner = artifacts.model_of(attention)
    if registered is not None and (owner is None or owner is registered):
        return registered, entry[1]
    return owner, None


def bases_for(attention: torch.nn.Module, text: str | None = None) -> Bases:
    """The bases for the model owning ``attention`` (an attention module): loaded lazily, calibrated if missing or
    invalid."""
    model, tokenizer = _find_model(attention)
    if model is None:
        raise KVCompressError(
            "lowrank has no calibrated bases for this model; valid: create the cache with kvcompress.compress(model, "
            "'lowrank', ...) (it calibrates) or call kvcompress.methods.hidden.calibration.ensure_calibrated first"
        )
    with _LOCK:
        for has_tok in ((True, False) if text is None else (True,)):
            bases = _try_load(artifact_path(model, text, has_tok), model)
            if bases is not None:
                return bases
    was_training = model.training
    bases = calibrate(model, tokenizer, text)
    model.train(was_training)
    return bases
