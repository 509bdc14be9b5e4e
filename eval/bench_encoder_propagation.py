"""Benchmark: Faster Diffusion (arXiv 2312.09608) encoder propagation — FLOPs, CPU wall time and quality.

Parts, each written to --out (default eval/results/encoder_propagation/) as soon as it is measured:

1. flops:   UNet FLOPs counted with torch.utils.flop_counter.FlopCounterMode on meta tensors (classic
            attention processor so attention matmuls are counted) for the SD1.5 UNet (512x512, latent 64x64)
            and the SDXL UNet (1024x1024, latent 128x128): full forward, hooked key / non-key forward, the
            encoder share (its reciprocal complement is the speed-up bound) and the fd50 / fd20 savings.
2. speed:   wall time of the unchanged StableDiffusionPipeline (prompt_embeds route, DDIM 50 steps, CFG 7.5)
            on an SD-shaped UNet (block_out_channels (64, 128, 256, 256), cross_attention_dim 256, 32x32
            latent, random weights): full vs fd50 sequential vs fd50 parallel vs DeepCache, batch 1 and 4.
3. premise: on the trained reference model, how much each encoder and decoder part's output changes
            between adjacent DDIM steps (the paper's observation, measured here).
4. caches:  which of diffusers' own caches attach to the reference UNet2DConditionModel (`enable_cache`, then
            `diffusers.hooks.apply_*`), with the refusals as diffusers words them.
5. quality: the trained reference model with DDIM-50 and DPM-Solver++(2M)-20, generated and scored through the
            harness (`MethodSpec`, `sample_images`, `fastdiff.eval.metrics`): UNet FLOPs of a call, FD on the
            digit classifier's features against the 1,000 held-out digits, PSNR to the full-UNet images of the
            same seeds, for the full UNet, the paper's preset, `calibrate`'s plans (encoder reuse with shallow
            recompute, or DeepCache's deep-branch reuse: whichever predicts less error) at budgets 0.6 / 0.75 / 0.9
            and at each DeepCache row's FLOPs, encoder reuse at a fixed depth, DeepCache (headline settings and the
            settings nearest each budget) and the diffusers caches that attach. Resumable: a row already in
            results.json (same method and N) is skipped.
6. latency: the same rows' wall time at batch 1 and 8 through the harness, parallel decoding where it applies.
7. sdcal:   `calibrate` on the SD-shaped random-weight UNet of the speed part: drift, FLOPs, plans, seconds.

Run:  nice -n 10 .venv/bin/python eval/bench_encoder_propagation.py [--parts ...] [--n 500] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # not harness: random weights of the SD-shaped speed UNet
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
        # not harness: speed on the SD-shaped UNet takes prompt embeddings, which the harness does not feed
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
                # not harness: one latent for the speed runs on the SD-shaped UNet
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
# Samplers of the quality part: DDIM-50 (the paper's SD setting) and DPM-Solver++(2M) with 20 steps.
SAMPLERS: dict[str, dict] = {
    "DDIM-50": {"scheduler": "DDIMScheduler", "steps": 50, "preset": "fd50"},
    "DPM++-20": {"scheduler": "DPMSolverMultistepScheduler", "steps": 20, "preset": "fd20",
                 "scheduler_kwargs": {"algorithm_type": "dpmsolver++", "solver_order": 2}},
}
BUDGETS = (0.6, 0.75, 0.9)  # UNet FLOPs budgets of the calibrated plans (fraction of the full UNet's)
GUIDANCE = 1.0  # DDIM-50 with the shipped x0 clipping collapses from guidance 2 on (eval/results/reference_model/)
CALIBRATION_SEED = 10_000  # calibration images are not among the scored ones (seeds 0..N-1)
# DeepCache (interval, branch) settings whose FLOPs are measured; per budget the nearest one is scored, plus the
# headline settings I=2/3 B=0. Branch b recomputes DeepCache's block b // 3, layer b % 3 and what is shallower.
DEEPCACHE_GRID = [(i, b) for i in (2, 3, 5) for b in (0, 3, 4, 5, 6)]
DEEPCACHE_HEADLINE = [(2, 0), (3, 0)]


@dataclass
class Row:
    """One scored method: a harness MethodSpec, optionally run inside a context (DeepCache, diffusers caches)."""

    name: str
    spec: Any  # fastdiff.eval.methods.MethodSpec
    context: Callable[[], Any] | None = None
    info: dict = field(default_factory=dict)


def _spec(sampler: str, name: str, **accelerators):
    from fastdiff.eval.methods import MethodSpec

    s = SAMPLERS[sampler]
    return MethodSpec(name=name, scheduler=s["scheduler"], scheduler_kwargs=s.get("scheduler_kwargs", {}),
                      steps=s["steps"], guidance=GUIDANCE, **accelerators)


def _reference_pipe():
    from fastdiff.models import load_reference_pipeline

    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_flops(pipe, spec, context=None) -> int:
    """UNet FLOPs of one batch-1 harness call of `spec` (inside `context`), counted with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff.eval.generate import sample_images

    with FlopCounterMode(display=False) as counter, torch.no_grad(), (context or contextlib.nullcontext)():
        sample_images(pipe, spec, 1, base_seed=0, batch_size=1)
    return counter.get_total_flops()


_FULL_FLOPS: dict[str, int] = {}


def _row_flops(pipe, sampler: str, row: Row) -> float:
    """UNet FLOPs of one batch-1 call with the row applied, relative to the full UNet's."""
    if sampler not in _FULL_FLOPS:
        _FULL_FLOPS[sampler] = _call_flops(pipe, _spec(sampler, "full"))
    return _call_flops(pipe, row.spec, row.context) / _FULL_FLOPS[sampler]


def _calibration(pipe, sampler: str, results: dict, budget: float,
                 variant: tuple[int, bool] | None = None) -> dict:
    """One `calibrate` call for a budget (and optionally a fixed variant), as a user would run it; kept in
    results.json for resuming. A budget no plan meets gives a record with the refusal."""
    from fastdiff.hooks.calibrate import calibrate, variant_name

    label = f"{budget!r}" + (f" {variant_name(variant)}" if variant is not None else "")
    records = results.setdefault("calibration", {}).setdefault(sampler, {})
    if label not in records:
        from fastdiff.eval.methods import scheduler_class

        s = SAMPLERS[sampler]
        original = pipe.scheduler
        # not harness: calibration runs under the sampler's scheduler (a measurement, not scored images)
        pipe.scheduler = scheduler_class(s["scheduler"]).from_config(original.config, **s.get("scheduler_kwargs", {}))
        fixed = {} if variant is None else {"recompute_shallow": variant[0], "reuse_decoder": variant[1]}
        try:
            result = calibrate(pipe, s["steps"], budget, 4, seed=CALIBRATION_SEED, class_labels=[0, 3, 6, 9],
                               guidance_scale=GUIDANCE, **fixed)
            record = {**result.metadata(), "config": dataclasses.asdict(result.config)}
            print(f"  calibration {sampler} {label}: {record['seconds']:.1f} s", flush=True)
        except ValueError as err:
            record = {"refused": str(err)}
        finally:
            # not harness: the calibration's scheduler swap is undone here
            pipe.scheduler = original
        records[label] = record
    return records[label]


def _calibrated_row(pipe, sampler: str, results: dict, budget: float, label: str,
                    variant: tuple[int, bool] | None = None) -> Row:
    """A calibrated plan as a harness row; a budget no plan meets becomes a row that records the refusal."""
    name = f"{sampler} | calibrated {label}"
    if variant is not None:
        name += f", recompute_shallow={variant[0]}" + (", reuse_decoder" if variant[1] else ", encoder reuse")
    record = _calibration(pipe, sampler, results, budget, variant)
    if "refused" in record:
        return Row(name, None, info={"budget": budget, "refused": record["refused"]})
    config = record["config"]
    options = {k: config[k] for k in ("key_steps", "recompute_shallow", "reuse_decoder")}
    info = {"budget": budget, **options, "predicted_error": record["predicted_error"],
            "measured_error": record["measured_error"], "calibration_seconds": record["seconds"]}
    return Row(name, _spec(sampler, name, encoder_propagation=options), info=info)


def _deepcache_rows(pipe, sampler: str, results: dict) -> list[Row]:
    """DeepCache at its headline settings and, per budget, at the grid setting with the nearest FLOPs."""
    if not _deepcache_available():
        return []
    measured = results.setdefault("deepcache_flops", {}).setdefault(sampler, {})
    rows = {}
    for interval, branch in DEEPCACHE_GRID:
        name = f"{sampler} | DeepCache I={interval} B={branch}"
        rows[name] = Row(name, _spec(sampler, name), lambda i=interval, b=branch: _DeepCache(pipe, i, b),
                         {"interval": interval, "branch": branch})
        if name not in measured:
            measured[name] = _row_flops(pipe, sampler, rows[name])
    chosen = {f"{sampler} | DeepCache I={i} B={b}" for i, b in DEEPCACHE_HEADLINE}
    for budget in BUDGETS:
        chosen.add(min(measured, key=lambda n: (abs(measured[n] - budget), n)))
    return [rows[n] for n in sorted(chosen, key=lambda n: measured[n])]


def _quality_rows(pipe, sampler: str, results: dict) -> list[Row]:
    """Every row of a sampler: full, the paper's preset, DeepCache, calibrated plans, shallow variants, caches."""
    preset = SAMPLERS[sampler]["preset"]
    rows = [Row(f"{sampler} | full UNet", _spec(sampler, f"{sampler} | full UNet")),
            Row(f"{sampler} | {preset}", _spec(sampler, f"{sampler} | {preset}",
                                                encoder_propagation={"key_steps": preset}))]
    deepcache = _deepcache_rows(pipe, sampler, results)
    rows += [_calibrated_row(pipe, sampler, results, b, f"{b:.2f}") for b in BUDGETS]
    flops = results["deepcache_flops"].get(sampler, {})
    for row in deepcache:  # the same FLOPs as each DeepCache row: the matched comparison
        rows.append(_calibrated_row(pipe, sampler, results, flops[row.name], f"@ {row.name.split(' | ')[1]}"))
    # Faster Diffusion's encoder reuse with shallow recompute (no decoder reuse)
    rows += [_calibrated_row(pipe, sampler, results, b, f"{b:.2f}", (2, False)) for b in BUDGETS[1:]]
    rows += deepcache + _diffusers_cache_rows(pipe, sampler, results)
    return _same_plans_once(rows)


def _same_plans_once(rows: list[Row]) -> list[Row]:
    """A calibrated row whose plan an earlier row already runs is recorded as the same plan, not run twice."""
    seen: dict[str, str] = {}
    out = []
    for row in rows:
        ep = row.spec.encoder_propagation if row.spec is not None else None
        key = json.dumps(ep, sort_keys=True) if "calibrated" in row.name and ep else None
        if key in seen:
            row = Row(row.name, None, info={**row.info, "same_plan_as": seen[key]})
        elif key is not None:
            seen[key] = row.name
        out.append(row)
    return out


def _score(images: torch.Tensor, full: torch.Tensor | None, clf, ref) -> dict:
    from fastdiff.eval.metrics import compute_stats, frechet_distance

    with torch.no_grad():
        stats = compute_stats(clf.features(images).numpy())
    fd = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    if full is None:
        return {"fd": fd, "psnr_vs_full": float("inf")}
    mse = ((images - full) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return {"fd": fd, "psnr_vs_full": float((10 * torch.log10(1 / mse)).mean())}


def quality_table(n: int, results: dict, out: Path, save: Callable[[], None], samplers: list[str]) -> None:
    """Score every row of every sampler through the harness (`sample_images`, `metrics`); resumable per row."""
    from fastdiff.eval.generate import sample_images
    from fastdiff.eval.metrics import compute_stats
    from fastdiff.models import load_digit_classifier
    from fastdiff.models.data import load_digits

    pipe, clf = _reference_pipe(), load_digit_classifier()
    heldout, _ = load_digits("heldout")
    with torch.no_grad():
        ref = compute_stats(clf.features(heldout).numpy())
    rows = results.setdefault("quality", [])
    rows[:] = [r for r in rows if "sampler" in r]  # rows of the older single-sampler format are re-measured
    for sampler in samplers:
        cache = out / f".full_{sampler}_n{n}.pt"
        full = torch.load(cache) if cache.exists() else None
        for row in _quality_rows(pipe, sampler, results):
            if any(r["method"] == row.name and r["n"] == n for r in rows):
                continue
            if row.spec is None:
                rows.append({"sampler": sampler, "method": row.name, "n": n, **row.info})
                said = row.info.get("refused") or f"the plan of {row.info['same_plan_as']}"
                print(f"  {row.name}: {'refused: ' if 'refused' in row.info else ''}{said}", flush=True)
                save()
                continue
            with (row.context or contextlib.nullcontext)():
                samples = sample_images(pipe, row.spec, n, batch_size=50)
            if full is None:
                full = samples.images
                torch.save(full, cache)
            entry = {"sampler": sampler, "method": row.name, "n": n, "flops": _row_flops(pipe, sampler, row),
                     "seconds": samples.wall_s, **_score(samples.images, None if row.name.endswith("full UNet")
                                                         else full, clf, ref), **row.info}
            rows.append(entry)
            print(f"  {row.name:58s} FLOPs {entry['flops']:5.3f}  FD {entry['fd']:7.3f}  "
                  f"PSNR {entry['psnr_vs_full']:6.2f} dB  {samples.wall_s:6.1f} s", flush=True)
            save()


def matched_pairs(rows: list[dict]) -> list[dict]:
    """Per sampler and budget: DeepCache's row nearest the budget beside fastdiff's best plan within its FLOPs + 0.02
    (the calibrated and shallow rows; pure function)."""
    pairs = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows if "sampler" in r):
        mine = [r for r in rows if r.get("sampler") == sampler and "flops" in r]
        full = next((r for r in mine if r["method"].endswith("full UNet")), None)
        deepcache = [r for r in mine if "DeepCache I=" in r["method"] and "calibrated" not in r["method"]]
        ours = [r for r in mine if "calibrated" in r["method"]]
        if full is None or not deepcache:
            continue
        for budget in BUDGETS:
            other = min(deepcache, key=lambda r: abs(r["flops"] - budget))
            fits = [r for r in ours if r["flops"] <= other["flops"] + 0.02]
            best = max(fits, key=lambda r: r["psnr_vs_full"], default=None)
            pairs.append({"sampler": sampler, "budget": budget, "deepcache": other["method"],
                          "deepcache_flops": other["flops"], "deepcache_psnr": other["psnr_vs_full"],
                          "deepcache_fd_change": other["fd"] / full["fd"] - 1,
                          "fastdiff": best["method"] if best else None,
                          "fastdiff_flops": best["flops"] if best else None,
                          "fastdiff_psnr": best["psnr_vs_full"] if best else None,
                          "fastdiff_fd_change": best["fd"] / full["fd"] - 1 if best else None})
    return pairs


def cache_pairs(rows: list[dict]) -> list[dict]:
    """Per sampler and diffusers cache row: fastdiff's best plan within its FLOPs + 0.02 (pure function)."""
    pairs = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows if "sampler" in r):
        mine = [r for r in rows if r.get("sampler") == sampler and "flops" in r]
        full = next((r for r in mine if r["method"].endswith("full UNet")), None)
        ours = [r for r in mine if "calibrated" in r["method"]]
        for other in (r for r in mine if " | diffusers " in r["method"]):
            fits = [r for r in ours if r["flops"] <= other["flops"] + 0.02]
            best = max(fits, key=lambda r: r["psnr_vs_full"], default=None)
            if full is None or best is None:
                continue
            pairs.append({"sampler": sampler, "cache": other["method"], "cache_flops": other["flops"],
                          "cache_psnr": other["psnr_vs_full"], "cache_fd_change": other["fd"] / full["fd"] - 1,
                          "fastdiff": best["method"], "fastdiff_flops": best["flops"],
                          "fastdiff_psnr": best["psnr_vs_full"], "fastdiff_fd_change": best["fd"] / full["fd"] - 1})
    return pairs


# ------------------------------------------------------------------------------- 6. diffusers' own caches
def _timestep_recorder(pipe):
    """A diffusers hook on the UNet: keeps the current timestep (for the caches' callbacks) and resets the
    stateful cache hooks when a new pipeline call starts (UNet2DConditionModel has no CacheMixin to do it)."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Recorder(ModelHook):
        def __init__(self) -> None:
            super().__init__()
            self.timestep, self.timesteps = 0, None

        def pre_forward(self, module, *args, **kwargs):
            self.timestep = int(kwargs.get("timestep", args[1] if len(args) > 1 else 0))
            if pipe.scheduler.timesteps is not self.timesteps:
                self.timesteps = pipe.scheduler.timesteps
                HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            return args, kwargs

    return Recorder()


def _cache_configs(callback) -> dict[str, tuple[Callable[[], Any], Any]]:
    """diffusers cache name -> (config factory, apply function), at their documented defaults plus the callbacks
    (a config whose own checks refuse these defaults raises when made, and that is recorded too)."""
    import diffusers
    from diffusers import hooks

    return {
        "PyramidAttentionBroadcast": (lambda: diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=2,
            current_timestep_callback=callback), hooks.apply_pyramid_attention_broadcast),
        "FasterCache": (lambda: diffusers.FasterCacheConfig(current_timestep_callback=callback),
                        hooks.apply_faster_cache),
        "FirstBlockCache": (lambda: diffusers.FirstBlockCacheConfig(threshold=0.05), hooks.apply_first_block_cache),
        "TaylorSeerCache": (lambda: diffusers.TaylorSeerCacheConfig(), hooks.apply_taylorseer_cache),
        "MagCache": (lambda: diffusers.MagCacheConfig(calibrate=True), hooks.apply_mag_cache),
    }


def _hook_names(unet) -> set[tuple[str, str]]:
    return {(name, hook) for name, m in unet.named_modules() if getattr(m, "_diffusers_hook", None)
            for hook in m._diffusers_hook._hook_order}


class _DiffusersCache:
    """A diffusers cache hook on the reference UNet (plus the timestep recorder) as a context manager."""

    def __init__(self, pipe, name: str) -> None:
        self.pipe, self.name = pipe, name

    def __enter__(self):
        from diffusers.hooks import HookRegistry

        unet = self.pipe.unet
        self.recorder = _timestep_recorder(self.pipe)
        before = _hook_names(unet)
        make_config, apply_cache = _cache_configs(lambda: self.recorder.timestep)[self.name]
        try:
            apply_cache(unet, make_config())
        finally:  # a failed apply leaves nothing behind either
            self.added = _hook_names(unet) - before
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(self.recorder, "bench_timestep")
        return self

    def __exit__(self, *exc):
        modules = dict(self.pipe.unet.named_modules())
        self.pipe.unet._diffusers_hook.remove_hook("bench_timestep", recurse=False)
        for name, hook in self.added:
            modules[name]._diffusers_hook.remove_hook(hook, recurse=False)



def caches_table(pipe=None) -> list[dict]:
    """Which diffusers caches attach to the reference UNet2DConditionModel, and whether a call then runs."""
    pipe = pipe or _reference_pipe()
    rows = []
    for name in _cache_configs(lambda: 0):
        row = {"cache": name}
        try:
            pipe.unet.enable_cache(_cache_configs(lambda: 0)[name][0]())
            row["enable_cache"] = "ok"
        except Exception as err:  # record the refusal as diffusers words it
            row["enable_cache"] = f"{type(err).__name__}: {err}"
        attached = _DiffusersCache(pipe, name)
        try:
            with attached, torch.no_grad():
                row["hooks"] = len(attached.added)
                if attached.added:
                    pipe(class_labels=[3], guidance_scale=GUIDANCE, num_inference_steps=10, output_type="pt",
                         # not harness: a 10-step smoke call checks that a diffusers cache attaches
                         generator=torch.Generator().manual_seed(0))
            row["apply"] = "ok" if attached.added else "attached no hook"
        except Exception as err:
            row["apply"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            modules = dict(pipe.unet.named_modules())
            for module_name, hook in getattr(attached, "added", ()):  # apply raised inside __enter__
                modules[module_name]._diffusers_hook.remove_hook(hook, recurse=False)
        rows.append(row)
        print(f"  {name}: enable_cache: {row['enable_cache'][:80]} | apply: {row['apply'][:120]}", flush=True)
    return rows


def _diffusers_cache_rows(pipe, sampler: str, results: dict) -> list[Row]:
    """Quality rows for the diffusers caches that attached and ran in the caches part."""
    working = [r["cache"] for r in results.get("caches") or [] if r.get("apply") == "ok"]
    return [Row(f"{sampler} | diffusers {name}", _spec(sampler, f"{sampler} | diffusers {name}"),
                lambda name=name: _DiffusersCache(pipe, name)) for name in working]


# ---------------------------------------------------------------------------- 7. calibration, SD-shaped UNet
def sd_calibration(budgets=(0.6, 0.75, 0.9)) -> dict:
    """`calibrate` on the SD-shaped random-weight UNet of the speed part (DDIM-50, CFG 7.5), once per budget: drift,
    FLOPs, the chosen plan and the candidates it ran."""
    from diffusers import DDIMScheduler

    from fastdiff.hooks.calibrate import calibrate

    pipe = _mid_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # not harness: calibration of the SD-shaped random-weight UNet (drift and FLOPs only)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    # not harness: a fixed conditioning input of the random-weight UNet (drift and FLOPs only)
    embeds = torch.randn(2, 77, 256, generator=torch.Generator().manual_seed(0))
    record: dict = {"budget_plans": {}}
    for budget in budgets:
        try:
            result = calibrate(pipe, STEPS, budget, 2, prompt_embeds=embeds,
                               negative_prompt_embeds=torch.zeros_like(embeds), height=64, width=64,
                               guidance_scale=7.5)
        except ValueError as err:
            record["budget_plans"][str(budget)] = {"refused": str(err)}
            continue
        meta = result.metadata()
        record.update({k: meta[k] for k in ("key_flops", "non_key_flops")})
        c = result.config
        record["budget_plans"][str(budget)] = {
            "recompute_shallow": c.recompute_shallow, "reuse_decoder": c.reuse_decoder, "key_steps": c.key_steps,
            "flops_fraction": result.flops_fraction, "predicted_error": result.predicted_error,
            "measured_error": result.measured_error, "seconds": result.seconds, "candidates": len(result.candidates)}
        print(f"  SD-shaped UNet, budget {budget}: {result.seconds:.1f} s, {record['budget_plans'][str(budget)]}",
              flush=True)
    return record


# --------------------------------------------------------------------------------------------- 5. latency
def _parallel(spec):
    """The row with parallel decoding where it applies (encoder propagation without shallow recompute or
    decoder reuse)."""
    ep = spec.encoder_propagation
    if not ep or ep.get("recompute_shallow", 0) or ep.get("reuse_decoder"):
        return spec
    return dataclasses.replace(spec, encoder_propagation={**ep, "parallel": True})


def latency_table(results: dict, save: Callable[[], None], samplers: list[str], batches=(1, 8),
                  repeats: int = 3) -> None:
    """Wall time of one call at small batch through the harness (`sample_images`), parallel decoding where it
    applies; round-robin over the rows, best of `repeats`. Resumable per (sampler, batch)."""
    from fastdiff.eval.generate import sample_images

    pipe = _reference_pipe()
    rows = results.setdefault("latency", [])
    rows[:] = [r for r in rows if "sampler" in r]
    for sampler in samplers:
        methods = [m for m in _quality_rows(pipe, sampler, results) if m.spec is not None]
        for batch in batches:
            if any(r["sampler"] == sampler and r["batch"] == batch for r in rows):
                continue
            wall: dict[str, list[float]] = {m.name: [] for m in methods}
            for _ in range(repeats):
                for m in methods:
                    spec = _parallel(m.spec)
                    with (m.context or contextlib.nullcontext)():
                        sample_images(pipe, spec, batch, batch_size=batch)  # warm-up
                        wall[m.name].append(sample_images(pipe, spec, batch, batch_size=batch).wall_s)
            base = min(wall[methods[0].name])
            for m in methods:
                parallel = _parallel(m.spec) is not m.spec
                rows.append({"sampler": sampler, "batch": batch, "method": m.name + (", parallel" if parallel else ""),
                             "seconds": min(wall[m.name]), "speedup": base / min(wall[m.name])})
                print(f"  batch {batch}  {rows[-1]['method']:64s} {rows[-1]['seconds']:6.3f} s "
                      f"{rows[-1]['speedup']:4.2f}x", flush=True)
            save()


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
    from diffusers.hooks import HookRegistry

    from fastdiff.eval.generate import sample_images

    pipe = _reference_pipe()
    unet = pipe.unet
    parts = [("conv_in", unet.conv_in)] + [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    parts += [("mid_block", unet.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    recorders = {name: _OutputRecorder() for name, _ in parts}
    for name, module in parts:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(recorders[name], "fastdiff_bench_rec")
    try:
        with torch.no_grad():
            sample_images(pipe, _spec("DDIM-50", "full UNet"), n, batch_size=n)
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
def _md_quality(results: dict) -> list[str]:
    rows = [r for r in results.get("quality") or [] if "sampler" in r]
    if not rows:
        return []
    n = rows[0]["n"]
    lines = [
        f"## Quality, reference digit model, N={n} (seeds 0-{n - 1}, labels i % 10, guidance {GUIDANCE}), FD on the "
        "digit classifier's features vs 1,000 held-out digits",
        "",
        "Generated and scored through the harness (`MethodSpec`, `sample_images`, `fastdiff.eval.metrics`). UNet "
        "FLOPs: FlopCounterMode over a whole batch-1 call, relative to the full UNet (the speed-up bound is its "
        "reciprocal). PSNR: to the full-UNet images of the same seeds. Wall: the N-image run (batches of 50, "
        "sequential decoding); noisy on a shared machine. Calibrated rows: `calibrate` once per sampler (4 images, "
        f"seeds {CALIBRATION_SEED}-{CALIBRATION_SEED + 3}), plans per budget from its drift table; `@ DeepCache ...` "
        "= the budget is that DeepCache row's FLOPs.",
        "",
        "| sampler | method | UNet FLOPs | FD | FD change | PSNR vs full (dB) | wall s | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    full = {r["sampler"]: r["fd"] for r in rows if r["method"].endswith("full UNet") and "fd" in r}
    for r in rows:
        method = r["method"].split(" | ", 1)[1]
        if "refused" in r:
            lines.append(f"| {r['sampler']} | {method} | - | - | - | - | - | refused: {r['refused']} |")
            continue
        if "same_plan_as" in r:
            lines.append(f"| {r['sampler']} | {method} | - | - | - | - | - | the same plan as "
                         f"{r['same_plan_as'].split(' | ')[1]} |")
            continue
        plan = (f"depth {r['recompute_shallow']}{' + decoder reuse' if r.get('reuse_decoder') else ''}, "
                f"{len(r['key_steps'])} key steps" if "key_steps" in r else "")
        change = r["fd"] / full[r["sampler"]] - 1 if r["sampler"] in full else float("nan")
        lines.append(f"| {r['sampler']} | {method} | {r['flops']:.3f} | {r['fd']:.3f} | {change:+.1%} | "
                     f"{r['psnr_vs_full']:.2f} | {r['seconds']:.1f} | {plan} |")
    return lines + [""] + _md_pairs(rows)


def _md_pairs(rows: list[dict]) -> list[str]:
    pairs = matched_pairs(rows)
    if not pairs:
        return []
    lines = ["### At matched UNet FLOPs: fastdiff's best plan against DeepCache",
             "",
             "Per budget: the DeepCache row with the nearest FLOPs, and the calibrated row (any variant) closest "
             "to the full-UNet images among those within DeepCache's FLOPs + 0.02. Goal: PSNR >= "
             "DeepCache's - 0.02 dB and FD change <= +5%.",
             "",
             "| sampler | budget | DeepCache | FLOPs | PSNR | FD change | fastdiff | FLOPs | PSNR | FD change | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        dc = p["deepcache"].split(" | ")[1]
        if p["fastdiff"] is None:
            lines.append(f"| {p['sampler']} | {p['budget']} | {dc} | {p['deepcache_flops']:.3f} | "
                         f"{p['deepcache_psnr']:.2f} | {p['deepcache_fd_change']:+.1%} | no plan fits | | | | missed |")
            continue
        met = p["fastdiff_psnr"] >= p["deepcache_psnr"] - 0.02 and p["fastdiff_fd_change"] <= 0.05
        lines.append(f"| {p['sampler']} | {p['budget']} | {dc} | {p['deepcache_flops']:.3f} | "
                     f"{p['deepcache_psnr']:.2f} | {p['deepcache_fd_change']:+.1%} | "
                     f"{p['fastdiff'].split(' | ')[1]} | {p['fastdiff_flops']:.3f} | {p['fastdiff_psnr']:.2f} | "
                     f"{p['fastdiff_fd_change']:+.1%} | {'met' if met else 'missed'} |")
    caches = cache_pairs(rows)
    if caches:
        lines += ["", "Against each diffusers cache that attached: fastdiff's best plan within the cache's FLOPs + "
                  "0.02. Goal: PSNR above the cache's.", "",
                  "| sampler | cache | FLOPs | PSNR | FD change | fastdiff | FLOPs | PSNR | FD change | goal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in caches:
            lines.append(f"| {p['sampler']} | {p['cache'].split(' | ')[1]} | {p['cache_flops']:.3f} | "
                         f"{p['cache_psnr']:.2f} | {p['cache_fd_change']:+.1%} | {p['fastdiff'].split(' | ')[1]} | "
                         f"{p['fastdiff_flops']:.3f} | {p['fastdiff_psnr']:.2f} | {p['fastdiff_fd_change']:+.1%} | "
                         f"{'met' if p['fastdiff_psnr'] > p['cache_psnr'] else 'missed'} |")
    return lines + [""]


def _md_calibration(results: dict) -> list[str]:
    lines = []
    for sampler, records in (results.get("calibration") or {}).items():
        if not lines:
            lines += ["## Calibration (`fastdiff.hooks.calibrate`), reference model", "",
                      "One `calibrate` call per budget (4 images, seeds "
                      f"{CALIBRATION_SEED}-{CALIBRATION_SEED + 3}): drift of every variant, FLOPs, a plan per "
                      "variant, then the 8 plans with least predicted error (planned and uniform 1:I key steps) run "
                      "on the same images; the one with least final-latent RMS error to the full UNet is chosen.", "",
                      "| sampler | budget | seconds | chosen | FLOPs | predicted error | measured error |",
                      "|---|---|---|---|---|---|---|"]
        for label, r in records.items():
            budget, *fixed = label.split()
            label = " ".join([f"{float(budget):.4g}", *fixed])
            if "refused" in r:
                lines.append(f"| {sampler} | {label} | - | refused: {r['refused']} | | | |")
                continue
            c = r["config"]
            chosen = (f"depth {c['recompute_shallow']}{' + decoder' if c['reuse_decoder'] else ''}, "
                      f"{len(c['key_steps'])} key steps")
            lines.append(f"| {sampler} | {label} | {r['seconds']:.1f} | {chosen} | {r['flops_fraction']:.3f} | "
                         f"{r['predicted_error']:.4f} | {r['measured_error']:.4f} |")
        some = next((r for r in records.values() if "non_key_flops" in r), None)
        if some:
            lines.append(f"| {sampler} | non-key GFLOPs by variant (key step {some['key_flops'] / 1e9:.3f}) | | "
                         + ", ".join(f"{d}: {f / 1e9:.3f}" for d, f in some["non_key_flops"].items()) + " | | | |")
    sd = results.get("sd_calibration")
    if sd:
        lines += ["", "SD-shaped random-weight UNet of the speed part (DDIM-50, CFG 7.5, 2 images)"
                  + (f": key step {sd['key_flops'] / 1e9:.2f} GFLOPs; non-key by variant "
                     + ", ".join(f"{d}: {f / sd['key_flops']:.3f}" for d, f in sd["non_key_flops"].items())
                     + " of a key step." if sd.get("key_flops") else f" ({sd.get('note', '')})."), ""]
        for budget, plan in sd["budget_plans"].items():
            text = plan.get("refused") or (
                f"recompute_shallow={plan['recompute_shallow']}, reuse_decoder={plan.get('reuse_decoder', False)}, "
                f"{len(plan['key_steps'])} key steps {plan['key_steps']}, FLOPs {plan['flops_fraction']:.3f}, "
                f"calibration {plan.get('seconds', float('nan')):.1f} s")
            lines.append(f"- budget {budget}: {text}")
    return lines + ([""] if lines else [])


def _md_caches(results: dict) -> list[str]:
    rows = results.get("caches")
    if not rows:
        return []
    lines = ["## diffusers' own caches on the reference UNet2DConditionModel", "",
             "| cache | `unet.enable_cache(config)` | `diffusers.hooks.apply_*(unet, config)`, then a 10-step call "
             "| hooks |",
             "|---|---|---|---|"]
    lines += [f"| {r['cache']} | {r['enable_cache']} | {r['apply']} | {r.get('hooks', '-')} |" for r in rows]
    return lines + [""]


def _md_latency(results: dict) -> list[str]:
    rows = [r for r in results.get("latency") or [] if "sampler" in r]
    if not rows:
        return []
    lines = ["## Wall time on the reference model at small batch (harness calls, parallel decoding where it applies, "
             "best of 3)", "", "| sampler | batch | method | wall s | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['batch']} | {r['method'].split(' | ', 1)[1]} | {r['seconds']:.3f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return lines + [""]


def _markdown(results: dict) -> str:
    env = results["env"]
    lines = [
        "# Encoder propagation (Faster Diffusion) benchmark",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['cpu']}, {env['threads']} threads; "
        f"last run {results['date']}.",
        "",
    ]
    if results.get("measured"):
        lines += ["Parts measured: " + ", ".join(f"{part} {when}" for part, when in results["measured"].items())
                  + ".", ""]
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
    lines += _md_quality(results) + _md_calibration(results) + _md_caches(results) + _md_latency(results)
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
    return "\n".join(lines)


PARTS = "flops,speed,premise,caches,quality,latency,sdcal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=PARTS, help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--n", type=int, default=500, help="images per method for the quality part")
    parser.add_argument("--out", default=str(OUT), help="folder of results.json / results.md (resumed)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="quality and latency samplers")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the speed part")
    parser.add_argument("--batches", default="1,4", help="batch sizes for the speed part")
    args = parser.parse_args()
    parts, samplers = set(args.parts.split(",")), args.samplers.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"env": _env(), "date": time.strftime("%Y-%m-%d %H:%M")})

    def save() -> None:  # after every row or part, so a long run keeps what it measured
        path.write_text(json.dumps(results, indent=2, default=float))
        (out / "results.md").write_text(_markdown(results))

    steps = [("flops", lambda: results.update(flops=flops_table())),
             ("premise", lambda: results.update(premise=premise_table())),
             ("caches", lambda: results.update(caches=caches_table())),
             ("quality", lambda: quality_table(args.n, results, out, save, samplers)),
             ("latency", lambda: latency_table(results, save, samplers)),
             ("sdcal", lambda: results.update(sd_calibration=sd_calibration())),
             ("speed", lambda: results.update(speed=speed_table(
                 batches=tuple(int(b) for b in args.batches.split(",")), repeats=args.repeats),
                 deepcache=_deepcache_available()))]
    for name, step in steps:
        if name in parts:
            print(f"{name}:", flush=True)
            step()
            results.setdefault("measured", {})[name] = time.strftime("%Y-%m-%d %H:%M")
            save()
    print(_markdown(results))


if __name__ == "__main__":
    main()
