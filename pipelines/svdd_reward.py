"""Recipe: SVDD (Li et al. 2024, arXiv 2408.08252) -- steer a diffusers pipeline towards a reward, no fine-tuning.

Draws digits with the built-in reference model, unconditionally, and steers them towards "7" with the
shipped digit classifier as a non-differentiable reward; prints reward and fraction of 7s next to the
plain pipeline on the same seeds, and saves a grid. `--model sd` runs the same on the tiny random SD
pipeline with the JPEG-compressibility reward (plumbing demo: random weights, no meaningful images).

    python pipelines/svdd_reward.py --num-images 16 --candidates 8 --steps 25
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from fastdiff.guidance import SVDDConfig, rewards, svdd_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("reference", "sd"), default="reference")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8, help="M, children per step")
    parser.add_argument("--alpha", type=float, default=0.0, help="0 = argmax (as the paper's code)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("runs/svdd_reward.png"))
    args = parser.parse_args()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(args.num_images)]  # noqa: E731
    config = SVDDConfig(num_candidates=args.candidates, alpha=args.alpha, generator=torch.Generator().manual_seed(0))

    if args.model == "reference":
        from fastdiff.models import load_reference_pipeline

        pipe = load_reference_pipeline()
        reward_fn = rewards.ClassifierReward(7)
        kwargs = dict(num_inference_steps=args.steps, eta=1.0)  # DDIM with eta = 1: stochastic proposals
    else:
        from fastdiff.testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        reward_fn = rewards.jpeg_compressibility
        kwargs = dict(prompt="a red cube", num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
                      eta=1.0, height=64, width=64)

    plain = svdd_sample(pipe, reward_fn, SVDDConfig(num_candidates=1, show_progress=False), **kwargs, generator=gens())
    out = svdd_sample(pipe, reward_fn, config, **kwargs, generator=gens())
    print(f"plain: mean reward {plain.rewards.mean():.3f}  ({plain.nfe:.0f} UNet evaluations / image)")
    print(f"SVDD-PM M={args.candidates}: mean reward {out.rewards.mean():.3f}  "
          f"({out.nfe:.0f} UNet evaluations / image)")
    if isinstance(reward_fn, rewards.ClassifierReward):
        for name, images in (("plain", plain.images), ("SVDD", out.images)):
            frac = (reward_fn.log_probs(images).argmax(1) == 7).float().mean()
            print(f"{name}: {frac:.0%} classified as 7")

    from PIL import Image

    rows = torch.cat([plain.images, out.images]).clamp(0, 1)
    _, c, h, w = rows.shape
    n = len(plain.images)
    grid = rows.reshape(2, n, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, 2 * h, n * w)
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(args.out)
    print(f"wrote {args.out} (top: plain, bottom: SVDD)")


if __name__ == "__main__":
    main()
