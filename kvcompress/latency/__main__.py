"""CLI: ``python -m kvcompress.latency [table] [key=value ...]``.

Examples::

    python -m kvcompress.latency model=yi-34b-200k context=50000 hardware=a100-80gb
    python -m kvcompress.latency model=llama-3.1-8b context=4K,32K,128K tp=1,2 token_fraction=0.25
    python -m kvcompress.latency sweep=context            # 4K … 1M
    python -m kvcompress.latency sweep=tp context=50K     # TP 1, 2, 4, 8
    python -m kvcompress.latency table [out=paper_tables] # regenerate paper_tables/fu2024.{md,tex}

Keys: model, hardware, context, output, users, tp, efficiency, convention, sweep, out, and the compression
factors of :meth:`CompressionProfile.uniform`: token_fraction, head_fraction, layer_fraction, rank_fraction,
key_bits, value_bits, group_size. ``context`` and ``tp`` take comma lists; "50K" = 50,000.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import KVCompressError, unknown_choice
from .metrics import CONVENTIONS, Workload, estimate, parse_tokens
from .model_profile import load_model_profile
from .profile import CompressionProfile

SWEEP_CONTEXTS = "4K,8K,16K,32K,50K,100K,200K,500K,1M"
SWEEP_TP = "1,2,4,8"
_FLOAT_KEYS = ("token_fraction", "head_fraction", "layer_fraction", "rank_fraction", "key_bits", "value_bits")
_KEYS = ("model", "hardware", "context", "output", "users", "tp", "efficiency", "convention", "sweep", "out",
         "group_size", *_FLOAT_KEYS)

_ROWS = [("KV per user (GiB)", "kv_gib", 3), ("decode bytes/step (GB)", "decode_bytes_per_step", 2),
         ("users that fit", "users_fit", 2), ("concurrency", "concurrency", 0), ("prefill (s)", "prefill_s", 3),
         ("decode (s)", "decode_s", 3), ("decode (ms/token)", "decode_ms_per_token", 2),
         ("context switch (s)", "context_switch_s", 3), ("throughput (tok/s)", "session_throughput_tok_s", 2),
         ("throughput at capacity (tok/s)", "capacity_throughput_tok_s", 2)]

_RATIO_OF = {"users_fit": "concurrency", "kv_gib": "kv_bytes", "decode_ms_per_token": "decode_s"}


def _parse(argv: Sequence[str]) -> tuple[bool, dict[str, str]]:
    table, args = False, {}
    for item in argv:
        if item == "table":
            table = True
            continue
        if "=" not in item:
            raise KVCompressError(f"argument {item!r} is not key=value; valid keys: {', '.join(_KEYS)}")
        key, value = item.lstrip("+").split("=", 1)
        if key not in _KEYS:
            raise unknown_choice("option", key, _KEYS)
        args[key] = value
    return table, args


def _int(args: dict[str, str], key: str, default: int) -> int:
    try:
        return int(args.get(key, default))
    except ValueError:
        raise KVCompressError(f"{key}={args[key]!r} is not an integer; valid: an integer >= 1") from None


def _fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return f"{value / scale:,.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a bad input, with a one-line message on stderr)."""
    try:
        table, args = _parse(sys.argv[1:] if argv is None else argv)
        if table:
            from .tables import write_tables

            for path in write_tables(args.get("out")):
                print(path)
            return 0
        sweep = args.get("sweep")
        if sweep not in (None, "context", "tp"):
            raise unknown_choice("sweep", sweep, ("context", "tp"))
        contexts = [parse_tokens(c) for c in args.get("context", SWEEP_CONTEXTS if sweep == "context" else "50K")
                    .split(",")]
        tps = [_int({"tp": t}, "tp", 1) for t in args.get("tp", SWEEP_TP if sweep == "tp" else "1").split(",")]
        convention = args.get("convention", "exact")
        if convention not in CONVENTIONS:
            raise unknown_choice("convention", convention, CONVENTIONS)
        model = load_model_profile(args.get("model", "yi-34b-200k"))
        factors = {}
        for k in _FLOAT_KEYS:
            if k in args:
                try:
                    factors[k] = float(args[k])
                except ValueError:
                    raise KVCompressError(f"{k}={args[k]!r} is not a number") from None
        if "group_size" in args:
            factors["group_size"] = _int(args, "group_size", 0)
        reports = []
        for n in contexts:
            for tp in tps:
                wl = Workload(n, _int(args, "output", 250), _int(args, "users", 1), tp)
                comp = CompressionProfile.uniform(model, n, **factors) if factors else None
                reports.append(estimate(model, args.get("hardware", "a100-80gb"), wl, compression=comp,
                                        efficiency=args.get("efficiency", "peak"), convention=convention))
        print(_render(reports, bool(factors)))
        return 0
    except KVCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


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
