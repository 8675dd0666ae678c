"""Differences between the transformers releases we support (``>=5.23,<6``).

transformers 5.24 renamed the cache keyword of every model ``forward`` and of ``generate`` from ``past_key_values``
to ``cache`` (the old name still works there, with a ``FutureWarning``, until 5.40 / 6.0). Internal calls use
:func:`cache_arg` so they pass the name the installed release expects.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.generation.utils import GenerationMixin

#: Keyword under which ``model(...)`` and ``model.generate(...)`` take a cache object in the installed transformers.
CACHE_KWARG: str = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
)


def cache_arg(cache: Any) -> dict[str, Any]:
    """``{CACHE_KWARG: cache}``, to splat into a forward or ``generate`` call: ``model(ids, **cache_arg(cache))``."""
    return {CACHE_KWARG: cache}
