"""kvcompress: compress the KV cache of Hugging Face causal LMs along four axes and measure what it buys.

>>> import kvcompress
>>> cache = kvcompress.compress(model, "streaming", ratio=0.1)   # ratio = fraction KEPT
>>> out = model.generate(**inputs, cache=cache)   # past_key_values=cache before transformers 5.24
>>> cache.memory_report()["kept_bytes"]
"""

__version__ = "0.1.0"

from .api import SUPPORTED_ARCHITECTURES, Attachment, attach, attached, build_pipeline, compress  # noqa: E402
from .cache import KVCompressCache  # noqa: E402
from .compressor import Axis, Compressor
from .errors import KVCompressError  # noqa: E402
from .registry import available_methods, register

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Attachment",
    "Axis",
    "Compressor",
    "KVCompressCache",
    "KVCompressError",
    "attach",
    "attached",
    "available_methods",
    "build_pipeline",
    "compress",
    "register",
]
