"""`fastdiff train-value`: train and save an SVDD-MC value network for the reference model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", choices=("classifier", "jpeg"), default="classifier",
                        help="ClassifierReward(--target-class) or jpeg_compressibility")
    parser.add_argument("--target-class", type=int, default=7)
    parser.add_argument("--num-samples", type=int, default=1024, help="samples of the reference model to train on")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM (eta=1) steps used to draw them")
    parser.add_argument("--steps", type=int, default=1500, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/value/value.safetensors"))


def run(args: argparse.Namespace) -> int:
    from fastdiff.guidance import rewards
    from fastdiff.guidance.value import save_value_function, train_value_function
    from fastdiff.models import load_reference_pipeline

    if args.num_samples < 2 or args.steps < 1:
        raise ValueError("--num-samples must be >= 2 and --steps >= 1.")
    if args.reward == "classifier":
        reward_fn = rewards.ClassifierReward(args.target_class)
    else:
        reward_fn = rewards.jpeg_compressibility
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    net = train_value_function(pipe, reward_fn, num_samples=args.num_samples,
                               sample_kwargs=dict(num_inference_steps=args.sample_steps, eta=1.0),
                               steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    meta = {"reward": repr(reward_fn) if args.reward == "classifier" else "jpeg_compressibility",
            "num_samples": args.num_samples, "sample_steps": args.sample_steps, "steps": args.steps, "seed": args.seed}
    save_value_function(net, args.out, meta)
    print(f"wrote {args.out} (+ .json)")
    return 0
