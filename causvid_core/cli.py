"""Command line: ``python -m causvid_core <command> ...``.

Each command is a ``Subcommand`` (name, help, argument setup, run function) registered in
``SUBCOMMANDS`` with ``register``; ``main`` builds one argparse sub-parser per entry. Add a
command by defining its two functions and calling ``register`` at import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One ``python -m causvid_core`` command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(command: Subcommand) -> Subcommand:
    """Add a command to ``SUBCOMMANDS`` (names must be unique)."""
    if command.name in SUBCOMMANDS:
        raise ValueError(f"subcommand {command.name!r} is already registered")
    SUBCOMMANDS[command.name] = command
    return command


def _lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); strength defaults to 1."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


# -- inspect ---------------------------------------------------------------------------------
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint file, model folder or hf://owner/repo/path reference")
    parser.add_argument("--preset", help="use this preset's DiT config instead of inferring it")
    parser.add_argument("--load", action="store_true", help="load the weights (slow) instead of headers")
    parser.add_argument("--dtype", help="with --load: float32, bfloat16 or float16 (default: the file's)")
    parser.add_argument(
        "--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:STRENGTH]",
        help="with --load: merge this LoRA and report matched/unmatched keys (repeatable)",
    )  # fmt: skip


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import describe, load_model
    from .config import get_preset

    config = get_preset(args.preset).dit if args.preset else None
    if args.load or args.lora:
        _, report = load_model(args.path, config=config, dtype=args.dtype, lora=args.lora or None)
    else:
        report = describe(args.path, config=config)
    print(report.summary())
    return 0


register(Subcommand("inspect", "print a checkpoint's layout, config, parameter count and dtype",
                    _inspect_arguments, _inspect))  # fmt: skip


# -- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered command."""
    parser = argparse.ArgumentParser(prog="python -m causvid_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print ``error: ...`` and return 2."""
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        return SUBCOMMANDS[args.command].run(args)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
