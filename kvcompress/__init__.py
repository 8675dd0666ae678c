"""kvcompress: compress the KV cache of Hugging Face causal LMs along four axes and measure what it buys."""

__version__ = "0.1.0"
