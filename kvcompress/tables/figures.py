"""The method table's figures (``python -m kvcompress.tables methods``): accuracy vs kept fraction with the Pareto
front and bootstrap intervals, and one needle heatmap for all configurations. PNG at 300 dpi plus vector PDF, at
single-column width, without timestamps (same rows → byte-identical files)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .methods import ACCURACY_COLUMNS, _params, _sort_key, _tasks, headline

#: Pareto-plot markers and line styles of the methods within a family (the family sets the colour)
MARKERS = ("o", "s", "^", "v", "D", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
#: Labelled kept-fraction ticks of the Pareto plot's log axis.
LOG_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)



#: Figure text sizes (points) and the single-column width they are readable at (inches)
FONT, SMALL, COLUMN_WIDTH = 8, 7, 3.3
#: One colour per method family (its axes), markers cycle within a family
AXIS_COLORS = {"none": "#4d4d4d", "token": "#1f77b4", "head": "#d62728", "layer": "#2ca02c", "hidden": "#9467bd",
               "composition": "#8c564b"}  # methods composed across axes
#: Bootstrap resamples of a row's per-sample scores for the 95% interval, and the generator's seed
BOOTSTRAP, BOOTSTRAP_SEED = 1000, 0


def _save(fig: Any, png: Path) -> list[Path]:
    """``png`` at 300 dpi and its vector twin ``.pdf``, with no timestamps or software versions (byte-identical
    for the same rows)."""
    pdf = png.with_suffix(".pdf")
    fig.savefig(png, dpi=300, metadata={"Software": None}, bbox_inches="tight")
    fig.savefig(pdf, metadata={"Creator": None, "Producer": None, "CreationDate": None}, bbox_inches="tight")
    return [png, pdf]


def _family(row: dict[str, Any]) -> str:
    from ..registry import REGISTRY

    names = row["method"].split("+")
    return "+".join(sorted({(REGISTRY[n].axis.value if n in REGISTRY and REGISTRY[n].axis else "none") for n in names}))


def sample_interval(row: dict[str, Any], value: float) -> tuple[float, float] | None:
    """95% bootstrap interval of the mean of the row's per-sample scores (:data:`BOOTSTRAP` resamples, fixed seed),
    when those scores average to the plotted headline ``value`` (same metric and scale), else None."""
    import numpy as np

    samples = row.get("samples") or []
    metric = row.get("accuracy", {}).get("sample_metric") or next(
        (k for k in ("exact_match", "all", "token_agreement", "score") if samples and k in samples[0]), None)
    scores = [s.get(metric) for s in samples] if metric else []
    if len(scores) < 2 or not all(isinstance(x, (int, float)) for x in scores):
        return None
    data = np.asarray(scores, dtype=float)
    if abs(data.mean() - value) > 1e-6:
        return None
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(data), (BOOTSTRAP, len(data)))
    means = data[draws].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats (less memory kept and at least the accuracy), by kept fraction."""
    front, best = [], -math.inf
    for kept, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((kept, acc))
            best = acc
    return front


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> list[Path]:
    """Accuracy vs kept fraction, one panel per task (column width each, stacked): one colour per method family
    (its axes), a marker per method, a bootstrap 95% interval over samples where the rows carry them, and the Pareto
    front of all configurations as a grey step line. Writes ``path`` (PNG, 300 dpi) and its PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    series: dict[str, dict[str, list[tuple[float, float, tuple[float, float] | None]]]] = \
        defaultdict(lambda: defaultdict(list))
    family: dict[str, str] = {}
    for row in rows:
        acc = headline(row.get("accuracy", {}))
        if acc is not None:
            family[row["method"]] = _family(row)
            series[str(row.get("task", "?"))][row["method"]].append(
                (row["memory"]["kept_fraction"], acc, sample_interval(row, acc)))
    tasks = [t for t in _tasks(rows) if t in series]
    methods = sorted(family, key=lambda m: (family[m], m))
    styles = {}
    for fam in sorted(set(family.values())):
        members = [m for m in methods if family[m] == fam]
        color = AXIS_COLORS.get(fam, AXIS_COLORS["composition"])
        for i, method in enumerate(members):
            styles[method] = {"color": color, "marker": MARKERS[i % len(MARKERS)],
                              "linestyle": LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)]}
    names = dict(ACCURACY_COLUMNS)
    panels = max(1, len(tasks))
    fig, axes = plt.subplots(panels, 1, figsize=(COLUMN_WIDTH, 2.4 * panels), squeeze=False)
    handles = {}
    for ax, task in zip(axes.flat, tasks):
        everything = []
        for method in sorted(series[task], key=methods.index):
            points = sorted(series[task][method], key=lambda p: (p[0], p[1]))
            everything += [(k, a) for k, a, _ in points]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(xs, ys, label=method, markersize=3.5, linewidth=0.9, **styles[method])
            bars = [(k, a, ci) for k, a, ci in points if ci is not None]
            if bars:
                ax.errorbar([b[0] for b in bars], [b[1] for b in bars],
                            yerr=[[b[1] - b[2][0] for b in bars], [b[2][1] - b[1] for b in bars]],
                            fmt="none", ecolor=styles[method]["color"], elinewidth=0.6, capsize=1.5, alpha=0.7)
            handles.setdefault(method, line)
        front = pareto_front(everything)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", linewidth=2.5, alpha=0.35,
                zorder=0, label="_front")
        ax.set_xscale("log")
        low = min(p[0] for p in everything)
        ticks = [t for t in LOG_TICKS if t >= low / 2] or [low]
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks], fontsize=SMALL)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", labelsize=SMALL)
        ax.set_title(names.get(task, task), fontsize=FONT)
        ax.set_xlabel("kept fraction of KV bytes", fontsize=FONT)
        ax.set_ylabel("accuracy", fontsize=FONT)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(True, alpha=0.3, linewidth=0.5)
    if handles:
        fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=SMALL, ncol=3, frameon=False,
                   title="grey band: Pareto front; bars: 95% bootstrap CI over samples", title_fontsize=SMALL)
    fig.tight_layout()
    saved = _save(fig, path)
    plt.close(fig)
    return saved


def heatmaps(rows: list[dict[str, Any]], path: Path) -> list[Path]:
    """One needle heatmap for all configurations: a row per configuration (method, parameters, kept fraction), a
    column per (context length, depth), grouped by length. Writes ``path`` (PNG, 300 dpi) and its PDF; [] when no
    row carries a needle grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in sorted(rows, key=_sort_key) if r.get("task") == "needle"
              and isinstance(r.get("accuracy", {}).get("grid"), dict) and r["accuracy"]["grid"]]
    if not panels:
        return []
    lengths = sorted({length for r in panels for length in r["accuracy"]["grid"]}, key=int)
    depths = sorted({d for r in panels for cells in r["accuracy"]["grid"].values() for d in cells}, key=float)
    columns = [(length, d) for length in lengths for d in depths]
    values = [[r["accuracy"]["grid"].get(length, {}).get(d, float("nan")) for length, d in columns] for r in panels]
    labels = [f"{r['method']} {_params(r)} ({r['memory']['kept_fraction']:.2f})".replace("  ", " ") for r in panels]
    height = 0.6 + 0.11 * len(panels)
    fig, ax = plt.subplots(figsize=(2 * COLUMN_WIDTH, height))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    centres = [i * len(depths) + (len(depths) - 1) / 2 for i in range(len(lengths))]
    ax.set_xticks(centres, [f"{int(length):,}" for length in lengths], fontsize=SMALL)
    for i in range(1, len(lengths)):
        ax.axvline(i * len(depths) - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel(f"context length (tokens); within each, needle depth {float(depths[0]):.0%} → "
                  f"{float(depths[-1]):.0%}", fontsize=SMALL)
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    bar.ax.tick_params(labelsize=SMALL)
    bar.set_label("exact match", fontsize=SMALL)
    fig.tight_layout()
    saved = _save(fig, path)
    plt.close(fig)
    return saved
