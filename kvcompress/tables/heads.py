"""``paper_tables/heads.md``: head-axis compression on the constructed testbed — ``heads`` vs the ``heads_random``
control (mean over seeds) vs ``adaptive_heads``, per kept ratio. Rows: ``python -m kvcompress.sweep heads``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import distractors, footer, latest, mean_kept, param
from .render import markdown

SWEEP = "python -m kvcompress.sweep heads"


def _full_heads(row: dict[str, Any]) -> set[tuple[int, int]]:
    """(layer, KV head) pairs the first sample's cache held in full (at least the prompt's tokens)."""
    prompt = row["samples"][0]["meta"]["tokens"]
    kept = row["memory"]["kept_tokens"]
    return {(layer, h) for layer, counts in enumerate(kept) for h, n in enumerate(counts) if n >= prompt}


def _line(method: str, ratio: float, rows: list[dict[str, Any]], expected: float | None = None,
          retrieval: tuple[int, int] | None = None) -> dict[str, Any]:
    accuracy = [r["accuracy"]["exact_match"] for r in rows]
    line = {"method": method, "ratio": ratio, "accuracy": sum(accuracy) / len(accuracy),
            "kept_fraction": sum(mean_kept(r) for r in rows) / len(rows)}
    if expected is not None:
        line.update(per_seed=accuracy, expected=expected, draws=sum(retrieval in _full_heads(r) for r in rows))
    return line


def render(rows: list[dict[str, Any]]) -> str:
    from kvcompress.methods.head.heads import heads_to_keep
    from kvcompress.zoo.testbed import RETRIEVAL_KV_HEADS

    rows = [r for r in latest(rows) if r.get("task") == "needle"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    full = by_method["full"][-1]
    kept_tokens = full["memory"]["kept_tokens"]
    total = len(kept_tokens) * len(kept_tokens[0])
    retrieval = tuple(RETRIEVAL_KV_HEADS[0])
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "full"}, reverse=True)
    lines_out = [_line("full", 1.0, [full])]
    seeds = 0
    for ratio in ratios:
        for method in ("heads", "heads_random", "adaptive_heads"):
            group = sorted((r for r in by_method.get(method, []) if r["ratio"] == ratio),
                           key=lambda r: param(r, method, "seed", 0))
            if not group:
                continue
            if method == "heads_random":
                seeds = len(group)
                lines_out.append(_line(method, ratio, group, heads_to_keep(ratio, total) / total, retrieval))
            else:
                lines_out.append(_line(method, ratio, group[-1:]))
    heads_row = by_method["heads"][-1]
    state = heads_row["method_state"]["heads"]
    artifact, order = state["artifact"], [tuple(x) for x in state["order"]]
    probes = artifact["probes"]
    lengths, depths = full["config"]["eval"]["lengths"], full["config"]["eval"]["depths"]
    rounding = ", ".join(f"{r:g} -> {heads_to_keep(r, total)} of {total}" for r in ratios)
    sink, recent = param(heads_row, "heads", "sink"), param(heads_row, "heads", "recent")
    lines = [
        "# Head-axis compression: needle accuracy on the constructed testbed",
        "",
        f"Model: constructed testbed ({len(kept_tokens)} layers x {len(kept_tokens[0])} KV heads = {total} KV "
        "heads; hand-set weights, not trained — the numbers show whether a method keeps what a known retrieval "
        "circuit needs, not how a learned LLM would score).",
        f"Task: needle `{full['accuracy']['template']}`, {distractors(full)}, exact match; lengths {lengths}, depths "
        f"{depths} ({full['accuracy']['samples']} samples per row). `heads_random`: mean over {seeds} seeds.",
        f"Detection ({artifact['primary']} score, {probes['correct']}/{probes['count']} probes "
        f"answered): top KV heads (layer, head) {order[:3]} — ground truth: retrieval head on KV head {retrieval}.",
        f"`ratio` = fraction of KV heads kept in full, rounded up to whole heads ({rounding}); "
        f"window heads keep {sink} sink + {recent} recent tokens. `adaptive_heads`: the same ratio as a per-row token "
        "budget spread over heads by score. Kept fraction = kept bytes / dense bytes at the end of generation (mean "
        "over samples).",
        "",
        (
            "`heads_random` answers a prompt only when its draw holds the retrieval KV head in full (the needle lies "
            f"outside the window heads' {sink + recent} tokens; no other head needs it), so its expected accuracy is "
            "the chance that k random heads of the total include it, k / total; `draws` = seeds whose draw held it."
        ),
        "",
    ]
    body = []
    for r in lines_out:
        per_seed = " ".join(f"{a:.1f}" for a in r.get("per_seed", [])) or "—"
        expected = f"{100 * r['expected']:.1f}" if "expected" in r else "—"
        draws = f"{r['draws']}/{len(r['per_seed'])}" if "per_seed" in r else "—"
        body.append([r["method"], f"{r['ratio']:g}", f"{100 * r['accuracy']:.1f}", expected,
                     f"{r['kept_fraction']:.3f}", per_seed, draws])
    header = ["method", "ratio", "needle accuracy", "expected (k / total)", "kept fraction", "per seed", "draws"]
    text = "\n".join(lines) + "\n" + markdown(header, body)
    return text + "\n" + footer("heads", rows, SWEEP) + "\n"


def write(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    path = out / "heads.md"
    path.write_text(render(rows), encoding="utf-8")
    return [path]
