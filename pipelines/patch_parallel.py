"""Patch-parallel sampling (DistriFusion / PCPP): every rank computes one row band of each UNet activation.

Run (CPU, gloo; on GPUs the same command uses NCCL and one GPU per rank):
    torchrun --standalone --nproc_per_node 2 pipelines/patch_parallel.py --mode async --out runs/pp.png
    torchrun --standalone --nproc_per_node 4 pipelines/patch_parallel.py --patch-ranks 2   # 2 images at once
    torchrun --standalone --nproc_per_node 2 pipelines/patch_parallel.py \
        --model stabilityai/stable-diffusion-xl-base-1.0 --prompt "a red cube" --height 1024 --width 1024 --steps 30
    accelerate launch --multi_gpu --num_processes 2 pipelines/patch_parallel.py   # also works (it calls torchrun)

Without --model it samples digits from fastdiff's built-in reference model (offline). The world is split
into groups of --patch-ranks ranks (default: all); each group makes its own image (seed = base + group
index), the ranks of a group hold the same image and only the group's first rank writes it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastdiff.parallel import PatchParallelConfig, disable_patch_parallel, enable_patch_parallel


def load(model: str | None, device: torch.device):
    if model is None:
        from fastdiff.models import load_reference_pipeline

        return load_reference_pipeline().to(device)
    from diffusers import AutoPipelineForText2Image

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers model id or folder (default: the reference model)")
    ap.add_argument("--prompt", default="a photo of a cat")
    ap.add_argument("--digit", type=int, default=7, help="reference model: the class to sample")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["sync", "async", "naive"], default="async")
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--conditioning", choices=["full", "partial"], default="full")
    ap.add_argument("--no-split-cfg", action="store_true",
                    help="put every rank on bands of the whole CFG batch instead of splitting the batch in halves")
    ap.add_argument("--patch-ranks", type=int, default=None, help="ranks per image (default: the whole world)")
    ap.add_argument("--out", type=Path, default=Path("runs/patch_parallel.png"))
    ap.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="how long a rank waits for the others before every rank fails")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    # the user's call: fastdiff never starts a group; the timeout makes a stuck rank fail every rank
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    size = args.patch_ranks or world
    if world % size:
        raise SystemExit(f"--patch-ranks {size} must divide the world size {world}.")
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]  # all ranks
    index = rank // size

    pipe = load(args.model, device)
    pipe.set_progress_bar_config(disable=True)
    config = PatchParallelConfig(mode=args.mode, warmup_steps=args.warmup_steps, conditioning=args.conditioning,
                                 split_cfg=not args.no_split_cfg)
    enable_patch_parallel(pipe, config, group=groups[index])
    generator = torch.Generator("cpu").manual_seed(args.seed + index)  # the same on every rank of the group
    start = time.perf_counter()
    if args.model is None:
        image = pipe(class_labels=[args.digit], guidance_scale=3.0, num_inference_steps=args.steps,
                     generator=[generator]).images[0]
    else:
        image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                     generator=generator).images[0]
    seconds = time.perf_counter() - start
    disable_patch_parallel(pipe)
    if rank % size == 0:
        out = args.out if world == size else args.out.with_stem(f"{args.out.stem}_{index}")
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        setup = f"{size} ranks, {args.mode}/{args.conditioning}, split_cfg={config.split_cfg}"
        print(f"group {index} ({setup}): {seconds:.2f} s -> {out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
