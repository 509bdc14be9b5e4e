"""Benchmark of DistriFusion (arXiv 2402.19481) / PCPP (arXiv 2412.02962) patch parallelism on CPU (gloo).

Three parts, measured in one run and written to eval/results/patch_parallel/ (results.json, results.md):

1. Speed: seconds per UNet call of the reference UNet architecture (random weights) on a large latent
   (4x128x128, a CFG batch of 2: null label + digit, as a guided pipeline calls it): 1 rank x 1 thread,
   1 rank x 2 threads, and 2 ranks x 1 thread (gloo) in sync, async (DistriFusion) and partial (PCPP)
   mode with both ranks on bands of the whole batch, and sync with `split_cfg` (one CFG half per rank,
   no bands). On a 2-core machine 2 ranks cannot beat 1 rank x 2 threads; the 2x1 vs 1x1 ratio is the
   patch-parallel speed-up.
2. Bytes: received bytes per rank per UNet call for SDXL (stabilityai/stable-diffusion-xl-base-1.0 UNet
   config) at 1024x1024 (latent 128x128, batch 2 for CFG, fp16) with N = 2, 4, 8 from the closed-form
   formula (`fastdiff.parallel.expected_bytes`), which is checked here against the bytes counted in the
   2-rank runs of part 1 (and in tests/test_parallel.py at N = 2 and 4).
3. Quality (only once the trained reference weights exist): digits from 2 ranks (sync / async / partial /
   naive) against the same seeds on one device: PSNR and Frechet distance on the shipped digit
   classifier's features (`lenet`). Every image comes from the harness (`MethodSpec` with or without
   `patch_parallel`, `sample_images`), on one process and on each of the 2 ranks.

Parts 1 and 2 stay below the harness on purpose: they time single UNet calls and count bytes per step on
a bare UNet, which whole-pipeline sampling cannot measure.

    nice -n 10 .venv/bin/python eval/bench_patch_parallel.py            # ~3-5 minutes on 2 busy cores
    .venv/bin/python eval/bench_patch_parallel.py --latent 32 --calls 2 --n 10 --steps 4 --out /tmp/pp   # smoke
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

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "eval" / "results" / "patch_parallel"
SPEED_CONFIGS = {
    "sync": dict(mode="sync", split_cfg=False),
    "async": dict(mode="async", warmup_steps=1, split_cfg=False),
    "partial": dict(mode="async", warmup_steps=1, conditioning="partial", split_cfg=False),
    "sync, split_cfg": dict(mode="sync", split_cfg=True),
}
QUALITY_CONFIGS = {
    "sync": dict(mode="sync", split_cfg=False),
    "async": dict(mode="async", warmup_steps=4, split_cfg=False),
    "async, GN stale": dict(mode="async", warmup_steps=4, group_norm="stale", split_cfg=False),
    "async, GN sync": dict(mode="async", warmup_steps=4, group_norm="sync", split_cfg=False),
    "partial": dict(mode="async", warmup_steps=4, conditioning="partial", split_cfg=False),
    "partial, GN sync": dict(mode="async", warmup_steps=4, conditioning="partial", group_norm="sync",
                             split_cfg=False),
    "naive": dict(mode="naive", split_cfg=False),
    "sync, split_cfg": dict(mode="sync", split_cfg=True),
}
QUALITY_SEED = 10_000  # quality images: seed 10000 + i, label i % 10 (as recorded)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that set layer shapes)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def _speed_inputs(latent: int):
    from fastdiff.models.unet import build_reference_unet, label_condition

    unet = build_reference_unet().eval()
    # not harness: a fixed random UNet input for timing single calls (no pipeline, no sampling)
    sample = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    labels = torch.tensor([10, 3])  # classifier-free guidance batch: null label, digit 3
    return unet, dict(sample=sample, encoder_hidden_states=label_condition(labels), class_labels=labels)


@torch.no_grad()
def _time_calls(unet, inputs: dict, calls: int, barrier=None) -> list[float]:
    times = []
    for i in range(calls):
        if barrier:
            barrier()
        start = time.perf_counter()
        unet(timestep=torch.tensor(500 - 10 * i), **inputs)
        times.append(time.perf_counter() - start)
    return times


def worker_speed(args) -> None:
    """One process of part 1: plain UNet (world 1) or one rank of a gloo job.

    Patch parallelism goes on the bare UNet here (with a scheduler for its step clock), not through a
    `MethodSpec`: the measures are per UNet call (seconds, bytes by step), below what the harness samples."""
    torch.set_num_threads(args.threads)
    unet, inputs = _speed_inputs(args.latent)
    result: dict = {}
    if args.world == 1:
        _time_calls(unet, inputs, 1)  # warm-up
        result["plain"] = _time_calls(unet, inputs, args.calls)
    else:
        import datetime

        import torch.distributed as dist

        from fastdiff.parallel import (
            PatchParallelConfig,
            disable_patch_parallel,
            enable_patch_parallel,
            reset_patch_parallel,
        )

        dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world,
                                timeout=datetime.timedelta(seconds=600))
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler()  # a bare UNet's step clock reads its timesteps: one UNet call per step
        scheduler.set_timesteps(1000)
        for name, kwargs in SPEED_CONFIGS.items():
            state = enable_patch_parallel(unet, PatchParallelConfig(**kwargs), scheduler=scheduler)
            _time_calls(unet, inputs, 2)  # warm-up (allocations, gloo connections)
            reset_patch_parallel(unet)
            times = _time_calls(unet, inputs, args.calls + 1, barrier=dist.barrier)
            result[name] = {"times": times[1:], "bytes": state.comm.bytes_by_step(),  # call 0 is synchronous
                            "pair_bytes": state.split.pair.bytes_by_step() if state.split else None}
            disable_patch_parallel(unet)
        dist.barrier()
    if args.rank == 0:
        torch.save(result, args.result)
    sys.stdout.flush()
    os._exit(0)


def _quality_method(name: str, steps: int, patch_parallel: dict | None = None):
    """The shipped sampler at guidance 3 (a CFG batch, which `split_cfg` splits), optionally patch-parallel."""
    from fastdiff.eval import MethodSpec
    from fastdiff.models import reference_record

    scheduler = reference_record()["default_sampler"]["scheduler"]
    return MethodSpec(name=name, scheduler=scheduler, steps=steps, guidance=3.0, patch_parallel=patch_parallel)


def _sample(pipe, method, n: int) -> tuple[torch.Tensor, float]:
    """Images 0..n-1 (seeds 10000 + i, labels i % 10, batches of 25) and the seconds they took."""
    from fastdiff.eval import sample_images

    samples = sample_images(pipe, method, n, base_seed=QUALITY_SEED, batch_size=25)
    return samples.images, samples.wall_s


def worker_quality(args) -> None:
    import datetime

    import torch.distributed as dist

    from fastdiff.models import load_reference_pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=900))
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = {}
    for name, kwargs in QUALITY_CONFIGS.items():  # every rank samples every image, each on its band
        images, seconds = _sample(pipe, _quality_method(name, args.steps, kwargs), args.n)
        result[name] = {"images": images, "seconds": seconds}
    if args.rank == 0:
        torch.save(result, args.result)
    dist.barrier()
    os._exit(0)


def _launch(kind: str, world: int, threads: int, extra: list[str], tmp: Path) -> dict:
    result, store = tmp / f"{kind}_{world}x{threads}.pt", tmp / f"store_{kind}_{world}x{threads}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, "--rank", str(r), "--world", str(world),
                               "--threads", str(threads), "--store", str(store), "--result", str(result), *extra],
                              env=env)
             for r in range(world)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{kind} worker failed (world {world}, exit {p.returncode})")
    return torch.load(result)


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median())


def part_speed(args, tmp: Path) -> dict:
    extra = ["--latent", str(args.latent), "--calls", str(args.calls)]
    load_before = os.getloadavg()[0]
    one = _launch("speed", 1, 1, extra, tmp)["plain"]
    two_threads = _launch("speed", 1, 2, extra, tmp)["plain"]
    ranks = _launch("speed", 2, 1, extra, tmp)
    rows = {"1 rank x 1 thread": _median(one), "1 rank x 2 threads": _median(two_threads)}
    for name in SPEED_CONFIGS:
        rows[f"2 ranks x 1 thread, {name}"] = _median(ranks[name]["times"])
    pair = ranks["sync, split_cfg"]["pair_bytes"]
    return {"seconds_per_call": rows, "counted_bytes": {k: ranks[k]["bytes"] for k in SPEED_CONFIGS},
            "split_cfg_pair_bytes_per_call": max(sum(v.values()) for v in pair.values()),
            "load_average": [load_before, os.getloadavg()[0]]}


def part_bytes(args, counted: dict) -> dict:
    from diffusers import UNet2DConditionModel

    from fastdiff.models.unet import build_reference_unet
    from fastdiff.parallel import PatchParallelConfig, expected_bytes, layer_plan

    # validation: the formula against the bytes counted by rank 0 of the 2-rank speed runs
    plan_ref = layer_plan(build_reference_unet())
    checks = {}
    for name, per_step in counted.items():
        cfg = PatchParallelConfig(**SPEED_CONFIGS[name])
        if cfg.split_cfg:  # no bands on 2 ranks: only the swap of output halves (pair bytes)
            continue
        per_step = {int(step): counts for step, counts in per_step.items()}  # JSON keys are strings (--skip-speed)
        ok = all(per_step[s] == expected_bytes(plan_ref, args.latent, args.latent, 2, 2, rank=0, mode=cfg.mode,
                                               conditioning=cfg.conditioning, warmup=s < cfg.warmup_steps)
                 for s in per_step)
        checks[name] = ok
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**SDXL_UNET)
    plan = layer_plan(sdxl)
    table = {}
    for n in (2, 4, 8):
        row = {}
        for cond in ("full", "partial"):
            b = expected_bytes(plan, 128, 128, n, 2, conditioning=cond, element_size=2)
            row[cond] = {**b, "total": sum(b.values())}
        row["partial/full"] = row["partial"]["total"] / row["full"]["total"]
        table[n] = row
    counts = {k: sum(s.kind == k for s in plan) for k in ("conv", "attn", "norm")}
    return {"formula_equals_counts": checks, "sdxl_layers": counts, "sdxl_1024": table}


def part_quality(args, tmp: Path) -> dict | None:
    weights = ROOT / "fastdiff" / "models" / "weights" / "reference_unet.safetensors"
    if not weights.exists():
        return None
    from fastdiff.eval import compute_stats, frechet_distance, get_extractor
    from fastdiff.models import load_reference_pipeline

    torch.set_num_threads(1)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    method = _quality_method("single device", args.steps)
    single, single_s = _sample(pipe, method, args.n)
    multi = _launch("quality", 2, 1, ["--n", str(args.n), "--steps", str(args.steps)], tmp)
    lenet = get_extractor("lenet")
    ref_stats = compute_stats(lenet(single))
    rows = {"single device": {"psnr_db": float("inf"), "fd_lenet": 0.0, "seconds_per_image": single_s / args.n}}
    for name, res in multi.items():
        mse = ((res["images"] - single) ** 2).flatten(1).mean(1).clamp_min(1e-12)
        stats = compute_stats(lenet(res["images"]))
        rows[f"2 ranks, {name}"] = {
            "psnr_db": float((10 * torch.log10(1 / mse)).mean()),
            "fd_lenet": float(frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma)),
            "seconds_per_image": res["seconds"] / args.n,
        }
    return {"n": args.n, "steps": args.steps, "scheduler": method.scheduler, "rows": rows}


def _markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [
        "# Patch parallelism (DistriFusion / PCPP) on CPU, gloo", "",
        f"Hardware: {meta['hardware']}; torch {meta['torch']}, diffusers {meta['diffusers']}; {meta['date']}.", "",
        f"## Speed: reference UNet architecture, latent 4x{meta['latent']}x{meta['latent']}, CFG batch 2, "
        f"median of {meta['calls']} calls", "",
    ]
    if "load_average" in res["speed"]:
        lines += [f"1-minute load average before / after: {res['speed']['load_average'][0]:.1f} / "
                  f"{res['speed']['load_average'][1]:.1f} on {os.cpu_count()} cores (above ~2 the timings are "
                  "dominated by other processes: compare only rows measured under similar load).", ""]
    lines += ["| setup | s / UNet call | speed-up vs 1x1 |", "|---|---|---|"]
    speed = res["speed"]["seconds_per_call"]
    base = speed["1 rank x 1 thread"]
    lines += [f"| {k} | {v:.3f} | {base / v:.2f}x |" for k, v in speed.items()]
    if "split_cfg_pair_bytes_per_call" in res["speed"]:
        lines += ["", "With `split_cfg` on 2 ranks there are no bands: each rank runs one CFG half of the batch and "
                  f"receives the other half's output, {res['speed']['split_cfg_pair_bytes_per_call'] / 1e6:.2f} MB "
                  "per UNet call (counted)."]
    b = res["bytes"]
    lines += ["", "## Received bytes per rank per UNet call, SDXL 1024x1024 (latent 128x128, CFG batch 2, fp16)", "",
              f"Formula checked against counted bytes of the 2-rank runs: {b['formula_equals_counts']}. "
              f"SDXL wrapped layers: {b['sdxl_layers']}. Interior rank (two neighbours); steady state (after warm-up).",
              "", "| N | DistriFusion MB (conv / attn / norm / output) | PCPP MB (conv / attn / norm / output) "
              "| PCPP / DF |",
              "|---|---|---|---|"]
    for n, row in b["sdxl_1024"].items():
        def fmt(d):
            return f"{d['total'] / 1e6:.1f} ({d['conv'] / 1e6:.1f} / {d['attn'] / 1e6:.1f} / " \
                   f"{d['norm'] / 1e6:.3f} / {d['output'] / 1e6:.1f})"
        lines.append(f"| {n} | {fmt(row['full'])} | {fmt(row['partial'])} | {row['partial/full']:.3f} |")
    q = res.get("quality")
    lines += ["", "## Quality: reference model (trained), 2 ranks vs one device, same seeds", ""]
    if q is None:
        lines.append("Not run: fastdiff/models/weights/reference_unet.safetensors did not exist yet.")
    else:
        lines += [f"N = {q['n']} digits (labels i % 10, seeds 10000+i), {q['steps']} steps {q['scheduler']}, "
                  "guidance 3.0; FD on the `lenet` digit-classifier features against the single-device images "
                  "(small N: FD is biased upwards, compare rows).", "",
                  "| setup | PSNR vs single (dB) | FD lenet vs single | s / image |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['psnr_db']:.2f} | {v['fd_lenet']:.4f} | {v['seconds_per_image']:.3f} |"
                  for k, v in q["rows"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--n", type=int, default=200, help="digits per quality row")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--worker", choices=["speed", "quality"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", default="")
    parser.add_argument("--result", default="", help="(worker) file for rank 0's measurements")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="results folder (default: the recorded one)")
    args = parser.parse_args()
    if args.worker == "speed":
        return worker_speed(args)
    if args.worker == "quality":
        return worker_quality(args)

    import diffusers

    args.out.mkdir(parents=True, exist_ok=True)
    # --skip-speed reuses the speed part of the results in --out, else of the recorded ones
    recorded = next((d / "results.json" for d in (args.out, OUT_DIR) if (d / "results.json").exists()), None)
    previous = json.loads(recorded.read_text()) if recorded else {}
    with tempfile.TemporaryDirectory() as tmp:
        speed = previous.get("speed") if args.skip_speed else part_speed(args, Path(tmp))
        res = {
            "meta": {"hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared)",
                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "latent": args.latent,
                     "calls": args.calls, "backend": "gloo"},
            "speed": speed,
            "bytes": part_bytes(args, speed["counted_bytes"]),
            "quality": part_quality(args, Path(tmp)),
        }
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "results.md").write_text(_markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
