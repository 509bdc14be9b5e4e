"""`fastdiff calibrate`: Faster Diffusion key steps measured for a model within a FLOPs budget; writes a config JSON."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="reference", help="`reference` (the shipped digit model) or a diffusers "
                                                             "model id / folder")
    parser.add_argument("--steps", type=int, required=True, help="the step count the plan is for")
    parser.add_argument("--budget", type=float, required=True,
                        help="UNet FLOPs over the whole call, as a fraction of the full UNet's (e.g. 0.75)")
    parser.add_argument("--scheduler", default=None, help="sample with this scheduler class (default: the model's)")
    parser.add_argument("--num-images", type=int, default=4, help="images of the calibration call (seeds 0..n-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--prompts", default=None, help="prompts file (one per line) for text-to-image models")
    parser.add_argument("--recompute-shallow", type=int, default=None,
                        help="fix the shallow recompute depth (default: choose the one with least predicted error)")
    parser.add_argument("--reuse-decoder", choices=("auto", "yes", "no"), default="auto",
                        help="also replay the deep decoder at non-key steps (DeepCache's branch): yes, no, or auto "
                             "(compare both, take the plan with least predicted error)")
    parser.add_argument("--out", default="encoder_propagation.json", help="config JSON to write")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from fastdiff.eval.generate import conditioning, load_pipeline, read_prompts
    from fastdiff.eval.methods import scheduler_class
    from fastdiff.hooks.calibrate import calibrate

    pipe = load_pipeline(args.model, args.device)
    if args.scheduler:
        pipe.scheduler = scheduler_class(args.scheduler).from_config(pipe.scheduler.config)
    kwargs = conditioning(pipe, read_prompts(args.prompts))(list(range(args.num_images)))
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    reuse_decoder = {"auto": None, "yes": True, "no": False}[args.reuse_decoder]
    result = calibrate(pipe, args.steps, args.budget, args.num_images, recompute_shallow=args.recompute_shallow,
                       reuse_decoder=reuse_decoder, seed=args.seed, **kwargs)
    path = result.config.to_json(args.out, calibration={
        "model": args.model, "scheduler": type(pipe.scheduler).__name__, "budget": args.budget,
        "num_images": args.num_images, "seed": args.seed, "pipeline_kwargs": kwargs, **result.metadata()})
    print(f"key_steps={result.config.key_steps} recompute_shallow={result.config.recompute_shallow} "
          f"reuse_decoder={result.config.reuse_decoder} "
          f"UNet FLOPs {result.flops_fraction:.3f} of full, predicted error {result.predicted_error:.4g}, "
          f"{result.seconds:.1f} s -> {path}")
    return 0
