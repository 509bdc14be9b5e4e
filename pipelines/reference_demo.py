"""Grid of every digit from the built-in reference model, DDPM-1000 beside DDIM-50.

Run:  python pipelines/reference_demo.py [--per-class 4] [--guidance 1.0] [--out runs/reference_grid.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from torchvision.utils import make_grid

from fastdiff.models import load_reference_pipeline
from fastdiff.models.pipeline import DEFAULT_GUIDANCE


def sample_grid(pipe, scheduler, steps: int, per_class: int, guidance: float) -> torch.Tensor:
    pipe.scheduler = scheduler
    labels = [d for d in range(10) for _ in range(per_class)]
    images = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(labels))]).images
    return make_grid(images, nrow=per_class, padding=2, pad_value=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                    help=f"guidance scale (default {DEFAULT_GUIDANCE}, as shipped; DDIM-50 collapses from 2 on)")
    ap.add_argument("--out", type=Path, default=Path("runs/reference_grid.png"))
    args = ap.parse_args()
    pipe = load_reference_pipeline()
    config = pipe.scheduler.config
    ddpm = sample_grid(pipe, DDPMScheduler.from_config(config), 1000, args.per_class, args.guidance)
    ddim = sample_grid(pipe, DDIMScheduler.from_config(config), 50, args.per_class, args.guidance)
    gap = torch.ones(ddpm.shape[0], ddpm.shape[1], 8)
    grid = torch.cat([ddpm, gap, ddim], dim=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arr = (grid[0].clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(arr, mode="L").resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: rows = digits 0-9; left DDPM-1000, right DDIM-50; guidance {args.guidance}")


if __name__ == "__main__":
    main()
