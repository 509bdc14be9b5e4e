"""The `fastdiff` command line: sample | search | eval {ref,fid,sweep} | train-reference | train-value | demo.

Each command is one module of `fastdiff.commands` with `add_arguments(parser)` and `run(args) -> int`.
Only the module of the command being run is imported, so `fastdiff sample --help` loads nothing of
the others. Bad input (a `ValueError` or `FileNotFoundError` from any command) becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

# command -> one-line help
COMMANDS: dict[str, str] = {
    "sample": "generate seeded images with a method into a folder",
    "search": "AutoDiffusion search of a step schedule",
    "eval ref": "reference statistics of a folder or of the held-out digits",
    "eval fid": "FD/KID of a folder against stats or another folder",
    "eval sweep": "run a sweep TOML: table, results.jsonl, Pareto plot",
    "train-reference": "train the built-in MNIST reference model",
    "train-value": "train an SVDD-MC value network",
    "demo": "the project's demo job (what `make demo` runs)",
}


def command_module(command: str) -> ModuleType:
    """The `fastdiff.commands` module of `command` (imported here, on first use)."""
    if command == "sample":
        from fastdiff.commands import sample as module
    elif command == "search":
        from fastdiff.commands import search as module
    elif command == "eval ref":
        from fastdiff.commands import eval_ref as module
    elif command == "eval fid":
        from fastdiff.commands import eval_fid as module
    elif command == "eval sweep":
        from fastdiff.commands import eval_sweep as module
    elif command == "train-reference":
        from fastdiff.commands import train_reference as module
    elif command == "train-value":
        from fastdiff.commands import train_value as module
    elif command == "demo":
        from fastdiff.commands import demo as module
    else:
        raise KeyError(f"no command {command!r}; commands: {', '.join(COMMANDS)}")
    return module


def _requested(argv: Sequence[str]) -> str | None:
    """The command named by the first words of `argv` ("eval sweep", "sample", ...), if any."""
    words = " ".join(argv[:2]) if argv[:1] == ["eval"] else (argv[0] if argv else "")
    return words if words in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; only `command` (if given) gets its arguments, so only its module loads."""
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {}  # "eval" -> the subparsers of `fastdiff eval`
    for name, help_text in COMMANDS.items():
        words = name.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                group = sub.add_parser(words[0], help=f"{words[0]} subcommands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True)
            target = groups[words[0]]
        p = target.add_parser(words[-1], help=help_text, description=help_text)
        p.set_defaults(_command=name)
        if name == command:
            command_module(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _requested(argv)
    args = build_parser(command).parse_args(argv)
    try:
        return int(command_module(args._command).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastdiff {args._command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
