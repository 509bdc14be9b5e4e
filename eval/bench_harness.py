"""Benchmark of the eval harness's scale-out: images/s of `generate_images` with 1 process vs 2 (torchrun, gloo).

Runs the same seeded generation (reference model, DDIM, N images) three ways, each in a fresh process:
1 process x 1 thread, 1 process x 2 threads (the natural single-process baseline on 2 cores), and
2 processes x 1 thread launched by `torchrun --standalone --nproc_per_node 2` (gloo). It checks that the
2-process PNGs are bit-identical to the 1 x 1 ones, prints a side-by-side table and writes
eval/results/harness/{results.json,results.md}. Uses the trained reference weights when they exist,
else the same architecture with random weights (the cost per image is the same; the table says which).

    nice -n 10 .venv/bin/python eval/bench_harness.py            # ~2-4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "eval" / "results" / "harness"


def _pipe():
    from fastdiff.models import WEIGHTS_DIR

    if (WEIGHTS_DIR / "reference_unet.safetensors").exists():
        from fastdiff.models import load_reference_pipeline

        pipe, weights = load_reference_pipeline(), "trained reference weights"
    else:
        from diffusers import DDIMScheduler

        from fastdiff.models.pipeline import ReferencePipeline
        from fastdiff.models.unet import build_reference_unet
        from fastdiff.models.weights import SCHEDULER_CONFIG

        pipe = ReferencePipeline(unet=build_reference_unet(0).eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
        weights = "reference architecture, random weights (trained weights absent)"
    pipe.set_progress_bar_config(disable=True)
    return pipe, weights


def worker(args: argparse.Namespace) -> None:
    import torch

    from fastdiff.eval.distributed import init_distributed
    from fastdiff.eval.generate import generate_images
    from fastdiff.eval.methods import MethodSpec

    rank, world = init_distributed()
    pipe, weights = _pipe()
    method = MethodSpec(name=f"DDIM-{args.steps}", steps=args.steps, guidance=1.0)
    # warm-up outside the timed run (first-call allocations), on one seed, in a scratch folder
    generate_images(pipe, method, Path(args.folder) / "warmup", n=world, batch_size=1, progress=False)
    result = generate_images(pipe, method, Path(args.folder) / "images", args.n, 0, args.batch_size, progress=False)
    if rank == 0:
        record = {**result.__dict__, "weights": weights, "threads_per_process": torch.get_num_threads()}
        Path(args.folder, "result.json").write_text(json.dumps(record))


def _launch(folder: Path, procs: int, threads: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    script = [str(Path(__file__).resolve()), "--worker", "--folder", str(folder), "--num-images", str(args.n),
              "--steps", str(args.steps), "--batch-size", str(args.batch_size)]  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *script]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    record = json.loads((folder / "result.json").read_text())
    record["launch_wall_s"] = time.perf_counter() - start
    return record


def _pixels(folder: Path) -> np.ndarray:
    import PIL.Image

    return np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob("*.png"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", "--num-images", dest="n", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import diffusers
    import torch

    from fastdiff import __version__
    from fastdiff.eval.generate import hardware_description

    configs = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread (gloo)", 2, 1)]
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, procs, threads in configs:
            record = _launch(Path(tmp) / f"p{procs}t{threads}", procs, threads, args)
            rows.append({"config": label, "processes": procs, "threads_per_process": threads, **record})
            print(f"{label}: {record['images_per_s']:.2f} images/s", flush=True)
        base = _pixels(Path(tmp) / "p1t1" / "images")
        for row in rows:
            other = _pixels(Path(tmp) / f"p{row['processes']}t{row['threads_per_process']}" / "images")
            row["identical_to_1x1"] = bool(np.array_equal(base, other))
            row["max_grey_level_diff"] = int(np.abs(base.astype(int) - other.astype(int)).max())
    load_after = os.getloadavg()
    ref = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_1x1"] = row["images_per_s"] / ref
    two_vs_one = {r["config"]: r for r in rows}
    ratio_2p = two_vs_one["2 processes x 1 thread (gloo)"]["images_per_s"]
    summary = {
        "n": args.n, "method": f"DDIM-{args.steps}", "batch_size": args.batch_size, "weights": rows[0]["weights"],
        "hardware": hardware_description().split(" (torch")[0], "load_average_before": load_before,
        "load_average_after": load_after, "versions": {"fastdiff": __version__, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "python": platform.python_version()},
        "speedup_2proc_vs_1x1": ratio_2p / ref,
        "speedup_2proc_vs_1x2": ratio_2p / two_vs_one["1 process x 2 threads"]["images_per_s"],
        "rows": rows,
    }  # fmt: skip
    lines = [
        "# eval harness scale-out: images/s, 2 processes vs 1",
        "",
        f"- generation only (`fastdiff.eval.generate_images`), {summary['method']}, N = {args.n} images, batch "
        f"{args.batch_size}, no feature extractor; {summary['weights']}",
        f"- hardware: {summary['hardware']}; load average before/after: "
        f"{', '.join(f'{x:.1f}' for x in load_before)} / {', '.join(f'{x:.1f}' for x in load_after)} "
        "(other jobs shared these cores: absolute numbers are noisy, the run is one measurement)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
        "",
        "| configuration | images/s | s/image | speed-up vs 1x1 | PNGs identical to 1x1 |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['images_per_s']:.2f} | {r['s_per_image']:.4f} | {r['speedup_vs_1x1']:.2f}x | "
            f"{'yes' if r['identical_to_1x1'] else 'no (max diff ' + str(r['max_grey_level_diff']) + ')'} |"
        )
    lines += ["", f"2 processes vs 1 x 2 threads: {summary['speedup_2proc_vs_1x2']:.2f}x", ""]
    text = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (OUT / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
