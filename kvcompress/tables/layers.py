"""``paper_tables/layers.md``: layer-axis compression on the constructed testbed — ``layers`` with each importance
score vs the random-layer control, and ``share`` (MiniCache) vs random token eviction at the same kept fraction.
Rows: ``python -m kvcompress.sweep layers`` (its last step, :func:`same_memory_controls`, derives the
controls' ratios from the ``share`` rows)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .common import distractors, footer, latest, mean_kept, param, sample_state
from .render import markdown

SWEEP = "python -m kvcompress.sweep layers"
#: Importance scores in the order the table lists them (the random control follows them).
SCORES = ("lazy", "cosine", "first", "last", "every_k")


def control_ratio(share_row: dict[str, Any]) -> float:
    """The ratio of the same-memory control of a ``share`` row: its mean kept fraction, capped at 1."""
    return min(1.0, mean_kept(share_row))


def same_memory_controls(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Runs of the sweep's derived step: ``random`` token eviction at each ``share`` row's kept fraction."""
    ratios = sorted({control_ratio(r) for r in latest(rows) if r["method"] == "share"}, reverse=True)
    return [["method=random", f"ratio={ratio!r}"] for ratio in ratios]


def _choices(row: dict[str, Any]) -> dict[str, int]:
    """How often each choice was made over the samples: kept layers (``layers``) or merged pairs (``share``)."""
    counts: Counter = Counter()
    for i in range(len(row.get("samples") or [])):
        state = sample_state(row, i).get(row["method"], {})
        if "kept_layers" in state:
            counts[str(state["kept_layers"][0])] += 1
        if "merged_pairs" in state:
            counts[str(state["merged_pairs"])] += 1
    return dict(counts)


def _line(method: str, setting: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    choices: Counter = Counter()
    for r in rows:
        choices.update(_choices(r))
    accuracy = [r["accuracy"]["exact_match"] for r in rows]
    line = {"method": method, "setting": setting, "ratio": rows[0]["ratio"],
            "accuracy": sum(accuracy) / len(accuracy), "kept_fraction": sum(mean_kept(r) for r in rows) / len(rows),
            "choices": dict(choices), "prefill_saving": rows[-1]["memory"].get("prefill_saving", "memory-only")}
    if len(rows) > 1:
        line["per_seed"] = accuracy
    return {**line, **extra}


def reading(lines: list[dict[str, Any]], num_layers: int, retrieval_layer: int) -> str:
    """What the lines show, derived from them: which single-layer choices kept the retrieval layer and how they
    scored, and how `share` compares with the same-memory random-token control."""
    single = [r for r in lines if r["method"] == "layers" and round(r["ratio"] * num_layers) == 1 and "per_seed" not in r]
    hit = [r for r in single if all(retrieval_layer in json.loads(k) for k in r["choices"])]
    miss = [r for r in single if r not in hit]
    name = lambda r: r["setting"].split(",")[0].removeprefix("score=")  # noqa: E731
    parts = [
        f"With one kept layer, the scores that kept layer {retrieval_layer} (the retrieval layer) in every sample — "
        + (", ".join(f"`{name(r)}` ({100 * r['accuracy']:.0f}%)" for r in hit) or "none")
        + "; the others — " + (", ".join(f"`{name(r)}` ({100 * r['accuracy']:.0f}%)" for r in miss) or "none") + "."
    ]
    shares = [r for r in lines if r["method"] == "share"]
    controls = {r["control_of"]: r for r in lines if "control_of" in r}
    better = [r for r in shares if r["setting"] in controls and r["accuracy"] > controls[r["setting"]]["accuracy"]]
    parts.append(f"`share` beats random token eviction at the same kept fraction in {len(better)} of {len(shares)} settings.")
    return " ".join(parts)


def render(rows: list[dict[str, Any]]) -> str:
    from kvcompress.zoo.testbed import RETRIEVAL_KV_HEADS

    rows = [r for r in latest(rows) if r.get("task") == "needle"]
    full = [r for r in rows if r["method"] == "full"][-1]
    num_layers = len(full["memory"]["kept_tokens"])
    layer_rows = [r for r in rows if r["method"] == "layers"]
    lines = [_line("full", "-", [full])]
    seeds = 0
    for ratio in sorted({r["ratio"] for r in layer_rows}):
        kept = round(ratio * num_layers)
        at = [r for r in layer_rows if r["ratio"] == ratio]
        for score in SCORES:
            group = [r for r in at if param(r, "layers", "score") == score]
            if group:
                lines.append(_line("layers", f"score={score}, {kept}/{num_layers} layers", group[-1:]))
        control = sorted((r for r in at if param(r, "layers", "score") == "random"), key=lambda r: param(r, "layers", "seed"))
        if control:
            seeds = len(control)
            lines.append(_line("layers", f"score=random (control), {kept}/{num_layers} layers", control,
                               prefill_saving="memory-only"))
    randoms = [r for r in rows if r["method"] == "random"]
    shares = sorted((r for r in rows if r["method"] == "share"),
                    key=lambda r: (param(r, "share", "start") != num_layers // 2, param(r, "share", "start") or 0,
                                   -param(r, "share", "retain")))
    for share in shares:
        setting = (f"start={param(share, 'share', 'start')}, retain={param(share, 'share', 'retain'):g}, "
                   f"t={param(share, 'share', 't'):g}")
        lines.append(_line("share", setting, [share]))
        ratio = control_ratio(share)
        control = [r for r in randoms if abs(r["ratio"] - ratio) <= 1e-12]
        if control:
            lines.append(_line("random (control)", f"ratio = share's kept fraction ({setting})", control[-1:],
                               control_of=setting))
    first_layers = layer_rows[0] if layer_rows else full
    sink, window = param(first_layers, "layers", "sink"), param(first_layers, "layers", "window")
    lengths, depths = full["config"]["eval"]["lengths"], full["config"]["eval"]["depths"]
    saving = sorted({f"{r['method']}: {r['prefill_saving']}" for r in lines if r["method"] in ("layers", "share")})
    text = [
        "# Layer-axis compression: needle accuracy on the constructed testbed",
        "",
        f"Model: constructed testbed ({num_layers} layers x {len(full['memory']['kept_tokens'][0])} KV heads; "
        "hand-set weights, not trained). Ground truth: the retrieval (induction) head is in layer 1; layer 0's "
        "previous-token heads only need the last two tokens while decoding; layer 2 is filler. The numbers show "
        "whether a layer score finds the layer a known circuit needs, not how a learned LLM would score.",
        f"Task: needle `{full['accuracy']['template']}`, {distractors(full)}, exact match, question inside the "
        f"compressed prompt; lengths {lengths}, depths {depths} ({full['accuracy']['samples']} samples per row).",
        f"`layers`: full context in k of {num_layers} layers (ratio = k/{num_layers}), the others keep {sink} sink + "
        f"{window} recent tokens. Random-layer control: mean over {seeds} seeds. `share` (MiniCache): pairs from "
        "`start` (default L//2 = 1: pair (1, 2); start=0: pair (0, 1), layer 2 alone), SLERP t = 0.6, `retain` = "
        "fraction of tokens kept unmerged. Kept fraction = kept bytes / dense bytes (measured from stored tensors) at "
        "the end of generation (mean over samples).",
        "Prefill saving (as each method declares it, the rows' `memory.prefill_saving`): " + "; ".join(saving)
        + ". `random (control)` rows: uniform random token eviction at the kept fraction of the `share` row above.",
        "",
    ]
    body = []
    for r in lines:
        choices = ", ".join(f"{k}: {v}" for k, v in sorted(r["choices"].items())) or "—"
        if "per_seed" in r:
            choices += "; per seed: " + " ".join(f"{100 * a:.0f}" for a in r["per_seed"])
        body.append([r["method"], r["setting"], f"{100 * r['accuracy']:.1f}", f"{r['kept_fraction']:.3f}", choices])
    header = ["method", "setting", "needle accuracy (%)", "kept fraction", "layers kept / pairs merged (samples)"]
    return ("\n".join(text) + "\n" + markdown(header, body) + "\n"
            + "Reading: " + reading(lines, num_layers, RETRIEVAL_KV_HEADS[0][0]) + "\n\n" + footer("layers", rows, SWEEP) + "\n")


def write(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    path = out / "layers.md"
    path.write_text(render(rows), encoding="utf-8")
    return [path]
