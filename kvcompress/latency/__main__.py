"""CLI: ``python -m kvcompress.latency [table] [key=value ...]`` (Hydra overrides, like ``python -m kvcompress.run``).

Examples::

    python -m kvcompress.latency model=yi-34b-200k context=50000 hardware=a100-80gb
    python -m kvcompress.latency model=llama-3.1-8b context=[4K,32K,128K] tp=[1,2] token_fraction=0.25
    python -m kvcompress.latency sweep=context            # 4K … 1M
    python -m kvcompress.latency sweep=tp context=50K     # TP 1, 2, 4, 8
    python -m kvcompress.latency table [out=paper_tables] # regenerate paper_tables/fu2024.{md,tex}

Options and their defaults: ``configs/latency/estimate.yaml`` (``table``: ``configs/latency/table.yaml``), printed
by ``--help``: model, hardware, context, output, users, tp, efficiency, convention, sweep, and the compression
factors of :meth:`CompressionProfile.uniform`: token_fraction, head_fraction, layer_fraction, rank_fraction,
key_bits, value_bits, group_size. ``context`` and ``tp`` take one value or a list; "50K" = 50,000.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ..cli import Command, fail
from ..cli import main as cli_main
from ..errors import KVCompressError, unknown_choice
from .metrics import CONVENTIONS, Workload, estimate, parse_tokens
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
    model = load_model_profile(str(cfg.model))
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
                                    convention=cfg.convention))
    print(_render(reports, bool(factors)))
    return 0


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
        .tex."""),
    "table": Command("latency/table", table_command, """Regenerate fu2024.md and fu2024.tex (Fu 2024's running
        example recomputed with this library, the paper's published figures beside them) into `out` (default: the
        repository's paper_tables/)."""),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a bad input, with a one-line message on stderr)."""
    try:
        status = cli_main("python -m kvcompress.latency", COMMANDS, sys.argv[1:] if argv is None else argv,
                          default="estimate")
    except KVCompressError as err:
        return fail(err)
    return 0 if status is None else int(status)


def _render(reports: list, compressed: bool) -> str:
    r0 = reports[0]
    head = (f"model={r0.model} hardware={r0.hardware} efficiency={r0.efficiency} convention={r0.convention} "
            f"output={r0.workload.output_tokens} users={r0.workload.users}")
    if compressed:
        head += f"  kept bytes={r0.kept_fractions['bytes']:.4f}"
    lines = [head]
    if len(reports) == 1:
        cols = ["metric", "baseline"] + (["compressed", "ratio"] if compressed else [])
        lines.append(f"context={r0.workload.context:,} tp={r0.workload.tp}")
        rows = []
        for label, key, digits in _ROWS:
            scale = 1e9 if key == "decode_bytes_per_step" else 1.0
            row = [label, _fmt(getattr(r0.baseline, key), digits, scale)]
            if compressed:
                ratio = r0.ratios.get(_RATIO_OF.get(key, key))
                row += [_fmt(getattr(r0.metrics, key), digits, scale), "" if ratio is None else f"{ratio:.3f}"]
            rows.append(row)
    else:
        cols = ["context", "tp"] + [label for label, _, _ in _ROWS if label != "concurrency"]
        rows = [[f"{r.workload.context:,}", str(r.workload.tp)]
                + [_fmt(getattr(r.metrics, key), digits, 1e9 if key == "decode_bytes_per_step" else 1.0)
                   for label, key, digits in _ROWS if label != "concurrency"] for r in reports]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
