"""``python -m kvcompress.bench [--config default|quick|PATH.yaml] [key=value ...]`` — see the package docstring.

``python -m kvcompress.bench gpu [...]`` is the GPU acceptance run (:mod:`kvcompress.bench.gpu`, its own options)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the log

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from . import bandwidth, decode, memory, ops, prefill, report, throughput  # noqa: E402
from .common import BenchModel, axis_of, load_avg, load_bench_model, machine, prepare, resolve_methods  # noqa: E402


def load_config(name: str, overrides: list[str]) -> Any:
    path = Path(name)
    if not path.suffix:
        from importlib.resources import files

        path = Path(str(files("kvcompress.configs") / "bench" / f"{name}.yaml"))
    cfg = OmegaConf.load(path)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)), str(path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["gpu"]:  # the GPU acceptance run has its own options (bench/gpu.py); exits with its status
        from . import gpu

        raise SystemExit(gpu.main(raw[1:]))
    parser = argparse.ArgumentParser(prog="python -m kvcompress.bench", description=__doc__)
    parser.add_argument("--config", default="default", help="config name under configs/bench/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dot-list overrides, e.g. decode.repeats=3")
    parser.add_argument("--render", metavar="JSON", help="only re-write the markdown from an existing results JSON "
                        "(closing note taken from the current config)")
    args = parser.parse_args(argv)
    cfg, cfg_path = load_config(args.config, args.overrides)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        results["config"]["closing_note"] = cfg.get("closing_note")
        Path(args.render).write_text(json.dumps(results, indent=1, default=float) + "\n")
        report.write(results, Path(cfg.out_md))
        return results
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(0)
    started = time.perf_counter()
    results: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True), "config_file": cfg_path,
                               "command": " ".join(["python -m kvcompress.bench", *(argv if argv is not None else sys.argv[1:])]),
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


if __name__ == "__main__":
    main()
