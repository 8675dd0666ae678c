"""Testbed models: the constructed retrieval model (default model of ``kvcompress.run``) and the learned recipe.

``testbed_path()`` returns the directory of the **constructed** testbed, building it on first use (about a second)
into ``$KVCOMPRESS_CACHE/testbed-<version>`` (default ``~/.cache/kvcompress``). See :mod:`kvcompress.zoo.testbed`.
"""

from __future__ import annotations

from pathlib import Path


def testbed_path(rebuild: bool = False) -> Path:
    """Directory of the constructed testbed (built on first use); load it with ``from_pretrained``."""
    from .testbed import testbed_path as _path

    return _path(rebuild=rebuild)


def testbed_metadata(path: str | Path | None = None) -> dict:
    """The ground-truth JSON saved next to the testbed (retrieval / previous-token heads, roles, scales)."""
    import json

    from .testbed import METADATA_FILE

    p = Path(path) if path is not None else testbed_path()
    return json.loads((p / METADATA_FILE).read_text())


__all__ = ["testbed_path", "testbed_metadata"]
