"""CLI: ``python -m kvcompress.latency [table] [key=value ...]`` (Hydra overrides, like ``python -m kvcompress.run``).

Examples::

    python -m kvcompress.latency model=yi-34b-200k context=50000 hardware=a100-80gb
    python -m kvcompress.latency model=llama-3.1-8b context=[4K,32K,128K] tp=[1,2] token_fraction=0.25
    python -m kvcompress.latency sweep=context            # 4K … 1M
    python -m kvcompress.latency sweep=tp context=50K     # TP 1, 2, 4, 8
    python -m kvcompress.latency table [out=paper_tables] # regenerate paper_tables/fu2024.{md,tex}
    python -m kvcompress.latency ... format=json          # the full result of every row as JSON

Options and their defaults: ``configs/latency/estimate.yaml`` (``table``: ``configs/latency/table.yaml``), printed
by ``--help``: model, hardware, context, output, users, tp, efficiency, convention, format, sweep, the serving
options of :class:`Serving` (memory_utilization, activation_reserve, weight_dtype, kv_dtype, prefix_tokens,
tp_communication) and the compression factors of :meth:`CompressionProfile.uniform`: token_fraction,
head_fraction, layer_fraction, rank_fraction, key_bits, value_bits, group_size. ``context`` and ``tp`` take one
value or a list; "50K" = 50,000. A model that does not fit shows "does not fit" (and why) instead of throughputs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ..cli import Command, fail
from ..cli import main as cli_main
from ..errors import KVCompressError, unknown_choice
from . import options
from .metrics import CONVENTIONS, Serving, Workload, estimate, parse_tokens
from .model_profile import load_model_profile
from .profile import CompressionProfile

_FLOAT_KEYS = ("token_fraction", "head_fraction", "layer_fraction", "rank_fraction", "key_bits", "value_bits")

_ROWS = [("KV per user (GiB)", "kv_gib", 3), ("decode bytes/step (GB)", "decode_bytes_per_step", 2),
         ("users that fit", "users_fit", 2), ("concurrency", "concurrency", 0), ("prefill (s)", "prefill_s", 3),
         ("decode (s)", "decode_s", 3), ("decode (ms/token)", "decode_ms_per_token", 2),
         ("context switch (s)", "context_switch_s", 3), ("throughput (tok/s)", "session_throughput_tok_s", 2),
         ("throughput at capacity (tok/s)", "capacity_throughput_tok_s", 2)]

_RATIO_OF = {"users_fit": "concurrency", "kv_gib": "kv_bytes", "decode_ms_per_token": "decode_s"}


def _values(value: Any) -> list[Any]:
    """One value or a list of them (a quoted comma list ``'4K,32K'`` too)."""
    if isinstance(value, str):
        return value.split(",")
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise KVCompressError(f"{key}={value!r} is not an integer; valid: an integer >= 1")
    try:
        return int(str(value))
    except ValueError:
        raise KVCompressError(f"{key}={value!r} is not an integer; valid: an integer >= 1") from None


def _fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return f"{value / scale:,.{digits}f}"


def estimate_command(cfg: Any) -> int:
    """The metrics table of ``configs/latency/estimate.yaml`` + overrides."""
    sweeps = cfg.sweeps or {}
    sweep = cfg.sweep
    if sweep is not None and sweep not in sweeps:
        raise unknown_choice("sweep", sweep, list(sweeps))
    context = cfg.context if cfg.context is not None else (sweeps["context"] if sweep == "context" else "50K")
    tp = cfg.tp if cfg.tp is not None else (sweeps["tp"] if sweep == "tp" else 1)
    contexts = [parse_tokens(c) for c in _values(context)]
    tps = [_int("tp", t) for t in _values(tp)]
    if cfg.convention not in CONVENTIONS:
        raise unknown_choice("convention", cfg.convention, CONVENTIONS)
    if cfg.format not in FORMATS:
        raise unknown_choice("format", cfg.format, FORMATS)
    model = load_model_profile(str(cfg.model))
    serving = _serving(cfg)
    factors: dict[str, Any] = {}
    for k in _FLOAT_KEYS:
        if cfg[k] is not None:
            try:
                factors[k] = float(cfg[k])
            except (TypeError, ValueError):
                raise KVCompressError(f"{k}={cfg[k]!r} is not a number; valid: a number") from None
    if cfg.group_size is not None:
        factors["group_size"] = _int("group_size", cfg.group_size)
    reports = []
    for n in contexts:
        for t in tps:
            wl = Workload(n, _int("output", cfg.output), _int("users", cfg.users), t)
            comp = CompressionProfile.uniform(model, n, **factors) if factors else None
            reports.append(estimate(model, str(cfg.hardware), wl, compression=comp, efficiency=str(cfg.efficiency),
                                    convention=cfg.convention, serving=serving))
    if cfg.format == "json":
        print(json.dumps([r.to_dict() for r in reports], indent=1, allow_nan=False, default=_json_number))
    else:
        print(_render(reports, bool(factors)))
    return 0


FORMATS = ("table", "json")


def _json_number(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _serving(cfg: Any) -> Serving:
    """The :class:`Serving` options of the command line (one-line errors for bad values)."""
    def number(key: str) -> float:
        try:
            return float(cfg[key])
        except (TypeError, ValueError):
            raise KVCompressError(f"{key}={cfg[key]!r} is not a number; valid: a number") from None

    reserve = cfg.activation_reserve
    reserve = "auto" if str(reserve) == "auto" else number("activation_reserve")
    if not isinstance(cfg.tp_communication, bool):
        raise KVCompressError(f"tp_communication={cfg.tp_communication!r} is invalid; valid: true or false")
    return Serving(memory_utilization=number("memory_utilization"), activation_reserve=reserve,
                   weight_dtype=None if cfg.weight_dtype is None else str(cfg.weight_dtype),
                   kv_dtype=None if cfg.kv_dtype is None else str(cfg.kv_dtype),
                   prefix_tokens=parse_tokens(cfg.prefix_tokens), tp_communication=cfg.tp_communication)


def table_command(cfg: Any) -> int:
    """Regenerate ``fu2024.md`` / ``fu2024.tex`` into ``out`` (default: the repository's ``paper_tables/``)."""
    from .fu2024 import write_tables

    for path in write_tables(cfg.out):
        print(path)
    return 0


COMMANDS = {
    "estimate": Command("latency/estimate", estimate_command, """Fu 2024's serving metrics (KV bytes per user, users
        that fit, prefill, decode and context-switch time, throughput) of a model on a GPU type, for one context or a
        list (sweep=context: 4K ... 1M; sweep=tp: 1, 2, 4, 8 GPUs), uncompressed or with the kept fractions and bits
        of a compressed cache (token_fraction=0.25, key_bits=4, ...). `table` regenerates paper_tables/fu2024.md and
        .tex.""", constraints=options.ESTIMATE),
    "table": Command("latency/table", table_command, """Regenerate fu2024.md and fu2024.tex (Fu 2024's running
        example recomputed with this library, the paper's published figures beside them) into `out` (default: the
        repository's paper_tables/).""", constraints=options.TABLE),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a bad input, with a one-line message on stderr)."""
    try:
        status = cli_main("python -m kvcompress.latency", COMMANDS, sys.argv[1:] if argv is None else argv,
                          default="estimate")
    except KVCompressError as err:
        return fail(err)
    return 0 if status is None else int(status)


def _cell(value: Any, digits: int, scale: float = 1.0) -> str:
    return "does not fit" if value is None else _fmt(value, digits, scale)


def _render(reports: list, compressed: bool) -> str:
    r0 = reports[0]
    sv = r0.serving
    head = (f"model={r0.model} hardware={r0.hardware} efficiency={r0.efficiency} convention={r0.convention} "
            f"output={r0.workload.output_tokens} users={r0.workload.users} weights={sv['weight_dtype']} "
            f"kv={sv['kv_dtype']} matmuls={sv['flops_format']}")
    if r0.convention == "exact":
        head += (f" memory_utilization={sv['memory_utilization']:g} reserve={sv['activation_reserve_bytes'] / 1e9:.2f}"
                 f"GB/GPU prefix={sv['prefix_tokens']} tp_comm={'on' if sv['tp_communication'] else 'off'}")
    if compressed:
        head += f"  kept bytes={r0.kept_fractions['bytes']:.4f}"
    lines = [head]
    if len(reports) == 1:
        cols = ["metric", "baseline"] + (["compressed", "ratio"] if compressed else [])
        lines.append(f"context={r0.workload.context:,} tp={r0.workload.tp}")
        rows = []
        for label, key, digits in _ROWS:
            scale = 1e9 if key == "decode_bytes_per_step" else 1.0
            row = [label, _cell(getattr(r0.baseline, key), digits, scale)]
            if compressed:
                ratio = r0.ratios.get(_RATIO_OF.get(key, key))
                row += [_cell(getattr(r0.metrics, key), digits, scale), "" if ratio is None else f"{ratio:.3f}"]
            rows.append(row)
        rows.append(["fits", r0.baseline.fit] + ([r0.metrics.fit, ""] if compressed else []))
    else:
        cols = ["context", "tp"] + [label for label, _, _ in _ROWS if label != "concurrency"] + ["fits"]
        rows = [[f"{r.workload.context:,}", str(r.workload.tp)]
                + [_cell(getattr(r.metrics, key), digits, 1e9 if key == "decode_bytes_per_step" else 1.0)
                   for label, key, digits in _ROWS if label != "concurrency"]
                + ["fits" if r.metrics.fits else "does not fit"] for r in reports]
    if len(reports) == 1:  # the fit line holds a sentence: leave it out of the column widths
        body, fit_row = rows[:-1], rows[-1]
    else:
        body, fit_row = rows, None
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in body]
    if fit_row is not None:
        lines += [f"{'fits':>{widths[0]}}  {name}: {text}" for name, text in zip(cols[1:], fit_row[1:]) if text]
    else:
        lines += [f"{r.workload.context:,} tokens, tp={r.workload.tp}: {r.metrics.fit}" for r in reports
                  if not r.metrics.fits]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
