"""Head-axis methods (which KV heads keep their full context) and the retrieval-head scores they use:
``scores`` (the per-model artifact), ``detect`` (needle probes), ``python -m kvcompress.methods.head`` (the CLI)."""
