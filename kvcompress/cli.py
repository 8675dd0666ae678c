"""One command-line idiom for every kvcompress tool: Hydra ``key=value`` overrides on a config under ``configs/``.

``python -m kvcompress.run``, ``kvcompress.bench``, ``kvcompress.latency``, ``kvcompress.methods.head`` and
``kvcompress.zoo`` each read a YAML config (installed as ``kvcompress.configs``) that holds every option with its
default, and take overrides in Hydra's syntax (``key=value``, ``a.b=value``, lists ``key=[a,b]``). A tool with
several commands takes the command as its first word (``python -m kvcompress.zoo check lengths=[256]``);
``--help`` prints the command's options with their defaults; Hydra's ``--cfg job``, ``--info`` and
``--hydra-help`` work as usual.

Bad input stops with ONE line ``error: ...; valid: ...`` and exit status 2 before any work: :func:`preflight`
checks every override against the config (the key exists; a value of the default's type), the command's declared
:attr:`Command.constraints` (:mod:`kvcompress.constraints`: ranges, choices, files that must exist or be writable)
and its ``validate`` check the composed config, and :func:`main` runs the command through ``hydra.main`` with
nothing written to the working directory (no ``outputs/``, no ``.hydra/``, no log files).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .constraints import Constraint, check
from .errors import KVCompressError, unknown_choice

CONFIG_DIR = Path(importlib.import_module("kvcompress.configs").__file__).parent

#: Hydra writes nothing where the user runs a tool: no .hydra/ folder, no outputs/ run folder, no log files.
QUIET_HYDRA = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra.job.chdir=false",
               "hydra/job_logging=none", "hydra/hydra_logging=none")
#: Hydra's flags a tool accepts besides ``--help`` / ``-h`` (``True``: the flag takes a value).
HYDRA_FLAGS = {"--cfg": True, "-c": True, "--package": True, "-p": True, "--resolve": False, "--info": False,
               "-i": False, "--hydra-help": False}
_INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_MISSING = object()
_RUNNING: list[Path] = []  # the config file of the command running (innermost last)


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a tool: its config (``"zoo/check"`` = ``configs/zoo/check.yaml``), what it runs on the composed
    config, and the paragraph ``--help`` prints. ``choose``: ``config=NAME`` picks the config among
    ``configs/<choose>/*.yaml`` (less ``hidden``), ``config=PATH.yaml`` any YAML file; ``config`` is the default."""

    config: str
    run: Callable[[Any], Any]
    help: str
    choose: str | None = None
    hidden: tuple[str, ...] = ()
    #: what each option accepts (:mod:`kvcompress.constraints`), checked on the composed config before ``run``
    constraints: Mapping[str, Constraint] = dataclasses.field(default_factory=dict)
    #: rules between options (or needing a file read), run after the constraints, still before ``run``
    validate: Callable[[Any], None] | None = None

    def checked_run(self, cfg: Any) -> Any:
        """``run(cfg)`` once the config passed :attr:`constraints` and :attr:`validate`."""
        check(cfg, self.constraints)
        if self.validate is not None:
            self.validate(cfg)
        return self.run(cfg)

    def choices(self) -> list[str]:
        if self.choose is None:
            return []
        return sorted(p.stem for p in (CONFIG_DIR / self.choose).glob("*.yaml") if p.stem not in self.hidden)


# -- overrides -------------------------------------------------------------------------------------------------------
def preflight(argv: Sequence[str], config: str | Path, *, groups: Sequence[str] = (),
              options: Callable[[str], list[str]] | None = None, plus_lists: Sequence[str] = (),
              strict: bool = False) -> list[str]:
    """Check command-line overrides against the YAML file ``config`` before Hydra sees them; returns the arguments
    for Hydra, raises :class:`KVCompressError` with a one-line message.

    Arguments that start with ``-`` or hold no ``=`` pass through. ``key=a+b`` for a key in ``plus_lists`` becomes
    Hydra's list ``key=[a,b]`` (in a sweep ``a+b,c`` becomes ``[a,b],[c]``). Values of a config group in ``groups``
    must be among ``options(group)``. Without ``strict`` the top-level key must be in the config or ``groups``
    (``hydra.*``, ``+key`` and ``~key`` are left to Hydra). With ``strict`` (a tool's own config, no groups): the
    full dotted key must be in the config (``+key=`` adds an entry to an existing mapping), its value of the
    default's kind (integer, number, true/false, list, mapping; a list of integers or numbers element by element),
    not a sweep, and every ``???`` option given; a mapping given for a mapping option is merged into it, new keys
    included (passed on as Hydra's ``++key=``, as OmegaConf's merge of a dot-list does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    text = Path(config).read_text()
    tree = yaml.safe_load(text) or {}
    top_keys = {str(k) for k in tree} - {"defaults"}
    out = []
    for arg in argv:
        if strict and arg.startswith("~") and "=" not in arg:
            raise KVCompressError(f"{arg} removes an option; valid: {arg[1:]}=VALUE (every option has a default)")
        if arg.startswith("-") or "=" not in arg:
            out.append(arg)
            continue
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in plus_lists and "+" in value and "[" not in value:
            # a+b -> [a,b] (Hydra's multi-select); in a sweep a+b,c -> [a,b],[c]
            if "," in value:
                value = ",".join(f"[{part.replace('+', ',')}]" for part in value.split(","))
            else:
                value = f"[{value.replace('+', ',')}]"
            arg = f"{key}={value}"
        out.append(arg)
    texts = [a for a in out if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except HydraException as err:
        raise KVCompressError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    for ov, arg in zip(overrides, texts):
        key = ov.key_or_group
        top = key.split(".")[0].split("/")[0]
        if top == "hydra":
            continue
        if strict:
            if _check_option(ov, arg, tree):  # a mapping merged into a mapping may bring new keys: Hydra's ++
                out[out.index(arg)] = "++" + arg.lstrip("+")
            continue
        if ov.is_add() or ov.is_delete():
            continue
        if key in groups:
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else ov.value()
            values = values if isinstance(values, list) else [values]
            valid = options(key) if options is not None else []
            for value in values:
                for name in re.split(r"[\[\],\s]+", str(value)):
                    if name and name not in valid:
                        raise unknown_choice(key, name, valid)
        elif top not in top_keys and top not in groups:
            raise unknown_choice("config key", top, sorted(top_keys | set(groups)))
    if strict:
        given = {ov.key_or_group.split(".")[0] for ov in overrides}
        for key, value in tree.items():
            if value == "???" and str(key) not in given:
                hint = re.search(rf"^{re.escape(str(key))}:\s*['\"]?\?\?\?['\"]?\s*#\s*(.+)$", text, re.MULTILINE)
                raise KVCompressError(f"{key} is required; valid: {key}=VALUE"
                                      + (f" ({hint.group(1).strip()})" if hint else ""))
    return out


def _check_option(ov: Any, arg: str, tree: dict) -> bool:
    """One override of a tool's own config (see :func:`preflight`, ``strict``); True when it merges a mapping into a
    mapping option (Hydra adds its new keys only as ``++key=``, as OmegaConf's merge would)."""
    key = ov.key_or_group
    if ov.is_delete():
        raise KVCompressError(f"{arg} removes an option; valid: {key.lstrip('~')}=VALUE (every option has a default)")
    if ov.is_sweep_override():
        raw = arg.partition("=")[2]
        raise KVCompressError(f"{arg} is several values (a sweep); valid: one value, or a list: {key}=[{raw}]")
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        if isinstance(node, dict):
            found = next((k for k in node if str(k) == part), _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            found = int(part)  # an element of a list: targets.0.limit=2
        else:
            found = _MISSING
        if found is _MISSING:
            if (ov.is_add() or ov.is_force_add()) and i == len(parts) - 1 and isinstance(node, dict):
                return False  # +key=value: a new entry of a mapping
            prefix = ".".join(parts[:i])
            siblings = [str(k) for k in node if str(k) != "defaults"] if isinstance(node, dict) else []
            raise unknown_choice("option", key, [f"{prefix}.{k}" if prefix else k for k in siblings])
        node = node[found]
    if ov.is_add():
        raise KVCompressError(f"{arg}: {key} is already an option; valid: {key}=VALUE (without the +)")
    value = ov.value()
    if isinstance(value, dict) and isinstance(node, dict):
        return True
    problem = _kind_mismatch(value, node)
    if problem and isinstance(node, list) and not isinstance(value, (list, dict)):
        problem = f"a list, e.g. {key}=[{arg.partition('=')[2]}]"
    if problem:
        raise KVCompressError(f"{arg} is invalid; valid: {problem} (default: {_flow(node)})")
    return False


def _kind_mismatch(value: Any, default: Any) -> str | None:
    """What ``value`` should be, judged by the default's kind; None when it fits. A ``null`` default (or ``???``)
    takes anything, a string default anything but a mapping or null; interpolations are left to Hydra."""
    if default is None or default == "???" or (isinstance(value, str) and "${" in value):
        return None
    if value is None:
        return "a value (this option has no null)"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, list):
        if not isinstance(value, list):
            return "a list, e.g. [a,b]"
        if default and all(isinstance(x, int) and not isinstance(x, bool) for x in default):
            element, kind = 0, "integers"
        elif default and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
            element, kind = 0.0, "numbers"
        else:
            return None
        return f"a list of {kind}" if any(_kind_mismatch(x, element) for x in value) else None
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping, e.g. {a: 1}"
    return "a value, not a mapping" if isinstance(value, dict) else None


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text[:-4] if text.endswith("\n...") else text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def split_args(args: Sequence[str], what: str = "key=VALUE") -> tuple[list[str], list[str]]:
    """``(flags, overrides)``: every argument is ``key=value`` or one of Hydra's flags (with its value); ``-m`` is
    refused (a tool runs one configuration per call; sweeps are for ``python -m kvcompress.run -m``)."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            if flag in ("-m", "--multirun"):
                raise KVCompressError(f"{arg}: a tool runs one configuration per call; valid: key=VALUE overrides, "
                                      "lists as key=[a,b] (sweeps: python -m kvcompress.run -m ...)")
            if flag not in HYDRA_FLAGS:
                raise unknown_choice("flag", arg, ["--help", *HYDRA_FLAGS])
            flags.append(arg)
            if "=" not in arg and (HYDRA_FLAGS[flag] or (flag in ("--info", "-i") and i + 1 < len(args)
                                                          and args[i + 1] in _INFO_TOPICS)):
                i += 1  # the flag's value
                if i < len(args):
                    flags.append(args[i])
        elif "=" not in arg and not arg.startswith("~"):
            raise KVCompressError(f"argument {arg!r} is not key=value; valid: {what}")
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


# -- commands --------------------------------------------------------------------------------------------------------
def main(prog: str, commands: Mapping[str, Command], argv: Sequence[str], default: str | None = None) -> Any:
    from .cli_help import command_help, print_help, tool_help

    """Run a tool's command: the first word of ``argv`` when it names one of ``commands``, else ``default``.

    ``--help`` / ``-h`` prints the command's help (None is returned); ``config=NAME|PATH`` picks the config of a
    command with ``choose``; the other arguments are checked (:func:`split_args`, :func:`preflight`) and handed to
    ``hydra.main``, and the command runs on the composed config. Returns what the command returns (None when a
    Hydra flag such as ``--cfg job`` only printed something). Bad input raises :class:`KVCompressError` before the
    command starts; anything the command raises propagates unchanged."""
    args = list(argv)
    name = args.pop(0) if args and args[0] in commands else default
    asks_help = any(a in ("-h", "--help") for a in args)
    if name is None:
        if asks_help:
            print_help(tool_help(prog, commands, default))
            return None
        if args and "=" not in args[0] and not args[0].startswith("-"):
            raise unknown_choice("command", args[0], commands)
        raise KVCompressError(f"{prog} needs a command first; valid: {', '.join(commands)} (--help says more)")
    cmd = commands[name]
    config_file = CONFIG_DIR / f"{cmd.config}.yaml"
    if cmd.choose is not None:
        args = _config_name_flags(args)
        picked = [a for a in args if a.startswith("config=")]
        args = [a for a in args if not a.startswith("config=")]
        if picked:
            config_file = _pick_config(cmd, picked[-1].partition("=")[2])
    if asks_help:
        print_help(command_help(prog, commands, name, default, config_file))
        return None
    named = [c for c in commands if c != default]
    if name == default and named and args and "=" not in args[0] and not args[0].startswith("-"):
        raise unknown_choice("command", args[0], named)
    flags, overrides = split_args(args, "key=VALUE options (--help lists them)")
    overrides = preflight(overrides, config_file, strict=True)
    return run_hydra(config_file, [*flags, *QUIET_HYDRA, *overrides], cmd.checked_run,
                     f"{prog} {name}" if name != default else prog)


def _config_name_flags(args: list[str]) -> list[str]:
    """Hydra's ``--config-name NAME`` / ``-cn NAME`` (``--config-name=NAME``) as ``config=NAME``."""
    out, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in ("--config-name", "-cn"):
            if not eq and i + 1 < len(args):
                i, value = i + 1, args[i + 1]
            out.append(f"config={value}")
        else:
            out.append(args[i])
        i += 1
    return out


def _pick_config(cmd: Command, value: str) -> Path:
    path = Path(value).expanduser()
    if value in cmd.choices():
        return CONFIG_DIR / str(cmd.choose) / f"{value}.yaml"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    raise unknown_choice("config", value, [*cmd.choices(), "<path to a .yaml file>"])


def run_hydra(config_file: Path, args: Sequence[str], task: Callable[[Any], Any], prog: str) -> Any:
    """``task(cfg)`` under ``hydra.main`` on ``config_file`` with the command line ``args`` (flags first, then the
    overrides); returns its value and re-raises what it raised (Hydra would print it and exit 1)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    outcome: dict[str, Any] = {}

    def job(cfg: Any) -> None:
        OmegaConf.set_struct(cfg, False)  # a plain config, as OmegaConf.load gives
        try:
            outcome["value"] = task(cfg)
        except BaseException as err:  # noqa: BLE001 — handed back to the caller below, not to Hydra's report
            outcome["error"] = err

    entry = hydra.main(version_base=None, config_path=str(config_file.parent), config_name=config_file.stem)(job)
    saved = sys.argv
    # called from inside another Hydra app (or an initialize() block): set its state aside and put it back after
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    outer_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    sys.argv = [prog, *args]
    _RUNNING.append(config_file)
    try:
        entry()
    finally:
        sys.argv = saved
        _RUNNING.pop()
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
        HydraConfig.instance().cfg = outer_cfg
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def current_config() -> Path:
    """The YAML file the running command was composed from (``config=`` may have picked it)."""
    if not _RUNNING:
        raise RuntimeError("no kvcompress command is running")
    return _RUNNING[-1]


def fail(err: KVCompressError) -> int:
    """Print ``error: <message>`` (one line) on stderr; returns the exit status 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2
