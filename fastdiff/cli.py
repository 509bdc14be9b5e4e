"""The `fastdiff` command line: sample | search | eval {ref,fid,sweep} | train-reference | demo.

Each subcommand lives beside the feature it drives: the module named in `COMMANDS` provides
`add_<name>_arguments(parser)` and `run_<name>(args) -> int`. A subcommand whose module does not
provide them yet exits with status 2 and says so; it never prints a made-up result.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command -> (module, function stem, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sample": ("fastdiff.eval.generate", "sample", "generate seeded images with a method into a folder"),
    "search": ("fastdiff.search.autodiffusion", "search", "AutoDiffusion search of a step schedule"),
    "eval ref": ("fastdiff.eval.sweep", "ref", "reference statistics of a folder or of the held-out digits"),
    "eval fid": ("fastdiff.eval.sweep", "fid", "FD/KID of a folder against stats or another folder"),
    "eval sweep": ("fastdiff.eval.sweep", "sweep", "run a sweep TOML: table, results.jsonl, Pareto plot"),
    "train-reference": ("fastdiff.models.train", "train_reference", "train the built-in MNIST reference model"),
    "train-value": ("fastdiff.guidance.value", "train_value", "train an SVDD-MC value network"),
    "demo": ("fastdiff.demo", "demo", "the project's demo job (what `make demo` runs)"),
}


def _load(command: str):
    module_name, stem, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("fastdiff"):
            return None, None
        raise
    return getattr(module, f"add_{stem}_arguments", None), getattr(module, f"run_{stem}", None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command, (_, _, help_text) in COMMANDS.items():
        words = command.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                group_parser = sub.add_parser(words[0], help=f"{words[0]} subcommands")
                groups[words[0]] = group_parser.add_subparsers(dest="subcommand", required=True)
            target = groups[words[0]]
        p = target.add_parser(words[-1], help=help_text, description=help_text)
        p.set_defaults(_command=command)
        add_arguments, _ = _load(command)
        if add_arguments is not None:
            add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, run = _load(args._command)
    if run is None:
        print(f"fastdiff {args._command}: not available yet in fastdiff (its issue is still open).", file=sys.stderr)
        return 2
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
