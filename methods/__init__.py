"""Compression methods, one small file each; importing this package registers them all.

Adding a method: write ``methods/<name>.py`` with a ``@register``-ed ``Compressor`` dataclass whose docstring cites
its paper and states its defaults, add its import below and ``configs/method/<name>.yaml``; the shared test matrix
(tests/test_method_matrix.py) picks it up from the registry.
"""

from . import (  # noqa: F401
    adaptive_heads,
    expected_attention,
    full,
    h2o,
    heads,
    knorm,
    layer_budget,
    layers,
    lowrank,
    merge,
    pyramidkv,
    quant,
    random,
    share,
    snapkv,
    streaming,
    think,
    tova,
)
