"""`fastdiff demo` (what `make demo` runs): the reference quality-vs-speed sweep at a small N.

It runs eval/sweeps/reference.toml (DDPM-1000, DDIM-{100,50,20,10}, DPMSolverMultistep-{20,10,5} on the
shipped digit model) on `--num-images` images per method, scores them with the digit classifier's features
against the held-out digits, prints the table and says where it wrote results.jsonl, results.md and
pareto.png. The default N keeps it within about 10 minutes on 2 CPU cores; FD at small N is biased
upwards (it shrinks like 1/N), so compare rows with each other, not with the full-size run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_N = 100
SWEEP_FILE = Path("eval") / "sweeps" / "reference.toml"


def _sweep_file() -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / SWEEP_FILE).is_file():
            return root / SWEEP_FILE
    raise FileNotFoundError(f"{SWEEP_FILE} not found: run `fastdiff demo` from the fastdiff repository root.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num-images", dest="n", type=int, default=DEMO_N,
                        help=f"images per method (default {DEMO_N})")
    parser.add_argument("--out", default="runs/demo", help="output folder (re-running resumes)")


def run(args: argparse.Namespace) -> int:
    """Run the reference sweep at N = `args.n`; print the table and the output paths."""
    from fastdiff.eval.sweep import run_sweep

    start = time.perf_counter()
    sweep = _sweep_file()
    print(f"fastdiff demo: {sweep} with N = {args.n} images per method -> {args.out}", flush=True)
    rows = run_sweep(sweep, args.out, n=args.n)
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"{len(rows)} methods in {time.perf_counter() - start:.0f} s; wrote {out / 'results.jsonl'},")
    print(f"{out / 'results.md'} and {out / 'pareto.png'}. Full size: fastdiff eval sweep {SWEEP_FILE}")
    return 0
