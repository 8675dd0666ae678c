"""``python -m kvcompress.tables`` — every table and figure under ``paper_tables/`` from committed results rows.

    python -m kvcompress.tables                      # all of them, from paper_tables/rows/<table>.jsonl
    python -m kvcompress.tables heads out=/tmp/t      # one table, elsewhere
    python -m kvcompress.tables methods rows=results/paper.jsonl   # the method table from other rows

One renderer (:mod:`kvcompress.tables.render`: Markdown pipe tables and LaTeX booktabs) and one spec per table
(:data:`TABLES`): ``methods`` (the paper sweep: ``methods.md`` / ``.tex``, ``methods_axes.md``, the Pareto plot and
the needle heatmaps), ``testbed``, ``heads``, ``layers``, ``hidden`` (per-axis needle sweeps on the constructed
testbed), ``quant_memory`` (``scripts/quant_memory.py``'s measurement), ``fu2024`` (computed by
:mod:`kvcompress.latency`, no rows) and ``latency_check`` (the latency model beside an independent first-principles
count for public configs, no rows); ``errors`` (error analysis of YOUR run: the per-sample predictions sidecar of a
results file, ``python -m kvcompress.tables errors rows=results/runs.jsonl out=DIR``; not part of ``all``). The rows
of a table are in ``paper_tables/rows/<table>.jsonl``
(:class:`kvcompress.results.Row`), measured by ``python -m kvcompress.sweep <table>`` (``scripts/paper_sweep.sh``
for ``methods``); the same rows always give byte-identical files. ``perf.md`` and ``gpu.md`` are rendered by
``python -m kvcompress.bench`` from their own JSON and are not regenerated here.

Options (Hydra ``key=value``, ``configs/tables/render.yaml``): ``rows`` (the directory of ``<table>.jsonl`` files,
or for one table a JSONL file or a list of them), ``out`` (where files are written), ``name`` (``methods``: the
files' basename).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constraints import AnyOf, ExistingPath, FileName, ListOf, Optional, OutputDir
from .figures import LINESTYLES, MARKERS
from .methods import ACCURACY_COLUMNS, generate, headline, headline_key, latest_rows
from .render import Table, latex, latex_lines, markdown, markdown_sections, tex

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Spec:
    """A table: the module that renders it (``write(rows, out) -> paths``), whether it reads rows, what it writes."""

    module: str
    outputs: tuple[str, ...]
    rows: bool = True
    #: reads the per-sample predictions sidecars of the rows files (``<results>.predictions.jsonl``), not the rows
    predictions: bool = False
    #: rendered by ``python -m kvcompress.tables`` (all): False for tables of the user's own results
    in_all: bool = True

    def write(self, rows: list[dict[str, Any]], out: Path, **options: Any) -> list[Path]:
        return importlib.import_module(f"kvcompress.tables.{self.module}").write(rows, out, **options)


#: Every table under paper_tables/ that is rendered from rows (or computed, for fu2024), by name.
TABLES: dict[str, Spec] = {
    "methods": Spec("methods", ("methods.md", "methods.tex", "methods_axes.md", "methods_pareto.png",
                                "methods_pareto.pdf", "methods_needle.png", "methods_needle.pdf")),
    "testbed": Spec("testbed", ("testbed.md",)),
    "heads": Spec("heads", ("heads.md",)),
    "layers": Spec("layers", ("layers.md",)),
    "hidden": Spec("hidden", ("hidden.md",)),
    "quant_memory": Spec("quant_memory", ("quant_memory.md",)),
    "fu2024": Spec("fu2024", ("fu2024.md", "fu2024.tex"), rows=False),
    "latency_check": Spec("latency_check", ("latency_check.md",), rows=False),
    "errors": Spec("errors", ("errors.md",), predictions=True, in_all=False),
}


def rows_file(table: str, rows: str | Path = ROOT / "paper_tables" / "rows") -> Path:
    return Path(rows) / f"{table}.jsonl"


def write_table(table: str, rows: Any = None, out: str | Path = ROOT / "paper_tables", name: str | None = None) -> list[Path]:
    """Render ``table`` into ``out`` from ``rows``: a directory of ``<table>.jsonl`` files (default
    ``paper_tables/rows``), a JSONL file, or a list of files. Returns the paths written."""
    from ..errors import KVCompressError, unknown_choice
    from ..results import predictions_path, read_predictions, read_rows

    if table not in TABLES:
        raise unknown_choice("table", table, TABLES)
    spec = TABLES[table]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found: list[dict[str, Any]] = []
    if spec.rows:
        paths = [Path(p) for p in ([rows] if isinstance(rows, (str, Path)) else list(rows or [ROOT / "paper_tables" / "rows"]))]
        paths = [rows_file(table, p) if p.is_dir() else p for p in paths]
        if spec.predictions:
            paths = [p if p.name.endswith(".predictions.jsonl") else predictions_path(p) for p in paths]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            what = "a predictions sidecar (<results>.predictions.jsonl, or its results file)" if spec.predictions \
                else f"a JSONL results file (or a directory with {table}.jsonl)"
            raise KVCompressError(f"rows file {missing[0]!r} does not exist; valid: {what}")
        found = [row for p in paths for row in (read_predictions(p) if spec.predictions else read_rows(p))]
        if not found:
            raise KVCompressError(f"no readable rows for table {table!r} in {', '.join(map(str, paths))}")
    options = {"name": name} if table == "methods" and name else {}
    return spec.write(found, out, **options)


def write_all(rows: str | Path = ROOT / "paper_tables" / "rows", out: str | Path = ROOT / "paper_tables") -> list[Path]:
    """Every table of :data:`TABLES` from ``rows/<table>.jsonl`` into ``out``."""
    return [path for table, spec in TABLES.items() if spec.in_all for path in write_table(table, rows, out)]


def _command(table: str | None):
    def run(cfg: Any) -> int:
        from omegaconf import OmegaConf

        rows = OmegaConf.to_container(cfg, resolve=True)["rows"]
        paths = write_all(rows, cfg.out) if table is None else write_table(table, rows, cfg.out, cfg.get("name"))
        for path in paths:
            print(path)
        return 0

    return run


#: what each option accepts (kvcompress.constraints), checked before anything is read or written
CONSTRAINTS = {
    "rows": AnyOf((ExistingPath("any"), ListOf(ExistingPath("file")))),
    "out": OutputDir(),
    "name": Optional(FileName()),
}


def main(argv: list[str] | None = None) -> int:
    import sys

    from ..cli import Command, fail
    from ..cli import main as cli_main
    from ..errors import KVCompressError

    commands = {"all": Command("tables/render", _command(None), "Every table and figure of paper_tables/ (except "
                               "perf and gpu, which python -m kvcompress.bench renders) from paper_tables/rows.",
                               constraints=CONSTRAINTS)}
    for table, spec in TABLES.items():
        commands[table] = Command("tables/render", _command(table),
                                  f"{', '.join(spec.outputs)} from {'rows/' + table + '.jsonl' if spec.rows else 'the latency model'}.",
                                  constraints=CONSTRAINTS)
    try:
        return int(cli_main("python -m kvcompress.tables", commands, sys.argv[1:] if argv is None else argv,
                            default="all") or 0)
    except KVCompressError as err:
        return fail(err)


__all__ = ["ACCURACY_COLUMNS", "LINESTYLES", "MARKERS", "TABLES", "Table", "generate", "headline", "headline_key",
           "latest_rows", "latex", "latex_lines", "main", "markdown", "markdown_sections", "tex", "write_all",
           "write_table"]
