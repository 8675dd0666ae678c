"""Packaging: every subpackage is declared, and nothing named `methods` or `eval` goes to the top level."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_declared() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = {
        "kvcompress." + ".".join(p.parent.relative_to(ROOT / "kvcompress").parts)
        for p in (ROOT / "kvcompress").rglob("__init__.py")
        if p.parent != ROOT / "kvcompress"
    }
    assert found <= declared, f"add to pyproject [tool.setuptools].packages: {sorted(found - declared)}"
    mapping = config["package-dir"]
    assert mapping["kvcompress.methods"] == "methods" and mapping["kvcompress.eval"] == "eval"
    assert not {"methods", "eval"} & declared
