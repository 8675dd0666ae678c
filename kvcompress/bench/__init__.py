"""Benchmark suite: the toolkit measured against the machine's physical limits (issue 10).

    python -m kvcompress.bench                 # configs/bench/default.yaml -> paper_tables/perf.md + perf.json
    python -m kvcompress.bench config=quick    # < 2 minute smoke run
    python -m kvcompress.bench parts=[decode] decode.contexts=[4096]   # Hydra overrides, as in kvcompress.run
    python -m kvcompress.bench gpu smoke=true out=/tmp/gpu.md          # the GPU acceptance run (bench/gpu.py)

Parts (one module each): ``prefill`` (overhead of each method's scoring + gather over the plain model),
``decode`` (time per step vs bytes read, fitted against the streaming-copy bandwidth measured by ``bandwidth``),
``memory`` (resident vs kept bytes vs process peak RSS), ``throughput`` (needle samples per minute), ``report``.
Every figure is a median over repeats with min–max; compared variants are interleaved within each repeat and
ratios are taken within the same run; the machine's load average is recorded next to every figure. Which methods
are measured, the reference variant of the decode part and the targets judged in the report are in the config
(``configs/bench/*.yaml``), never in this package's code.
"""
