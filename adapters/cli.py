"""The `loraplex` command.

Subcommands come from the `loraplex.commands` entry-point group (see pyproject.toml): each
entry is a function `register(subparsers)` that adds its parser and sets `func`. The shared
package hosts the dispatcher, so it never has to name the trainer or the server; those modules
keep their heavy imports (torch, vllm) inside the command functions so `loraplex --help` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from loraplex.adapters.errors import LoraplexError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Instruction data -> versioned LoRA adapters -> an OpenAI-compatible server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for ep in sorted(entry_points(group="loraplex.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as exc:  # one broken command must not take the others down
            print(f"loraplex: warning: command {ep.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except LoraplexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


def run_one(register: Callable[[argparse._SubParsersAction], None],
            argv: list[str] | None = None) -> int:
    """Run one command's parser alone (`python -m loraplex.trainer.evals.cli eval ...`), with
    the errors and exit codes of `loraplex` itself."""
    parser = argparse.ArgumentParser(prog="loraplex")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
