"""Command-line code only: one module per `fastdiff` command (argparse lives here and nowhere else).

Every module has `add_arguments(parser)` and `run(args) -> int`; it turns flags into plain arguments of
library functions, which raise `ValueError` / `FileNotFoundError` on bad input. `fastdiff.cli` imports a
command's module only when that command runs, and turns those errors into one line on stderr and exit 2.
"""
