"""`fastdiff eval sweep`: run a sweep TOML; print the table and where results.jsonl, results.md, pareto.png went."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep TOML (e.g. eval/sweeps/reference.toml)")
    parser.add_argument("--out", default=None, help="output folder (default runs/sweeps/<title>)")
    parser.add_argument("-n", "--num-images", dest="n", type=int, default=None, help="override eval.n")
    parser.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others before every rank fails")


def run(args: argparse.Namespace) -> int:
    from fastdiff.eval.distributed import init_distributed
    from fastdiff.eval.sweep import default_out_dir, load_sweep, run_sweep

    rank, _ = init_distributed(args.dist_timeout)
    config = load_sweep(args.sweep)
    rows = run_sweep(config, args.out, n=args.n)
    if rank == 0:
        out = Path(args.out) if args.out else default_out_dir(config)
        print((out / "results.md").read_text())
        print(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'pareto.png'} ({len(rows)} methods)")
    return 0
