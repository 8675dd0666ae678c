"""``--help`` of the kvcompress tools (:mod:`kvcompress.cli`): the tool's commands, or one command's options with
their defaults (its config file, comments included)."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import CONFIG_DIR

if TYPE_CHECKING:
    from .cli import Command


def _usage(prog: str, commands: Mapping[str, Command], name: str | None, default: str | None) -> str:
    named = [c for c in commands if c != default]
    if name is None:  # the tool as a whole
        word = ("[" + "|".join(named) + "] " if default is not None else "{" + "|".join(named) + "} ")
        return f"usage: {prog} {word}[key=value ...]"
    cmd = commands[name]
    pick = f"[config={'|'.join(cmd.choices())}|PATH.yaml] " if cmd.choose else ""
    return f"usage: {prog} {'' if name == default else name + ' '}{pick}[key=value ...]"


def _paragraph(text: str) -> str:
    return textwrap.fill(" ".join(textwrap.dedent(text).split()), width=100)


def tool_help(prog: str, commands: Mapping[str, Command], default: str | None) -> str:
    """The help of a tool whose command was not named: usage and one paragraph per command."""
    lines = [_usage(prog, commands, None, default), ""]
    for name, cmd in commands.items():
        lines += [f"{name}:", textwrap.indent(_paragraph(cmd.help), "  "), ""]
    lines.append(f"`{prog} COMMAND --help` lists a command's options and their defaults.")
    return "\n".join(lines)


def command_help(prog: str, commands: Mapping[str, Command], name: str, default: str | None,
                 config_file: Path) -> str:
    """Usage, the command's paragraph (and the other commands'), then its options with their defaults: the YAML of
    its config, comments included (long text blocks shortened)."""
    cmd = commands[name]
    lines = [_usage(prog, commands, name, default), "", _paragraph(cmd.help), ""]
    others = [c for c in commands if c != name]
    if name == default and others:
        lines += [f"Other commands: {', '.join(others)} (`{prog} COMMAND --help`).", ""]
    shown = config_file.relative_to(CONFIG_DIR.parent) if config_file.is_relative_to(CONFIG_DIR.parent) else config_file
    lines += [f"Options (key=value in Hydra's syntax: a.b=value, lists key=[a,b]; defaults from {shown}):", ""]
    body = _option_lines(config_file.read_text())
    lines += [textwrap.indent(body, "  ") if body.strip() else "  (none)", "",
              "Hydra's --cfg job prints the resolved config, --info what it was composed from."]
    return "\n".join(lines)


def _option_lines(text: str) -> str:
    """The config's text with a multi-line block scalar (``key: |``) shortened to one line."""
    out: list[str] = []
    block_indent: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue
            block_indent = None
        match = re.match(r"^(\s*)([^#\s][^:]*):\s*[|>][-+]?\s*(#.*)?$", line)
        if match:
            block_indent = indent
            out.append(f"{match.group(1)}{match.group(2)}: |  # (a block of text; see the file)")
            continue
        out.append(line)
    return "\n".join(out).strip("\n")


def print_help(text: str) -> None:
    """Print help; a reader that stops early (``| head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
