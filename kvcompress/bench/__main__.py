"""``python -m kvcompress.bench [config=default|quick|PATH.yaml] [key=value ...]`` — see the package docstring.

``python -m kvcompress.bench gpu [key=value ...]`` is the GPU acceptance run (:mod:`kvcompress.bench.gpu`, options in
``configs/bench/gpu.yaml``). Both take Hydra overrides, like ``python -m kvcompress.run``; ``--help`` lists the
options and their defaults."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the log

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from .. import cli  # noqa: E402
from ..constraints import Choice, ExistingPath, Integer, ListOf, Number, Optional, OutputFile, fraction  # noqa: E402
from ..errors import KVCompressError, unknown_choice  # noqa: E402
from . import bandwidth, decode, gpu, memory, ops, prefill, report, throughput  # noqa: E402
from .common import BenchModel, axis_of, load_avg, load_bench_model, machine, prepare, resolve_methods  # noqa: E402

PROG = "python -m kvcompress.bench"
PARTS = ("bandwidth", "prefill", "decode", "ops", "memory", "throughput")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: what each option of the suite accepts (kvcompress.constraints), checked before anything is measured
CONSTRAINTS = {
    "parts": ListOf(Choice(PARTS)),
    "threads": Integer(min=1),
    "out_md": OutputFile(suffixes=(".md",)),
    "out_json": OutputFile(suffixes=(".json",)),
    "render": Optional(ExistingPath("file", text=True)),
    "bandwidth.size_mib": Integer(min=1),
    "bandwidth.repeats": Integer(min=1),
    "prefill.ratio": fraction(),
    "prefill.contexts": ListOf(Integer(min=1)),
    "prefill.repeats": Integer(min=1),
    "prefill.repeats_by_context.*": Integer(min=1),
    "prefill.repeats_by_model.*": Integer(min=1),
    "prefill.plain_every": Integer(min=1),
    "prefill.plain_every_by_context.*": Integer(min=1),
    "decode.contexts": ListOf(Integer(min=1)),
    "decode.token_methods_at": fraction(),
    "decode.token_methods_contexts": ListOf(Integer(min=1), min_len=0),
    "decode.steps": Integer(min=1),
    "decode.repeats": Integer(min=1),
    "decode.attention_iters": Integer(min=1),
    "decode.attention_repeats": Integer(min=1),
    "ops.rows": ListOf(Integer(min=1)),
    "ops.distinct": ListOf(Integer(min=1)),
    "memory.context": Integer(min=1),
    "memory.steps": Integer(min=0),
    "memory.ratio": fraction(),
    "throughput.lengths": ListOf(Integer(min=1)),
    "throughput.depths": Optional(ListOf(Number(0.0, 1.0))),
    "throughput.samples": Integer(min=1),
    "throughput.repeats": Integer(min=1),
}


def validate(cfg: Any) -> None:
    """What can be checked before anything is measured, besides :data:`CONSTRAINTS`: model names, targets, the
    decode reference."""
    parts = list(cfg.parts)
    for part in parts:
        if part not in PARTS:
            raise unknown_choice("part", part, PARTS)
    models = list(cfg.models)
    used = [*(cfg.prefill.models if "prefill" in parts else []), *(cfg.decode.models if "decode" in parts else []),
            *([cfg.ops.model] if "ops" in parts else []), *(cfg.memory.models if "memory" in parts else []),
            *([cfg.throughput.model] if "throughput" in parts else [])]
    for name in used:
        if name not in models:
            raise unknown_choice("model", name, models)
    report.check_targets(OmegaConf.to_container(cfg.targets, resolve=True) if cfg.get("targets") else [])
    if "decode" in parts and cfg.decode.reference not in list(cfg.decode.variants):
        raise KVCompressError(f"decode.reference={cfg.decode.reference} is not among decode.variants; valid: one of "
                              f"{', '.join(map(str, cfg.decode.variants))}")


def perf(cfg: Any, argv: list[str], cfg_path: str) -> dict[str, Any]:
    """The suite (or, with ``render``, only its Markdown from an existing results JSON)."""
    if cfg.render:
        results = json.loads(Path(cfg.render).read_text())
        results["config"]["closing_note"] = cfg.get("closing_note")
        results["config"]["targets"] = OmegaConf.to_container(cfg.targets, resolve=True) if cfg.get("targets") else []
        report.check_targets(results["config"]["targets"])
        if OmegaConf.select(cfg, "decode.reference") is not None:
            results["config"].setdefault("decode", {}).setdefault("reference", cfg.decode.reference)
        Path(cfg.render).write_text(json.dumps(results, indent=1, default=float) + "\n")
        report.write(results, Path(cfg.out_md))
        return results
    validate(cfg)
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(0)
    started = time.perf_counter()
    results: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True), "config_file": cfg_path,
                               "command": " ".join([PROG, *argv]),
                               "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    import kvcompress

    results["methods_registered"] = kvcompress.available_methods()
    models: dict[str, BenchModel] = {}

    def get_model(name: str) -> BenchModel:
        if name not in models:
            models[name] = load_bench_model(cfg.models[name])
        return models[name]

    def save() -> None:
        results["wall_seconds"] = time.perf_counter() - started
        results["models"] = {n: m.description for n, m in models.items()}
        out = Path(cfg.out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=float) + "\n")
        report.write(results, Path(cfg.out_md))

    parts = list(cfg.parts)
    log(f"kvcompress.bench {cfg_path}: parts {parts}, {cfg.threads} thread(s), load {load_avg()}")
    if "bandwidth" in parts:
        results["bandwidth"] = bandwidth.measure(int(cfg.bandwidth.size_mib), int(cfg.bandwidth.repeats))
        log(f"  bandwidth copy {results['bandwidth']['bandwidth_GBps']['median']:.2f} GB/s (read+write), "
            f"read {results['bandwidth']['read_GBps']['median']:.2f} GB/s")
        save()
    if "prefill" in parts:
        results["prefill"] = {}
        for name in cfg.prefill.models:
            bm = get_model(name)
            base = resolve_methods(cfg.prefill.methods, cfg.prefill.get("exclude"))
            only_methods = (cfg.prefill.get("methods_by_model", {}) or {}).get(name)
            if only_methods is not None:
                base = [m for m in base if m in only_methods]
            by_ctx = {}
            for c in cfg.prefill.contexts:
                only = (cfg.prefill.get("models_by_context", {}) or {}).get(c)
                if only is not None and name not in only:
                    continue
                sub = cfg.prefill.get("methods_by_context", {}) or {}
                by_ctx[int(c)] = [m for m in resolve_methods(sub[c]) if m in base] if c in sub else base
            notes = prepare(bm, sorted({m for ms in by_ctx.values() for m in ms}))
            results["prefill"][name] = prefill.run(bm, cfg.prefill, by_ctx, log)
            results["prefill"][name]["notes"] = notes
            save()
    if "decode" in parts:
        results["decode"] = {}
        for name in cfg.decode.models:
            bm = get_model(name)
            registered = kvcompress.available_methods()
            base = [v for v in cfg.decode.variants if decode.parse_variant(v)[0] in (*registered, "dynamic")]
            by_ctx = {}
            for c in cfg.decode.contexts:
                variants = list(base)
                if int(c) in [int(x) for x in cfg.decode.get("token_methods_contexts", [])]:
                    r = float(cfg.decode.token_methods_at)
                    for m in registered:
                        v = f"{m}@{r:g}"
                        if axis_of(m) == "token" and v not in variants:
                            variants.append(v)
                by_ctx[int(c)] = variants
            notes = prepare(bm, sorted({decode.parse_variant(v)[0] for vs in by_ctx.values() for v in vs}))
            results["decode"][name] = decode.run(bm, cfg.decode, by_ctx, log)
            results["decode"][name]["notes"] = notes
            save()
        if "bandwidth" in results:  # a second measurement after the decode part, pooled with the first
            results["bandwidth"] = bandwidth.merge(results["bandwidth"], bandwidth.measure(
                int(cfg.bandwidth.size_mib), int(cfg.bandwidth.repeats)))
            log(f"  bandwidth (pooled) copy {results['bandwidth']['bandwidth_GBps']['median']:.2f} GB/s, "
                f"read {results['bandwidth']['read_GBps']['median']:.2f} GB/s")
            save()
    if "ops" in parts:
        bm = get_model(cfg.ops.model)
        prepare(bm, sorted({decode.parse_variant(v)[0] for v in cfg.ops.variants}))
        results["ops"] = {cfg.ops.model: ops.run(bm, cfg.ops, log)}
        save()
    if "memory" in parts:
        results["memory"] = {}
        for name in cfg.memory.models:
            get_model(name)  # for the description in the report
            methods = resolve_methods(cfg.memory.methods)
            results["memory"][name] = memory.run(cfg.models[name], cfg.memory, methods, int(cfg.threads), log)
            save()
    if "throughput" in parts:
        bm = get_model(cfg.throughput.model)
        prepare(bm, [throughput.parse_variant(v)[0] for v in cfg.throughput.methods])
        results["throughput"] = {cfg.throughput.model: throughput.run(bm, cfg.throughput, log)}
        save()
    results["load_at_end"] = load_avg()
    save()
    log(f"done in {time.perf_counter() - started:.0f} s -> {cfg.out_md}, {cfg.out_json}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point: the suite's results (None after ``--help``); exits with status 2 and one ``error:`` line on bad
    input; ``gpu`` exits with the GPU run's status."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "perf": cli.Command("bench/default", lambda cfg: perf(cfg, args, str(cli.current_config())), """The
            performance suite: prefill overhead of each method, decode step time vs bytes read and the measured memory
            bandwidth, kernels per decode step on the virtual accelerator, resident vs kept bytes vs process peak,
            needle throughput, and the targets met / not met (paper_tables/perf.md + perf.json; config=quick is a
            short smoke run). render=JSON only re-writes the Markdown from a results JSON.""",
                            choose="bench", hidden=("gpu",), constraints=CONSTRAINTS, validate=validate),
        "gpu": gpu.command(args[1:]),
    }
    try:
        result = cli.main(PROG, commands, args, default="perf")
    except KVCompressError as err:
        raise SystemExit(cli.fail(err)) from None
    if args[:1] == ["gpu"]:  # the GPU acceptance run exits with its status
        raise SystemExit(0 if result is None else int(result))
    return result


if __name__ == "__main__":
    main()
