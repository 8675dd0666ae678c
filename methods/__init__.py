"""Compression methods, one small file each; importing this package registers them all.

Adding a method: write ``methods/<name>.py`` with a ``@register``-ed ``Compressor`` dataclass whose docstring cites
its paper and states its defaults, add its import below and ``configs/method/<name>.yaml``; the shared test matrix
(tests/test_method_matrix.py) picks it up from the registry.
"""

from . import adaptive_heads, full, heads, layer_budget, layers, random, share, streaming  # noqa: F401
