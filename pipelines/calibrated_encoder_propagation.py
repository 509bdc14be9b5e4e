"""Encoder propagation with key steps calibrated for the model: calibrate (or load a config JSON), sample, compare.

Calibrates the built-in reference model's key steps for DDIM within a UNet FLOPs budget (or loads a config file
written by `fastdiff calibrate` / an earlier run), then samples the same seeds with and without it and prints the
counted UNet FLOPs and the PSNR to the full-UNet images.

Run:  python pipelines/calibrated_encoder_propagation.py [--budget 0.9] [--steps 50] [--config ep.json] [--n 20]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff.hooks import EncoderPropagationConfig, calibrate_key_steps
from fastdiff.models import load_reference_pipeline


def sample(pipe, config: EncoderPropagationConfig | None, steps: int, n: int) -> tuple[torch.Tensor, int]:
    """Images of seeds 0..n-1 (labels i % 10, guidance 1) and the UNet FLOPs of the call."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        with fastdiff.apply(pipe, config) if config else contextlib.nullcontext():
            images = pipe(class_labels=[i % 10 for i in range(n)], guidance_scale=1.0, num_inference_steps=steps,
                          output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(n)]).images
    return images, counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.9, help="UNet FLOPs over the call, fraction of the full UNet's")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--config", type=Path, default=None, help="load this config JSON instead of calibrating")
    ap.add_argument("--save", type=Path, default=Path("runs/encoder_propagation.json"))
    ap.add_argument("--n", type=int, default=20, help="images compared")
    args = ap.parse_args()
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # calibrate for the sampler you will use
    if args.config is not None:
        config = EncoderPropagationConfig.from_json(args.config)
    else:
        config = calibrate_key_steps(pipe, args.steps, args.budget, num_images=4, class_labels=[0, 3, 6, 9],
                                     guidance_scale=1.0, seed=10_000)
        args.save.parent.mkdir(parents=True, exist_ok=True)
        print(f"calibrated -> {config.to_json(args.save)}")
    full, full_flops = sample(pipe, None, args.steps, args.n)
    fast, fast_flops = sample(pipe, config, args.steps, args.n)
    psnr = float((10 * torch.log10(1 / ((fast - full) ** 2).flatten(1).mean(1).clamp_min(1e-12))).mean())
    print(f"key steps {config.key_steps}, recompute_shallow={config.recompute_shallow}, "
          f"reuse_decoder={config.reuse_decoder}: UNet FLOPs "
          f"{fast_flops / full_flops:.3f} of full, PSNR to the full-UNet images {psnr:.2f} dB")


if __name__ == "__main__":
    main()
