"""The ``vqgen`` command: ``vqgen serve ...`` (``vqgen <command> --help`` for each)."""

from __future__ import annotations

import sys

COMMANDS = {"serve": "a trained transformer behind an HTTP API and a web page"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:8} {what}" for name, what in COMMANDS.items())
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: vqgen <command> [options]\n\ncommands:\n{listing}", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from vqgen.serve.cli import main as serve  # here, not above: `vqgen --help` needs no torch

    return serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
