"""One command-line idiom (kvcompress/cli.py): every tool takes Hydra ``key=value`` overrides on its config under
``configs/``, prints its options with ``--help`` (exit status 0), and stops a bad key or value with ONE line
``error: ...; valid ...`` and exit status 2 before any work; Hydra writes nothing into the working directory."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvcompress.bench.__main__ import main as bench_main
from kvcompress.cli import preflight
from kvcompress.errors import KVCompressError
from kvcompress.latency.__main__ import main as latency_main
from kvcompress.methods.head.__main__ import main as heads_main
from kvcompress.run import main as run_main
from kvcompress.zoo.__main__ import main as zoo_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _call(main: Callable[[list[str]], Any], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """A tool's exit status: what its main returns (a dict or None counts as 0) or the SystemExit it raises."""
    monkeypatch.setattr(sys, "argv", ["kvcompress"])  # run.main rewrites sys.argv for Hydra
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return 0 if status is None or isinstance(status, dict) else int(status)


HELP = [
    (latency_main, ["--help"], ["usage: python -m kvcompress.latency", "token_fraction: null", "table"]),
    (latency_main, ["table", "--help"], ["usage: python -m kvcompress.latency table", "out: null"]),
    (heads_main, ["--help"], ["usage: python -m kvcompress.methods.head {detect|show}", "detect:", "show:"]),
    (heads_main, ["detect", "--help"], ["lengths: [512, 1024]", "model: ???"]),
    (heads_main, ["show", "-h"], ["score: null", "png: null"]),
    (zoo_main, ["--help"], ["usage: python -m kvcompress.zoo {build|check|path|train}"]),
    (zoo_main, ["build", "--help"], ["out: null"]),
    (zoo_main, ["check", "--help"], ["lengths: [256, 1024, 4096, 8192]", "template: magic_number"]),
    (zoo_main, ["path", "--help"], ["No options"]),
    (zoo_main, ["train", "--help"], ["config=testbed-learned|PATH.yaml", "optim:"]),
    (bench_main, ["--help"], ["config=default|quick|PATH.yaml", "decode:", "targets:", "closing_note: |"]),
    (bench_main, ["config=quick", "--help"], ["configs/bench/quick.yaml"]),
    (bench_main, ["--config-name", "quick", "--help"], ["configs/bench/quick.yaml"]),
    (bench_main, ["gpu", "--help"], ["usage: python -m kvcompress.bench gpu", "decode_methods:", "smoke: false"]),
    (run_main, ["--help"], ["== Config ==", "ratio: null"]),
]


@pytest.mark.parametrize(("main", "argv", "expected"), HELP,
                         ids=[f"{m.__module__.split('.')[-2]} {' '.join(a)}" for m, a, _ in HELP])
def test_help_prints_the_options_and_exits_0(main, argv, expected, capsys, monkeypatch) -> None:
    assert _call(main, argv, monkeypatch) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, out


BAD = [
    (latency_main, ["frobnicate=1"], "unknown option 'frobnicate'"),
    (latency_main, ["output=many"], "output=many is invalid; valid: an integer (default: 250)"),
    (latency_main, ["context=4K,8K"], "valid: one value, or a list: context=[4K,8K]"),
    (latency_main, ["tabel"], "unknown command 'tabel'"),
    (latency_main, ["table", "frobnicate=1"], "unknown option 'frobnicate'"),
    (heads_main, ["detect", "model=testbed", "lengthz=[256]"], "unknown option 'lengthz'"),
    (heads_main, ["detect", "model=testbed", "lengths=256"], "valid: a list, e.g. lengths=[256]"),
    (heads_main, ["detect"], "model is required; valid: model=VALUE"),
    (heads_main, ["show", "model=testbed", "score=both"], "unknown score 'both'"),
    (heads_main, ["frobnicate"], "unknown command 'frobnicate'"),
    (zoo_main, [], "needs a command first"),
    (zoo_main, ["check", "lengths=[256]", "depths=[0.5]", "distractors=few"], "distractors=few is invalid"),
    (zoo_main, ["build", "frobnicate=1"], "unknown option 'frobnicate'"),
    (zoo_main, ["train", "optim.stepz=1"], "unknown option 'optim.stepz'; valid choices: optim.betas"),
    (zoo_main, ["train", "config=nope"], "unknown config 'nope'"),
    (bench_main, ["decode.repeatz=3"], "unknown option 'decode.repeatz'; valid choices: decode.attention_iters"),
    (bench_main, ["decode.repeats=3.5"], "decode.repeats=3.5 is invalid; valid: an integer (default: 5)"),
    (bench_main, ["config=gpu"], "unknown config 'gpu'"),
    (bench_main, ["-m", "decode.repeats=1,2"], "a tool runs one configuration per call"),
    (bench_main, ["parts=[decode,nope]"], "unknown parts[1] 'nope'"),
    (bench_main, ["gpu", "frobnicate=1"], "unknown option 'frobnicate'"),
    (run_main, ["frobnicate=1"], "unknown config key 'frobnicate'"),
]


@pytest.mark.parametrize(("main", "argv", "message"), BAD,
                         ids=[f"{m.__module__.split('.')[-2]} {' '.join(a)}" for m, a, _ in BAD])
def test_a_bad_key_or_value_is_one_error_line_and_status_2(main, argv, message, capsys, monkeypatch,
                                                           tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    assert _call(main, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "valid" in lines[0], err
    assert message in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_subprocess_exit_status_and_nothing_written_in_the_working_directory(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "kvcompress.latency", "frobnicate=1"], cwd=tmp_path, env=env,
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: unknown option")
    ok = subprocess.run([sys.executable, "-m", "kvcompress.latency", "table", "out=tables"], cwd=tmp_path, env=env,
                        check=False, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]  # no outputs/, .hydra/, multirun/ or logs
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["fu2024.md", "fu2024.tex"]


def test_preflight_of_a_tool_config(tmp_path) -> None:
    config = tmp_path / "tool.yaml"
    config.write_text("a: 1\nb: {c: [1, 2], d: {x: 1}}\nname: ???  # what it is called\nflag: false\nratio: 0.5\n")
    given = ["name=n"]
    assert preflight(["a=2", "b.c=[3]", "ratio=1", *given], config, strict=True) == [
        "a=2", "b.c=[3]", "ratio=1", "name=n"]
    assert preflight(["b.d={y: 2}", *given], config, strict=True) == ["++b.d={y: 2}", "name=n"]  # merged, new key
    assert preflight(["+b.e=1", *given], config, strict=True) == ["+b.e=1", "name=n"]
    for argv, message in [(["b.e=1"], "unknown option 'b.e'; valid choices: b.c, b.d"),
                          (["a=x"], "a=x is invalid; valid: an integer (default: 1)"),
                          (["b.c=[1.5]"], "b.c=[1.5] is invalid; valid: a list of integers"),
                          (["flag=1"], "valid: true or false"),
                          (["ratio=null"], "valid: a value (this option has no null)"),
                          (["~a"], "~a removes an option"),
                          (["a=1,2"], "is several values (a sweep)"),
                          ([], "name is required; valid: name=VALUE (what it is called)")]:
        with pytest.raises(KVCompressError) as err:
            preflight([*argv, *([] if not argv else given)], config, strict=True)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_config_defaults_are_the_library_defaults() -> None:
    """The CLI configs state the defaults the functions they call have (no silent drift)."""
    from kvcompress.methods.head.detect import DEFAULT_DEPTHS, DEFAULT_LENGTHS
    from kvcompress.zoo.testbed import check_grid

    detect = yaml.safe_load((CONFIGS / "head" / "detect.yaml").read_text())
    assert tuple(detect["lengths"]) == DEFAULT_LENGTHS and tuple(detect["depths"]) == DEFAULT_DEPTHS
    check = yaml.safe_load((CONFIGS / "zoo" / "check.yaml").read_text())
    params = inspect.signature(check_grid).parameters
    assert tuple(check["lengths"]) == params["lengths"].default and tuple(check["depths"]) == params["depths"].default
    assert check["distractors"] == params["num_distractors"].default and check["seed"] == params["seed"].default
    assert check["template"] == params["template"].default


def test_a_tool_runs_inside_another_hydra_context(tmp_path, capsys) -> None:
    """Hydra's global state is set aside and restored around a tool's command (as if called from a Hydra job)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kvcompress.configs", version_base=None):
        assert latency_main(["table", f"out={tmp_path}"]) == 0
        assert compose(config_name="config").seed == 0  # the outer context still works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fu2024.md", "fu2024.tex"]
