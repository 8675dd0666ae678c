"""lm-eval (0.4.x) integration: the model ``kvcompress``, an ``HFLM`` whose requests all run through a compressed cache.

lm-eval has no plugin discovery, so use this module as the entry point (it registers the model, then runs lm-eval's
own command line)::

    python -m kvcompress.lm_eval --model kvcompress \\
        --model_args pretrained=DIR,method=snapkv,ratio=0.25 --tasks TASK --device cpu --batch_size 1

or from Python (importing this module registers the model)::

    import lm_eval, kvcompress.lm_eval
    lm = kvcompress.lm_eval.KVCompressLM(pretrained=DIR, method="streaming", ratio=0.5, device="cpu")
    lm_eval.simple_evaluate(model=lm, tasks=[...])          # or model="kvcompress", model_args="pretrained=..."

``--model_args``: ``pretrained`` and every other ``HFLM`` argument, plus ``method`` (a name or ``a+b``; default
``full``), ``ratio`` (fraction kept), ``budget`` (tokens), and method parameters as ``<method>.<field>=value``
(``method=streaming,streaming.sink=8``). A bad method/ratio/parameter stops with a one-line ``KVCompressError``
before the model is loaded. Put ``device`` on the command line (``--device cpu``), not in ``--model_args``.
``heads`` / ``adaptive_heads`` get their per-model retrieval-head scores computed on first use, as in the run CLI.

How requests use the cache (every request gets a fresh cache from ``kvcompress.compress``; ``last_cache`` keeps the
last one for a memory report):

* **generate_until**: the whole prompt is prefilled into the compressed cache (compression happens at the end of
  that prefill, so it is query-aware: the question is part of the prompt) and decoding continues against it, as in
  ``model.generate(..., cache=cache)``, with ``max_new_tokens`` set to lm-eval's ``max_gen_toks`` (a
  model's ``generation_config.max_new_tokens`` would otherwise override lm-eval's ``max_length``).
* **loglikelihood** (``multiple_choice``, ``loglikelihood`` tasks): lm-eval would score context + continuation in
  one plain forward, where nothing gets compressed. Here each request is split: the **context** tokens are
  prefilled into a compressed cache (one forward; the compressor runs at its end), then the **continuation**
  tokens (all but the last, teacher-forced) are run in a second forward with ``q_len > 1`` against the compressed
  cache, uncompressed themselves. The first continuation token's log-prob comes from the prefill forward (which
  attends to the whole context, exactly like the first generated token under ``generate``); every later one
  attends to the compressed context plus the continuation so far. So a continuation's log-likelihood is the
  teacher-forced probability of generating it with the compressed cache.
* **loglikelihood_rolling** (perplexity) goes through the same path window by window, but lm-eval's windows have
  a one-token context, so there is almost nothing to compress: rolling perplexities are effectively uncompressed.

Batching: loglikelihood requests always run one at a time (each has its own context/continuation split; lm-eval's
"same context" logits sharing is therefore not used). ``generate_until`` with ``batch_size > 1`` left-pads the
batch; compressed rows with padding may differ from their batch-1 results (a warning says so). Use
``--batch_size 1`` for reported numbers.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Any

import torch
from tqdm import tqdm

from .compat import cache_arg

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError as _err:  # lm-eval is an optional dependency (the `eval` extra)
    raise ImportError(f"kvcompress.lm_eval needs lm-eval>=0.4.13: pip install 'kvcompress[eval]' ({_err})") from _err

import kvcompress

from .api import build_pipeline, prepare
from .errors import KVCompressError
from .registry import BASELINE

MODEL_NAME = "kvcompress"


class KVCompressLM(HFLM):
    """``HFLM`` with a kvcompress pipeline attached; see the module docstring for the request semantics."""

    def __init__(
        self,
        pretrained: Any,
        method: str = BASELINE,
        ratio: float | None = None,
        budget: int | None = None,
        params: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        method_params = copy.deepcopy(dict(params or {}))
        for key in [k for k in kwargs if "." in k]:  # <method>.<field>=value from --model_args
            name, _, field = key.partition(".")
            method_params.setdefault(name, {})[field] = kwargs.pop(key)
        pipeline = build_pipeline(str(method), ratio=ratio, budget=budget, params=copy.deepcopy(method_params))
        self.kvc_method = str(method)
        self.kvc_ratio = None if ratio is None else float(ratio)
        self.kvc_budget = budget
        self.kvc_params = method_params
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise KVCompressError(f"model backend {self.backend!r} is not supported; valid: causal")
        kvcompress.attach(self.model)
        prepare(self.model, pipeline, self.tokenizer)  # per-model set-up (head scores, low-rank bases), as the run CLI
        self.last_cache: kvcompress.KVCompressCache | None = None
        #: memory totals over every cache finished so far (:meth:`memory_summary`)
        self._kvc_totals = {"caches": 0, "kept_bytes": 0, "dense_bytes": 0, "prefill_fraction_sum": 0.0}
        self._kvc_counted: kvcompress.KVCompressCache | None = None
        self._kvc_cont_len: int | None = None
        self._kvc_warned_batch = False

    # -- cache ----------------------------------------------------------------------------------------------------
    def make_cache(self) -> kvcompress.KVCompressCache:
        cache = kvcompress.compress(
            self.model, self.kvc_method, ratio=self.kvc_ratio, budget=self.kvc_budget,
            params=copy.deepcopy(self.kvc_params), tokenizer=self.tokenizer,
        )
        self._account(self.last_cache)  # the previous request is finished: count what its cache held
        self.last_cache = cache
        return cache

    def _account(self, cache: kvcompress.KVCompressCache | None) -> None:
        if cache is None or cache is self._kvc_counted:  # each cache once
            return
        self._kvc_counted = cache
        report = cache.memory_report()
        if report["empty"]:
            return
        totals = self._kvc_totals
        totals["caches"] += 1
        totals["kept_bytes"] += report["kept_bytes"]
        totals["dense_bytes"] += report["dense_bytes"]
        totals["prefill_fraction_sum"] += report["kept_fraction_prefill"] or 0.0

    def memory_summary(self) -> dict[str, Any]:
        """Over every request evaluated so far: how many caches, the bytes they held and a dense cache would have
        held (at the end of each request), kept / dense, and the mean kept fraction right after each prefill."""
        self._account(self.last_cache)
        totals = self._kvc_totals
        n, dense = totals["caches"], totals["dense_bytes"]
        return {"kvcompress_caches": n, "kvcompress_kept_bytes": totals["kept_bytes"], "kvcompress_dense_bytes": dense,
                "kvcompress_kept_fraction": totals["kept_bytes"] / dense if dense else None,
                "kvcompress_kept_fraction_prefill": totals["prefill_fraction_sum"] / n if n else None}

    def get_model_info(self) -> dict:
        """lm-eval puts this in its results' ``config``: the method, its ratio / budget, and the memory the compressed
        caches held over the whole evaluation (:meth:`memory_summary`)."""
        info = super().get_model_info()
        info.update(kvcompress_method=self.kvc_method, kvcompress_ratio=self.kvc_ratio, kvcompress_budget=self.kvc_budget,
                    **self.memory_summary())
        return info

    # -- generation -----------------------------------------------------------------------------------------------
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if context.shape[0] > 1 and not self._kvc_warned_batch:
            warnings.warn(
                "kvcompress: generate_until with batch_size > 1 left-pads the batch; compressed rows with padding "
                "may differ from batch-1 results (use --batch_size 1 for reported numbers)",
                stacklevel=2,
            )
            self._kvc_warned_batch = True
        generation_kwargs.update(cache_arg(self.make_cache()))
        # lm-eval passes max_length (prompt + max_gen_toks); a model's generation_config.max_new_tokens would
        # override it, so state the new-token budget explicitly.
        generation_kwargs.setdefault("max_new_tokens", max(1, max_length - context.shape[1]))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- loglikelihood --------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """One request at a time, so that ``_model_call`` knows where the continuation starts."""
        out: list[tuple[float, bool]] = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvcompress loglikelihood"):
            self._kvc_cont_len = len(req[2])
            try:
                out.extend(super()._loglikelihood_tokens([req], disable_tqdm=True, override_bs=1))
            finally:
                self._kvc_cont_len = None
        return out

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Context prefill into a compressed cache, then the continuation against it.

        ``inps`` is ``(context + continuation)[:-1]`` (left-truncated to ``max_length``), one row. Returns the
        logits of the positions that predict the continuation tokens, ``(1, n_cont, vocab)``; lm-eval then selects
        the last ``n_cont`` positions, which is all of them.
        """
        n_cont = self._kvc_cont_len
        if n_cont is None or attn_mask is not None or labels is not None or inps.shape[0] != 1:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        length = inps.shape[1]
        split = length - (n_cont - 1)  # context tokens in inps (>= 1, since n_cont <= max_length)
        cache = self.make_cache()
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            first = self.model(inps[:, :split], **cache_arg(cache), use_cache=True, logits_to_keep=1).logits
            if split == length:
                return first
            with cache.paused():  # a continuation: appended uncompressed (a compressing cache refuses it otherwise)
                rest = self.model(inps[:, split:], **cache_arg(cache), use_cache=True).logits
        return torch.cat([first, rest], dim=1)


def register() -> None:
    """Register ``KVCompressLM`` as lm-eval model ``kvcompress`` (idempotent)."""
    model_registry.register(MODEL_NAME)(KVCompressLM)


if __name__ == "kvcompress.lm_eval":
    register()


def main(argv: list[str] | None = None) -> None:
    """``python -m kvcompress.lm_eval <lm-eval arguments>``: lm-eval's CLI with the ``kvcompress`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        check_arguments(sys.argv[1:])
        cli_evaluate()
    except KVCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:  # lm-eval's own checks of its arguments, before any model loads
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not first.startswith("Tasks not found"):
            raise
        print(f"error: lm-eval: {first}; valid: task names of `lm_eval ls tasks` (or --include_path DIR)",
              file=sys.stderr)
        sys.exit(2)


def check_arguments(argv: list[str]) -> None:
    """Check ``--model_args`` of ``--model kvcompress`` before lm-eval loads anything: the method, its ratio /
    budget / parameters (as the model's constructor will), and a local ``pretrained`` directory."""
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("--model", "--model_args") and (eq or i + 1 < len(argv)):
            values[flag] = value if eq else argv[i + 1]
    if values.get("--model") != MODEL_NAME or "--model_args" not in values:
        return
    from lm_eval.utils import simple_parse_args_string

    from .constraints import ModelDir, check_value

    args = simple_parse_args_string(values["--model_args"])
    params: dict[str, dict[str, Any]] = {}
    for key in [k for k in args if "." in k]:
        name, _, field = key.partition(".")
        params.setdefault(name, {})[field] = args.pop(key)
    build_pipeline(str(args.get("method", BASELINE)), ratio=args.get("ratio"), budget=args.get("budget"),
                   params=params)
    pretrained = str(args.get("pretrained", ""))
    if pretrained.startswith((".", "/", "~")):
        check_value("pretrained", pretrained, ModelDir())


if __name__ == "__main__":
    from kvcompress.lm_eval import main as _main  # the importable module owns the registered class

    _main()
