"""Benchmark: Faster Diffusion (arXiv 2312.09608) encoder propagation — FLOPs, CPU wall time and quality.

Five parts, each measured side by side in one run and written to eval/results/encoder_propagation/:

1. flops:   UNet FLOPs counted with torch.utils.flop_counter.FlopCounterMode on meta tensors (classic
            attention processor so attention matmuls are counted) for the SD1.5 UNet (512x512, latent 64x64)
            and the SDXL UNet (1024x1024, latent 128x128): full forward, hooked key / non-key forward, the
            encoder share (its reciprocal complement is the speed-up bound) and the fd50 / fd20 savings.
2. speed:   wall time of the unchanged StableDiffusionPipeline (prompt_embeds route, DDIM 50 steps, CFG 7.5)
            on an SD-shaped UNet (block_out_channels (64, 128, 256, 256), cross_attention_dim 256, 32x32
            latent, random weights): full vs fd50 sequential vs fd50 parallel vs DeepCache, batch 1 and 4.
3. premise: on the trained reference model, how much each encoder and decoder part's output changes
            between adjacent DDIM steps (the paper's observation, measured here).
4. quality: the trained reference model (fastdiff/models/weights): UNet FLOPs of the call, Frechet distance
            on the digit classifier's features against the 1,000 held-out digits, and PSNR to the full-UNet
            images of the same seeds, for fd50 (with / without noise injection), other key-step lists and
            DeepCache at its headline settings and at deeper branches that match the FLOPs; then each
            encoder-propagation row beside the DeepCache row of nearest FLOPs.
5. latency: the same methods' wall time on the reference model at batch 1 and 8, with parallel decoding.

Run:  nice -n 10 .venv/bin/python eval/bench_encoder_propagation.py [--parts flops,speed,premise,quality,latency]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers.hooks import ModelHook

from fastdiff.hooks import EncoderPropagationConfig, encoder_propagation
from fastdiff.hooks.encoder_propagation import key_step_indices

OUT = Path(__file__).parent / "results" / "encoder_propagation"
STEPS = 50


def _env() -> dict:
    import diffusers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------- 1. FLOPs
def _sd15_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return unet, (torch.empty(1, 4, 64, 64), torch.empty(1, 77, 768)), {}


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    added = {"added_cond_kwargs": {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)}}
    return unet, (torch.empty(1, 4, 128, 128), torch.empty(1, 77, 2048)), added


def flops_table() -> list[dict]:
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for name, build in (("SD1.5 UNet, 512x512", _sd15_unet), ("SDXL UNet, 1024x1024", _sdxl_unet)):
        with torch.device("meta"):
            unet, (x, ehs), extra = build()
        unet.set_attn_processor(AttnProcessor())

        def count(t, unet=unet, x=x, ehs=ehs, extra=extra) -> int:
            with FlopCounterMode(display=False) as counter:
                unet(x, t, ehs, **extra)
            return counter.get_total_flops()

        full = count(torch.tensor(999))
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(STEPS)
        with encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0, 2]), scheduler=scheduler):
            key = count(scheduler.timesteps[0])
            non_key = count(scheduler.timesteps[1])  # a non-key step: decoder only
        share = 1 - non_key / full
        row = {
            "model": name,
            "full_gflops": full / 1e9,
            "key_gflops": key / 1e9,
            "non_key_gflops": non_key / 1e9,
            "encoder_share": share,
            "bound_speedup": full / non_key,
        }
        for preset, n in (("fd50", 50), ("fd20", 20)):
            k = len(key_step_indices(preset, n))
            row[f"{preset}_saving"] = 1 - (k * key + (n - k) * non_key) / (n * full)
        rows.append(row)
        print(
            f"  {name}: {full / 1e9:.1f} GFLOPs/forward, encoder share {share:.1%}, fd50 saving "
            f"{row['fd50_saving']:.1%}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------------------------- 2. speed
def _mid_pipeline():
    from diffusers import UNet2DConditionModel

    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256)
    pipe.register_modules(unet=unet.eval())
    return pipe


class _DeepCache:
    """DeepCache (horseee/DeepCache, `pip install deepcache`) as a context manager; None if not installed."""

    def __init__(self, pipe, interval: int, branch: int = 0) -> None:
        from DeepCache import DeepCacheSDHelper

        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=interval, cache_branch_id=branch)

    def __enter__(self):
        self.helper.enable()

    def __exit__(self, *exc):
        self.helper.disable()


def _deepcache_available() -> bool:
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        return False
    return True


def _methods(pipe, deepcache_intervals):
    import contextlib

    methods = {
        "full UNet": contextlib.nullcontext,
        "fd50 sequential": lambda: encoder_propagation(pipe, EncoderPropagationConfig(key_steps="fd50")),
        "fd50 parallel": lambda: encoder_propagation(pipe, EncoderPropagationConfig(key_steps="fd50", parallel=True)),
    }
    if _deepcache_available():
        for interval in deepcache_intervals:
            methods[f"DeepCache I={interval} B=0"] = lambda i=interval: _DeepCache(pipe, i)
    return methods


def speed_table(batches=(1, 4), repeats: int = 1) -> list[dict]:
    pipe = _mid_pipeline()
    rows = []
    for batch in batches:
        embeds = torch.randn(batch, 77, 256, generator=torch.Generator().manual_seed(0))
        negative = torch.zeros_like(embeds)

        def run(steps: int, embeds=embeds, negative=negative) -> torch.Tensor:
            return pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                num_inference_steps=steps,
                height=64,
                width=64,
                guidance_scale=7.5,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images

        methods = _methods(pipe, (2, 3))
        wall: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):  # round-robin over the methods, so a change of machine load hits all of them
            for name, context in methods.items():
                with torch.no_grad(), context():
                    run(2)  # warm-up
                    start, cpu_start = time.perf_counter(), time.process_time()
                    run(STEPS)
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
        base, cpu_base = min(wall["full UNet"]), min(cpu["full UNet"])
        for name in methods:
            seconds, cpu_seconds = min(wall[name]), min(cpu[name])
            rows.append(
                {
                    "batch": batch,
                    "method": name,
                    "repeats": repeats,
                    "seconds": seconds,
                    "speedup": base / seconds,
                    "cpu_seconds": cpu_seconds,
                    "cpu_speedup": cpu_base / cpu_seconds,
                }
            )
            print(
                f"  batch {batch}  {name:22s} wall {seconds:7.2f} s {base / seconds:5.2f}x   "
                f"process CPU {cpu_seconds:7.2f} s {cpu_base / cpu_seconds:5.2f}x",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------------------------- 4. quality
# Key-step lists tried on the reference model besides the paper's presets (0 = noisiest step of 50). The
# premise part below shows why early steps are the safe ones to propagate here: conv_in's output changes
# 0.9% per step over steps 1-24 and 5-7% per step over the last 25.
EARLY_K2 = list(range(0, 25, 2)) + list(range(25, STEPS))  # every other step in the first half, then all
EARLY_K4 = list(range(0, 25, 4)) + list(range(25, STEPS))  # every 4th step in the first half, then all


def _quality_methods(pipe, parallel: bool = False) -> dict:
    """Name -> context factory: fastdiff schedules, then DeepCache at its headline and FLOP-matched settings."""
    import contextlib

    def fd(**kwargs):
        return lambda: encoder_propagation(pipe, EncoderPropagationConfig(parallel=parallel, **kwargs))

    methods = {
        "full UNet": contextlib.nullcontext,
        "fd50": fd(key_steps="fd50"),
        "fd50 + noise injection": fd(key_steps="fd50", noise_injection_alpha=0.003, noise_injection_tau=500),
        "every 2nd step (k=2)": fd(key_steps=2),
        "early k=4 (0-24 every 4th, then all)": fd(key_steps=EARLY_K4),
        "early k=2 (0-24 every 2nd, then all)": fd(key_steps=EARLY_K2),
    }
    if _deepcache_available():
        # I=2/3 B=0 are DeepCache's headline settings; deeper branches recompute more and match the FLOPs of
        # the fastdiff rows (branch b: block b // 3, layer b % 3 of DeepCache's numbering)
        for interval, branch in ((2, 0), (3, 0), (2, 3), (2, 5), (2, 6)):
            methods[f"DeepCache I={interval} B={branch}"] = lambda i=interval, b=branch: _DeepCache(pipe, i, b)
    return methods


def _call_flops(pipe, context) -> int:
    """UNet FLOPs of one 50-step batch-1 call of the reference pipeline (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), context():
        pipe(
            class_labels=[0],
            guidance_scale=1.0,
            num_inference_steps=STEPS,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
    return counter.get_total_flops()


def quality_table(n: int, guidance_scale: float = 1.0) -> list[dict] | None:
    from fastdiff.eval.metrics import compute_stats, frechet_distance
    from fastdiff.models import WEIGHTS_DIR, load_digit_classifier, load_reference_pipeline
    from fastdiff.models.data import load_digits

    if not (Path(WEIGHTS_DIR) / "reference_unet.safetensors").exists():
        print(f"  skipped: no trained reference weights in {WEIGHTS_DIR} (run `fastdiff train-reference`)")
        return None
    from diffusers import DDIMScheduler

    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # DDIM-50 as in the paper: the shipped default (DDPM, ancestral) adds fresh noise at every step, which
    # a non-key step's decoder -- fed encoder features of an older latent -- cannot see or remove. Guidance
    # 1.0: on this model DDIM-50 with the shipped x0 clipping collapses from guidance 2 on (the stress table in
    # eval/results/reference_model/), which would measure the collapse, not the accelerator.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    clf = load_digit_classifier()
    heldout, _ = load_digits("heldout")
    with torch.no_grad():
        ref = compute_stats(clf.features(heldout).numpy())
    labels = [i % 10 for i in range(n)]
    # sequential decoding only: parallel equals sequential to 1e-5 (tests), and at batch 100 on a CPU the
    # batched decoders of a group bring no speed
    methods = _quality_methods(pipe)
    full_flops = _call_flops(pipe, methods["full UNet"])
    rows, full_images = [], None
    for name, context in methods.items():
        flops = _call_flops(pipe, context) / full_flops
        images, start = [], time.perf_counter()
        with torch.no_grad(), context():
            for lo in range(0, n, 100):
                ids = range(lo, min(n, lo + 100))
                out = pipe(
                    class_labels=[labels[i] for i in ids],
                    guidance_scale=guidance_scale,
                    num_inference_steps=STEPS,
                    output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in ids],
                )
                images.append(out.images)
        seconds = time.perf_counter() - start
        images = torch.cat(images)
        with torch.no_grad():
            stats = compute_stats(clf.features(images).numpy())
        fd = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        if full_images is None:
            full_images, full_fd, full_seconds = images, fd, seconds
        mse = ((images - full_images) ** 2).flatten(1).mean(1).clamp_min(1e-12)
        psnr = float((10 * torch.log10(1 / mse)).mean()) if name != "full UNet" else float("inf")
        rows.append(
            {
                "method": name,
                "flops": flops,
                "fd": fd,
                "fd_change": fd / full_fd - 1,
                "psnr_vs_full": psnr,
                "seconds": seconds,
                "speedup": full_seconds / seconds,
            }
        )
        print(
            f"  {name:38s} FLOPs {flops:5.3f}  FD {fd:7.3f} ({fd / full_fd - 1:+.1%})  PSNR {psnr:6.2f} dB  "
            f"{full_seconds / seconds:4.2f}x",
            flush=True,
        )
    return rows


def matched_pairs(rows: list[dict]) -> list[dict]:
    """Each encoder-propagation row beside the DeepCache row with the nearest UNet FLOPs (pure function)."""
    deepcache = [r for r in rows if r["method"].startswith("DeepCache")]
    pairs = []
    for row in rows:
        if row["method"] == "full UNet" or row["method"].startswith("DeepCache") or not deepcache:
            continue
        other = min(deepcache, key=lambda r: abs(r["flops"] - row["flops"]))
        pairs.append(
            {
                "fastdiff": row["method"],
                "fastdiff_flops": row["flops"],
                "fastdiff_psnr": row["psnr_vs_full"],
                "deepcache": other["method"],
                "deepcache_flops": other["flops"],
                "deepcache_psnr": other["psnr_vs_full"],
            }
        )
    return pairs


def latency_table(batches=(1, 8), repeats: int = 3) -> list[dict] | None:
    """Wall time of one DDIM-50 call on the reference model at small batch: parallel decoding vs DeepCache.

    At batch 1 this tiny UNet is bound by per-call overhead, as a large GPU is at small batch: the regime in
    which the paper's parallel decoding gains more than the FLOPs. Round-robin over the methods, best of
    `repeats`.
    """
    from diffusers import DDIMScheduler

    from fastdiff.models import WEIGHTS_DIR, load_reference_pipeline

    if not (Path(WEIGHTS_DIR) / "reference_unet.safetensors").exists():
        return None
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    methods = _quality_methods(pipe, parallel=True)
    methods.pop("fd50 + noise injection")  # same cost as fd50
    rows = []
    for batch in batches:

        def run(batch=batch) -> None:
            pipe(
                class_labels=[i % 10 for i in range(batch)],
                guidance_scale=1.0,
                num_inference_steps=STEPS,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            )

        wall: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, context in methods.items():
                with torch.no_grad(), context():
                    run()  # warm-up
                    start = time.perf_counter()
                    run()
                    wall[name].append(time.perf_counter() - start)
        base = min(wall["full UNet"])
        for name in methods:
            label = name if name.startswith(("full", "DeepCache")) else f"{name}, parallel"
            seconds = min(wall[name])
            rows.append({"batch": batch, "method": label, "seconds": seconds, "speedup": base / seconds})
            print(f"  batch {batch}  {label:48s} {seconds:6.3f} s  {base / seconds:4.2f}x", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- 3. premise
class _OutputRecorder(ModelHook):
    """Keeps a copy of its module's output at every call (a removable diffusers hook; observation only)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def post_forward(self, module: torch.nn.Module, output):
        sample = output[0] if isinstance(output, tuple) else output
        self.outputs.append(sample.detach().clone())
        return output


def premise_table(n: int = 50) -> list[dict] | None:
    """Faster Diffusion's premise on the reference model: relative change of each UNet part's output per step."""
    from diffusers import DDIMScheduler
    from diffusers.hooks import HookRegistry

    from fastdiff.models import WEIGHTS_DIR, load_reference_pipeline

    if not (Path(WEIGHTS_DIR) / "reference_unet.safetensors").exists():
        return None
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    parts = [("conv_in", unet.conv_in)] + [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    parts += [("mid_block", unet.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    recorders = {name: _OutputRecorder() for name, _ in parts}
    for name, module in parts:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(recorders[name], "fastdiff_bench_rec")
    try:
        with torch.no_grad():
            pipe(
                class_labels=[i % 10 for i in range(n)],
                guidance_scale=1.0,
                num_inference_steps=STEPS,
                output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(n)],
            )
    finally:
        for _, module in parts:
            module._diffusers_hook.remove_hook("fastdiff_bench_rec", recurse=False)
    rows = []
    for name, recorder in recorders.items():
        f = recorder.outputs
        change = [
            float(((f[i] - f[i - 1]).flatten(1).norm(dim=1) / f[i - 1].flatten(1).norm(dim=1)).mean())
            for i in range(1, len(f))
        ]
        half = STEPS // 2
        rows.append(
            {
                "part": name,
                "role": "decoder" if name.startswith("up") else "encoder",
                "mean_all": sum(change) / len(change),
                "mean_early": sum(change[: half - 1]) / (half - 1),
                "mean_late": sum(change[half - 1 :]) / len(change[half - 1 :]),
                "per_step": change,
            }
        )
        print(
            f"  {name:14s} {rows[-1]['mean_early']:.3f} (steps 1-{half - 1})  {rows[-1]['mean_late']:.3f} "
            f"(steps {half}-{STEPS - 1})",
            flush=True,
        )
    return rows


# ------------------------------------------------------------------------------------------------ report
def _markdown(results: dict) -> str:
    env = results["env"]
    lines = [
        "# Encoder propagation (Faster Diffusion) benchmark",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['cpu']}, {env['threads']} threads; "
        f"{STEPS} DDIM steps; measured {results['date']}.",
        "",
    ]
    if results.get("flops"):
        lines += [
            "## UNet FLOPs (FlopCounterMode, meta tensors, classic attention, batch 1)",
            "",
            "| UNet | GFLOPs full | GFLOPs non-key | encoder share | bound | fd50 saving | fd20 saving |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['full_gflops']:.0f} | {r['non_key_gflops']:.0f} | {r['encoder_share']:.1%} | "
            f"{r['bound_speedup']:.2f}x | {r['fd50_saving']:.1%} | {r['fd20_saving']:.1%} |"
            for r in results["flops"]
        ]
        lines += [
            "",
            "fd50 = key steps {0,1,2,3,5,10,15,25,35} of 50; fd20 = {0,1,2,3,5,10,15} of 20. "
            "Paper: SD DDIM-50 -27%, DPM-Solver-20 -21%.",
            "",
        ]
    if results.get("speed"):
        lines += [
            "## Wall time, SD-shaped UNet (64,128,256,256), 32x32 latent, CFG, DDIM 50 steps, CPU",
            "",
            "| batch | method | wall s | wall speed-up | process CPU s | CPU-time speed-up |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['batch']} | {r['method']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['cpu_seconds']:.2f} | "
            f"{r['cpu_speedup']:.2f}x |"
            for r in results["speed"]
        ]
        lines.append("")
    if results.get("quality"):
        lines += [
            f"## Quality, reference digit model, N={results['n']} (seeds 0-{results['n'] - 1}, labels i % 10, "
            f"guidance {results.get('guidance', 2.0)}, DDIM 50 steps), FD on the digit classifier's features "
            "vs 1,000 held-out digits",
            "",
            "UNet FLOPs: FlopCounterMode over a whole 50-step batch-1 call, relative to the full UNet (the speed-up "
            "bound is its reciprocal). Wall: the N-image run (batches of 100, sequential decoding) vs the full "
            "UNet's; noisy on this shared 2-core machine.",
            "",
            "| method | UNet FLOPs | FD | FD change | PSNR vs full (dB) | wall speed-up |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r.get('flops', float('nan')):.3f} | {r['fd']:.3f} | {r['fd_change']:+.1%} | "
            f"{r['psnr_vs_full']:.2f} | {r['speedup']:.2f}x |"
            for r in results["quality"]
        ]
        pairs = matched_pairs(results["quality"]) if all("flops" in r for r in results["quality"]) else []
        if pairs:
            lines += [
                "",
                "### At matched UNet FLOPs: which is closer to the full-UNet images",
                "",
                "| encoder propagation | FLOPs | PSNR | nearest DeepCache | FLOPs | PSNR | closer |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {p['fastdiff']} | {p['fastdiff_flops']:.3f} | {p['fastdiff_psnr']:.2f} | {p['deepcache']} | "
                f"{p['deepcache_flops']:.3f} | {p['deepcache_psnr']:.2f} | "
                f"{'fastdiff' if p['fastdiff_psnr'] > p['deepcache_psnr'] else 'DeepCache'} |"
                for p in pairs
            ]
        lines.append("")
    if results.get("latency"):
        lines += [
            "## Wall time on the reference model at small batch (DDIM-50, parallel decoding, best of 3)",
            "",
            "| batch | method | wall s | speed-up |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['batch']} | {r['method']} | {r['seconds']:.3f} | {r['speedup']:.2f}x |" for r in results["latency"]
        ]
        lines.append("")
    if results.get("premise"):
        lines += [
            "## Premise: relative change of each UNet part's output between adjacent steps (reference model)",
            "",
            "||f_i - f_(i-1)|| / ||f_(i-1)||, mean over 50 images (DDIM-50, guidance 1) and over the steps. Faster "
            "Diffusion's premise is that the encoder's outputs change little while the decoder's change a lot.",
            "",
            f"| part | role | steps 1-{STEPS // 2 - 1} | steps {STEPS // 2}-{STEPS - 1} | all |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['part']} | {r['role']} | {r['mean_early']:.3f} | {r['mean_late']:.3f} | {r['mean_all']:.3f} |"
            for r in results["premise"]
        ]
        lines.append("")
    elif "quality" in results:
        lines += ["## Quality", "", "Not measured: the trained reference weights were not present.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="flops,speed,premise,quality,latency")
    parser.add_argument("--n", type=int, default=500, help="images per method for the quality part")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", default="1,4", help="batch sizes for the speed part")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"env": _env(), "date": time.strftime("%Y-%m-%d %H:%M"), "steps": STEPS})

    def save() -> None:  # after every part, so a long run keeps what it measured
        path.write_text(json.dumps(results, indent=2, default=float))
        (OUT / "results.md").write_text(_markdown(results))

    if "flops" in parts:
        print("FLOPs:", flush=True)
        results["flops"] = flops_table()
        save()
    if "premise" in parts:
        print("premise:", flush=True)
        results["premise"] = premise_table()
        save()
    if "quality" in parts:
        print("quality:", flush=True)
        results["quality"], results["n"], results["guidance"] = quality_table(args.n), args.n, 1.0
        save()
    if "latency" in parts:
        print("latency:", flush=True)
        results["latency"] = latency_table()
        save()
    if "speed" in parts:
        print("speed:", flush=True)
        results["speed"] = speed_table(batches=tuple(int(b) for b in args.batches.split(",")), repeats=args.repeats)
        results["deepcache"] = _deepcache_available()
        save()
    print(_markdown(results))


if __name__ == "__main__":
    main()
