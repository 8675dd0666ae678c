"""The registry: methods live in the folder of their axis, are discovered without an import list, and one file adds
a method everywhere (compress, the run CLI with a generated config, the shared test matrix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvcompress
from kvcompress.compressor import Axis, Compressor
from kvcompress.registry import check_axis, get_method, readme_with_table

ROOT = Path(__file__).resolve().parents[1]


def test_methods_live_in_the_folder_of_their_axis() -> None:
    folders = sorted(p.name for p in (ROOT / "methods").iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert folders == ["head", "hidden", "layer", "token"]
    for name in kvcompress.available_methods():
        cls = get_method(name)
        parts = cls.__module__.split(".")
        assert parts[:2] == ["kvcompress", "methods"]
        assert (parts[2] if len(parts) > 3 else None) == (cls.axis.value if cls.axis else None), name


def test_a_method_in_the_wrong_folder_is_rejected() -> None:
    class Misplaced(Compressor):
        name = "misplaced"
        axis = Axis.HEAD

    Misplaced.__module__ = "kvcompress.methods.token.misplaced"
    with pytest.raises(TypeError, match="lives in the token folder"):
        check_axis(Misplaced)


def test_readme_method_table_is_generated_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme) == readme, "run `python -m kvcompress.methods readme` to regenerate the table"
    for name in kvcompress.available_methods():
        assert f"`{name}`" in readme


def test_one_file_adds_a_method_everywhere(tmp_path: Path) -> None:
    """A copy of an existing method file under a new registered name, dropped into ``methods/token/``, runs from the
    run CLI (its config generated from the dataclass) and joins the registry, with no other edit."""
    source = (ROOT / "methods" / "token" / "knorm.py").read_text()
    new = ROOT / "methods" / "token" / f"kvc_test_copy_{os.getpid()}.py"
    name = f"knorm_copy_{os.getpid()}"
    new.write_text(source.replace('name = "knorm"', f'name = "{name}"'))
    try:
        results = tmp_path / "rows.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "kvcompress.run", f"method={name}", "ratio=0.5", f"method.{name}.sink=2",
             "model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=64", "eval.new_tokens=2",
             "print_summary=false", f"results={results}"],
            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        row = json.loads(results.read_text().splitlines()[0])
        assert row["method"] == name and row["config"]["method"][name]["sink"] == 2
        listed = subprocess.run([sys.executable, "-c", "import kvcompress; print(kvcompress.available_methods())"],
                                capture_output=True, text=True, timeout=120)
        assert name in listed.stdout
    finally:
        new.unlink()


def test_no_runner_names_a_method() -> None:
    """Runners take methods from the registry and their hooks: no string constant naming a method in the code of the
    run CLI, lm-eval, the results rows, the sweeps, the public API or the bench (the bench's methods are in its
    configs; docstring examples aside)."""
    import ast

    names = set(kvcompress.available_methods())
    files = [ROOT / "kvcompress" / name for name in ("run.py", "lm_eval.py", "results.py", "sweep.py", "api.py")]
    files += sorted((ROOT / "kvcompress" / "bench").glob("*.py"))
    hits = []
    for path in files:
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        hits += [f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]
    assert not hits, hits
