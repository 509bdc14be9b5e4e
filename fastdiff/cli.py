"""The `fastdiff` command line: sample | search | calibrate | eval {ref,fid,sweep} | train-{reference,value} | demo.

The commands live in `fastdiff.commands` (one module each, argparse only there); only the module of the
command being run is imported. This entry point turns bad input (a `ValueError` or `FileNotFoundError`
from any command) into one line on stderr and exit status 2, and a failed multi-process run (a rank that
stopped answering) into one line and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fastdiff import commands


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = commands.parse_args(argv)
    try:
        return int(commands.command_module(args.command_name).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastdiff {args.command_name}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not commands.is_failed_run(err):
            raise
        print(f"fastdiff {args.command_name}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
