"""Compression methods, one small file each, in the folder of their axis: ``layer/``, ``head/``, ``token/``,
``hidden/`` (``full.py``, the uncompressed baseline, has no axis). Each axis folder also holds its axis's helpers
(head scores beside the head methods, token scoring beside the token methods, bit packing and low-rank calibration
beside the hidden-axis methods).

Adding a method: write ``methods/<axis>/<name>.py`` with a ``@register``-ed ``Compressor`` dataclass whose docstring
cites its paper and states its defaults. Nothing else: :func:`kvcompress.registry.discover` imports every module
here, checks that the class's axis is its folder's, and the run CLI's method configs, the runners and the shared
test matrix take the method from the registry.
"""
