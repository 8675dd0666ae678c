"""``python -m kvcompress.bench gpu`` — the one-command GPU acceptance run (CUDA, bf16, fixed seed, ≤ 8 minutes).

Options: Hydra ``key=value`` overrides of ``configs/bench/gpu.yaml`` (``--help`` lists them with their defaults).
Checks, in one process, and writes ``paper_tables/gpu.md`` plus the raw figures in ``gpu.json`` next to it:

a. **equivalence**: ``compress(model, <reference>)`` (``reference``: the plain pass-through method) vs
   ``DynamicCache`` under greedy ``generate`` on a left-padded batch (tiny random Llama and Qwen2): greedy tokens
   identical and max |Δlogit| within a stated bf16 tolerance;
b. **every registered method** on a random-init model of Llama-3.1-8B's shape (``layers`` layers): a
   ``context`` prefill (32K) and ``steps`` greedy decode steps; kept / resident / dense bytes, the CUDA
   allocation growth and peak, prefill time, mean decode step. A method that raises is recorded as FAILED with
   its error and the run goes on with the next one;
c. **decode step vs DynamicCache** at 8K and 32K for the ``decode_methods`` (``ratio`` where a method has one):
   median over repeats of the per-step median, ratio to DynamicCache within each repeat;
d. **prefill overhead** of every method at ``context``: prefill time / DynamicCache prefill time.

Without CUDA it prints one skip line and exits 0: nothing is measured and nothing is written. ``smoke=true`` runs
the same code on the CPU at tiny sizes (what CI uses to exercise this script); its output says loudly that it holds
no GPU figures. Exit status: 0 when every check passed, 1 when a method FAILED or equivalence failed, 2 on a bad
option (one ``error:`` line).

Code: this module is the command line (options, the run, the files it writes); the parts are in
:mod:`kvcompress.bench.gpu_parts`, the device / model / timing helpers in :mod:`kvcompress.bench.gpu_device`,
the Markdown rendering in :mod:`kvcompress.bench.gpu_report`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..cli import Command, fail
from ..cli import main as cli_main
from ..errors import KVCompressError, check_ratio, unknown_choice
from .gpu_device import (
    Log,
    build_model,
    describe_model,
    device_usable,
    llama8b_config,
    make_cache,
    one_line,
    prefill,
    random_ids,
    release,
    timed_steps,
)
from .gpu_parts import check_equivalence, run_decode, run_methods, run_prefill
from .gpu_report import _mib, render

PARTS = ("equivalence", "methods", "decode", "prefill")
EQUIVALENCE_ARCHS = ("llama", "qwen2")
#: the models' max_position_embeddings (Llama-3.1's 131072) less room for the decode steps
MAX_CONTEXT = 131072 - 4096
SMOKE_BANNER = "*** CPU SMOKE RUN: tiny model on the CPU; these are NOT GPU figures ***"


# -- options ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    smoke: bool
    out: Path
    layers: int
    context: int
    decode_contexts: tuple[int, ...]
    steps: int
    warmup: int
    timing_steps: int
    repeats: int
    prefill_repeats: int
    methods: tuple[str, ...]
    ratio: float
    seed: int
    time_budget: float
    parts: tuple[str, ...]
    command: str
    reference: str
    decode_methods: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.smoke else torch.device("cuda", torch.cuda.current_device())

    @property
    def json_path(self) -> Path:
        return self.out.with_suffix(".json")


def _int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    try:
        number = None if isinstance(value, (bool, float)) else int(str(value))
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise KVCompressError(f"{name}={value} is invalid; valid: an integer >= {minimum}")
    if maximum is not None and number > maximum:
        raise KVCompressError(f"{name}={value} is too large; valid: an integer <= {maximum} (the model's "
                              f"{MAX_CONTEXT + 4096} positions less room for decoding)")
    return number


def _choices(name: str, value: Any, valid: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(str(x).strip() for x in (value.split(",") if isinstance(value, str) else value) if str(x).strip())
    if not items:
        raise KVCompressError(f"{name}={value!r} is empty; valid: a list of some of {', '.join(valid)}")
    for item in items:
        if item not in valid:
            raise KVCompressError(f"{name}: {unknown_choice(name.rstrip('s'), item, valid)}")
    return tuple(dict.fromkeys(items))


def settings(cfg: Any, argv: list[str]) -> Settings:
    """Validated settings from the composed config (``configs/bench/gpu.yaml`` + overrides); a bad value raises
    :class:`KVCompressError` with a one-line message."""
    import kvcompress

    sizes = cfg.sizes.smoke if cfg.smoke else cfg.sizes.gpu

    def opt(name: str, minimum: int = 1, maximum: int | None = None) -> int:
        return _int(name, cfg[name], minimum, maximum) if cfg[name] is not None else int(sizes[name])

    # the options whose defaults are sizes.<gpu|smoke> (layers, steps, repeats, ...): positive integers, warm-up
    # steps may be 0, a context is bounded by the model's positions
    sized = {name: opt(name, 0 if name == "warmup" else 1, MAX_CONTEXT if name == "context" else None)
             for name in sizes if name not in ("out", "short_context")}
    context = sized["context"]
    if cfg.decode_contexts is not None:
        given = cfg.decode_contexts if not isinstance(cfg.decode_contexts, (int, str)) else [cfg.decode_contexts]
        contexts = tuple(_int("decode_contexts", c, 1, MAX_CONTEXT) for c in given)
    else:
        contexts = tuple(sorted({min(int(sizes.short_context), context), context}))
    gpu_out = Path(str(cfg.sizes.gpu.out))
    out = Path(str(cfg.out)) if cfg.out else Path(str(sizes.out))
    if cfg.smoke and (out.resolve() == gpu_out.resolve() or out.resolve().parts[-2:] == gpu_out.parts[-2:]):
        raise KVCompressError(f"out={cfg.out} with smoke=true is invalid; valid: any other path ({gpu_out} holds GPU "
                              "figures only)")
    try:
        ratio = check_ratio(cfg.ratio, "ratio")
    except KVCompressError:
        raise KVCompressError(f"ratio={cfg.ratio} is invalid; valid: a kept fraction in (0, 1]") from None
    registered = tuple(kvcompress.available_methods())
    methods = registered if cfg.methods in (None, "all") else _choices("methods", cfg.methods, registered)
    reference = str(cfg.reference)
    if reference not in registered:
        raise unknown_choice("reference method", reference, registered)
    return Settings(
        **{**sized, "time_budget": float(sized["time_budget"])}, smoke=bool(cfg.smoke), out=out,
        decode_contexts=contexts, methods=methods, ratio=ratio, seed=_int("seed", cfg.seed, 0),
        parts=_choices("parts", cfg.parts, PARTS),
        command=" ".join(["python -m kvcompress.bench gpu", *map(shlex.quote, argv)]),
        reference=reference, decode_methods=tuple(str(m) for m in cfg.decode_methods),
    )


def skip_line(out: Path) -> str:
    build = f"CUDA {torch.version.cuda} build, no GPU visible" if torch.version.cuda else "CPU-only build, no GPU"
    return (f"kvcompress.bench gpu: skipped — CUDA is not available on this machine (torch {torch.__version__}, "
            f"{build}); nothing was measured and {out} was not changed")


# -- header and files -----------------------------------------------------------------------------------------------
def header(s: Settings) -> dict[str, Any]:
    import transformers

    from ..results import provenance

    prov = provenance(s.seed, str(s.device), torch.get_num_threads())
    h: dict[str, Any] = {
        "smoke": s.smoke, "command": s.command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": prov["git_commit"], "torch": torch.__version__, "transformers": transformers.__version__,
        "python": prov["python"], "kvcompress": prov["kvcompress"], "dtype": "bfloat16", "seed": s.seed,
        "device": str(s.device),
    }
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        h.update(gpu=torch.cuda.get_device_name(s.device), gpu_memory_bytes=props.total_memory,
                 capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        h.update(gpu=None, cpu_threads=torch.get_num_threads())
    return h


def write(results: dict[str, Any], s: Settings, log: Log) -> None:
    results["wall_seconds"] = log.elapsed()
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    s.out.write_text(render(results))


# -- main -------------------------------------------------------------------------------------------------------------
def failures(results: dict[str, Any]) -> list[str]:
    """What did not pass: ``equivalence:<arch>`` and ``<method>`` (parts b–d)."""
    bad = [f"equivalence:{r['architecture']}" for r in results.get("equivalence", []) if not r["passed"]]
    bad += ["aborted"] if "aborted" in results else []
    names = [r["method"] for r in results.get("methods", []) if r["status"] == "FAILED"]
    for block in results.get("decode", {}).values():
        names += [v for v, r in block["rows"].items() if r["status"] == "FAILED"]
    names += [v for v, r in results.get("prefill", {}).get("rows", {}).items() if r["status"] == "FAILED"]
    return bad + list(dict.fromkeys(names))


def run(s: Settings) -> int:
    import transformers

    log = Log()
    deadline = time.perf_counter() + s.time_budget
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if s.smoke:
            log(SMOKE_BANNER)
        results: dict[str, Any] = {"header": header(s), "complete": False, "parts_done": [],
                                   "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in dataclasses.asdict(s).items()}}
        h = results["header"]
        log(f"kvcompress.bench gpu on {h.get('gpu') or 'CPU'}: torch {h['torch']}, transformers {h['transformers']}, "
            f"parts {','.join(s.parts)}, methods {len(s.methods)}, context {s.context}, layers {s.layers} -> {s.out}")
        torch.manual_seed(s.seed)
        if "equivalence" in s.parts:
            results["equivalence"] = [check_equivalence(arch, s, log) for arch in EQUIVALENCE_ARCHS]
            results["parts_done"].append("equivalence")
            write(results, s, log)
            release(s.device, empty=True)
        if set(s.parts) & {"methods", "decode", "prefill"}:
            try:
                run_big_model_parts(results, s, log, deadline)
            except Exception as err:  # noqa: BLE001 — keep what was measured, say why the rest is missing
                results["aborted"] = one_line(err)
                log(f"ABORTED: {results['aborted']}")
                release(s.device, empty=True)
        results["complete"] = "aborted" not in results
        write(results, s, log)
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = failures(results)
    log(f"done in {log.elapsed():.0f} s -> {s.out}, {s.json_path}"
        + (f"; FAILED: {', '.join(bad)}" if bad else "; every check passed")
        + (f"  [{SMOKE_BANNER}]" if s.smoke else ""))
    return 1 if bad else 0


def run_big_model_parts(results: dict[str, Any], s: Settings, log: Log, deadline: float) -> None:
    """Parts b–d on one random-init model of Llama-3.1-8B's shape."""
    import kvcompress

    model = build_model(llama8b_config(s.layers, s.smoke), s.device, s.seed)
    kvcompress.attach(model)  # every variant, DynamicCache included, runs through the same attention function
    results["model"] = describe_model(model)
    log(f"model: {s.layers} layers of Llama-3.1-8B's shape, {_mib(results['model']['param_bytes'])} MiB; warm-up")
    warm = random_ids(model, (1, min(s.context, 2048)), s.seed + 1)
    cache = make_cache(model, "dynamic", s.ratio)
    timed_steps(model, cache, prefill(model, cache, warm), 2, s.device)
    del cache
    release(s.device, empty=True)
    if "methods" in s.parts:
        results["methods"] = run_methods(model, s, log)
        results["parts_done"].append("methods")
        write(results, s, log)
    if s.device.type == "cuda" and not device_usable(s.device):
        raise RuntimeError("the CUDA context became unusable in part b; parts c and d were not run")
    if "decode" in s.parts:
        results["decode"] = run_decode(model, s, log, deadline)
        results["parts_done"].append("decode")
        write(results, s, log)
    if "prefill" in s.parts:
        skip = {r["method"]: f"see b ({r.get('failed_in')}): {r['error']}" for r in results.get("methods", [])
                if r["status"] == "FAILED" and r.get("failed_in") in ("setup", "cache", "prefill", "not run")}
        results["prefill"] = run_prefill(model, s, log, deadline, skip)
        results["parts_done"].append("prefill")
    del model
    release(s.device, empty=True)


def run_command(cfg: Any, argv: list[str]) -> int:
    """The run on the composed config; 0 also when CUDA is absent and the run is skipped."""
    s = settings(cfg, argv)
    if not s.smoke and not torch.cuda.is_available():
        print(skip_line(s.out), flush=True)
        return 0
    return run(s)


def command(argv: list[str]) -> Command:
    return Command("bench/gpu", lambda cfg: run_command(cfg, argv), """The GPU acceptance run on one NVIDIA GPU
        (bf16, fixed seed, < 8 minutes): a. compress(model, reference) vs DynamicCache under greedy generate on a
        left-padded batch (tiny Llama and Qwen2); b. every registered method on a random-init model of
        Llama-3.1-8B's shape: 32K prefill + 64 decode steps, kept / resident / dense bytes and CUDA memory; c. decode
        step of decode_methods vs DynamicCache at 8K and 32K; d. prefill time of every method vs DynamicCache.
        Writes paper_tables/gpu.md + gpu.json; without CUDA it prints one skip line and exits 0; smoke=true runs it
        on the CPU at tiny sizes (never GPU figures). Exit status 1 when a check failed, 2 on a bad option.""")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 also when CUDA is absent and the run is skipped)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = cli_main("python -m kvcompress.bench gpu", {"gpu": command(args)}, args, default="gpu")
    except KVCompressError as err:
        return fail(err)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
