"""``python -m kvcompress.methods [list|readme [README.md]]`` — the registered methods: a table on the terminal, or the
README's method table regenerated in place (between its markers)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvcompress.registry import available_methods, method_table, readme_with_table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] == "list":
        print(method_table())
        return 0
    if args[0] == "readme":
        readme = Path(args[1] if len(args) > 1 else "README.md")
        readme.write_text(readme_with_table(readme.read_text()))
        print(f"method table of {len(available_methods())} methods written to {readme}")
        return 0
    print(f"error: unknown command {args[0]!r}; valid choices: list, readme", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
