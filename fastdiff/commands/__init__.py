"""Command-line code only: one module per `fastdiff` command (argparse lives here and nowhere else).

Every command module has `add_arguments(parser)` and `run(args) -> int`; it turns flags into plain
arguments of library functions, which raise `ValueError` / `FileNotFoundError` on bad input.
`command_module` imports a command's module only when that command is parsed or run, so
`fastdiff sample --help` loads nothing of the others. `fastdiff.cli.main` is the entry point.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

DESCRIPTION = "The `fastdiff` command line: sample | search | calibrate | eval {ref,fid,sweep} | train-reference | " \
              "train-value | demo."

# command -> one-line help
COMMANDS: dict[str, str] = {
    "sample": "generate seeded images with a method into a folder",
    "search": "AutoDiffusion search of a step schedule",
    "calibrate": "encoder propagation key steps measured for a model within a FLOPs budget",
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
    elif command == "calibrate":
        from fastdiff.commands import calibrate as module
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


def is_failed_run(err: BaseException) -> bool:
    """A multi-process run that failed (a rank stopped answering): `fastdiff.eval.distributed.DistributedError`."""
    from fastdiff.eval.distributed import DistributedError  # only on this path: `--help` stays torch-free

    return isinstance(err, DistributedError)


def _requested(argv: Sequence[str]) -> str | None:
    """The command named by the first words of `argv` ("eval sweep", "sample", ...), if any."""
    words = " ".join(argv[:2]) if argv[:1] == ["eval"] else (argv[0] if argv else "")
    return words if words in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; only `command` (if given) gets its arguments, so only its module loads."""
    parser = argparse.ArgumentParser(prog="fastdiff", description=DESCRIPTION)
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
        p.set_defaults(command_name=name)
        if name == command:
            command_module(name).add_arguments(p)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; only the named command's module is imported (its `command_name` is set)."""
    return build_parser(_requested(argv)).parse_args(list(argv))
