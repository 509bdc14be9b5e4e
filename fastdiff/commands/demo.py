"""`fastdiff demo` (what `make demo` runs): the reference quality-vs-speed sweep at a small N, cheapest row first.

It runs the methods of eval/sweeps/reference.toml that cost at most DEMO_MAX_ROWS UNet rows per image (DDIM,
DPM-Solver, fastdiff's DPM-Solver++, encoder propagation, searched schedules; DDPM-1000 is left to the full
sweep) on `--num-images` images each, ordered by UNet rows per image so the first row prints within seconds.
It scores them with the digit classifier's features against the held-out digits, prints each row as it
completes, then the table, and says where it wrote results.jsonl, results.md and pareto.png. FD at small N is
biased upwards (compare rows with each other, not with the full-size run). Re-running with the same --out
reuses the images already made. Measured: eval/results/demo/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastdiff.eval.methods import MethodSpec
    from fastdiff.eval.sweep import SweepConfig

DEMO_N = 50
DEMO_MAX_ROWS = 100  # UNet rows per image; DDPM-1000 alone would cost 2.5x the rest of the demo
SWEEP_FILE = Path("eval") / "sweeps" / "reference.toml"


def unet_rows_per_image(method: MethodSpec) -> int:
    """UNet batch rows one image costs: steps, doubled under classifier-free guidance (the reference default 3)."""
    guidance = 3.0 if method.guidance is None else method.guidance
    return method.num_steps() * (2 if guidance > 1.0 else 1)


def demo_plan(n: int = DEMO_N, sweep: SweepConfig | None = None) -> SweepConfig:
    """The sweep `fastdiff demo` runs: reference.toml (or `sweep`) at N = n, its methods of at most DEMO_MAX_ROWS
    UNet rows per image, cheapest first (stable)."""
    from dataclasses import replace

    from fastdiff.eval.sweep import load_sweep

    config = sweep if sweep is not None else load_sweep(_sweep_file())
    methods = [m for m in config.methods if unet_rows_per_image(m) <= DEMO_MAX_ROWS]
    return replace(config, n=n, methods=sorted(methods, key=unet_rows_per_image))


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
    from fastdiff.eval.sweep import load_sweep, run_sweep

    start = time.perf_counter()
    full = load_sweep(_sweep_file())
    plan = demo_plan(args.n, full)
    left_out = [m.name for m in full.methods if m not in plan.methods]
    print(f"fastdiff demo: {_sweep_file()} with N = {args.n} images per method, cheapest first -> {args.out}")
    print("FD: Frechet distance of digit-classifier features to held-out digits; lower is better, and biased "
          "upwards at small N", flush=True)

    done: list[str] = []

    def report(row: dict) -> None:
        done.append(row["method"])
        print(f"[{len(done)}/{len(plan.methods)}, {time.perf_counter() - start:.0f} s] {row['method']}: "
              f"FD {row['fd_lenet']:.2f}, {row['s_per_image']:.4f} s/image", flush=True)

    rows = run_sweep(plan, args.out, n=args.n, on_row=report)
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"{len(rows)} methods in {time.perf_counter() - start:.0f} s; wrote {out / 'results.jsonl'},")
    print(f"{out / 'results.md'} and {out / 'pareto.png'}.")
    print(f"Left to the full sweep ({', '.join(left_out)}) and N = 1000: fastdiff eval sweep {SWEEP_FILE}; "
          "recorded in eval/results/reference/.")
    return 0
