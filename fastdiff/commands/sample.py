"""`fastdiff sample`: seeded images of one method into a folder (resumable; works under torchrun)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from fastdiff.eval.methods import ACCELERATORS, MethodSpec


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def json_object_or_path(text: str) -> dict | str:
    """An argparse type: a JSON object, or else the path of a JSON file (kept as a path)."""
    return json_object(text) if text.lstrip().startswith("{") else text


def int_list(text: str) -> list[int]:
    """An argparse type: integers separated by commas or spaces."""
    return [int(t) for t in text.replace(",", " ").split()]


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that build a `MethodSpec`."""
    g = parser.add_argument_group("method")
    g.add_argument("--scheduler", default="DDIMScheduler", help="diffusers scheduler class or fastdiff's")
    g.add_argument("--scheduler-kwargs", type=json_object, default={}, metavar="JSON")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="number of inference steps (default 20)")
    steps.add_argument("--timesteps", type=int_list, help="explicit timesteps, e.g. 999,749,499,249")
    steps.add_argument("--schedule", help="schedule JSON (e.g. from `fastdiff search`)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--eta", type=float, default=None)
    for key in ACCELERATORS:
        if key == "encoder_propagation":  # also a config file from `fastdiff calibrate`
            g.add_argument("--encoder-propagation", type=json_object_or_path, default=None, metavar="JSON|FILE")
        else:
            g.add_argument(f"--{key.replace('_', '-')}", type=json_object, default=None, metavar="JSON")
    g.add_argument("--name", default=None, help="method label (default: scheduler-steps)")


def method_from_args(args: argparse.Namespace) -> MethodSpec:
    """The `MethodSpec` of the method flags (20 steps when no steps, timesteps or schedule is given)."""
    steps = args.steps
    if args.timesteps is None and args.schedule is None and steps is None:
        steps = 20  # `--steps 0` reaches MethodSpec, which refuses it
    name = args.name or f"{args.scheduler.removesuffix('Scheduler')}-{steps or 'custom'}"
    return MethodSpec(
        name=name,
        scheduler=args.scheduler,
        scheduler_kwargs=args.scheduler_kwargs,
        steps=steps,
        timesteps=args.timesteps,
        schedule=args.schedule,
        guidance=args.guidance,
        eta=args.eta,
        **{key: getattr(args, key) for key in ACCELERATORS},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="reference", help="`reference` or a diffusers model id / folder")
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line (text-to-image models)")
    parser.add_argument("-n", "--num-images", dest="n", type=int, default=16, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="base seed: image i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", required=True, help="output folder ({index:06d}.png)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others before every rank fails")
    add_method_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fastdiff.eval.distributed import init_distributed, local_device
    from fastdiff.eval.generate import check_out_dir, generate_images, load_pipeline, read_prompts

    method = method_from_args(args)
    check_out_dir(args.out)  # before the pipeline loads
    prompts = read_prompts(args.prompts)
    rank, _ = init_distributed(args.dist_timeout)
    pipe = load_pipeline(args.model, local_device(args.device))
    result = generate_images(pipe, method, args.out, args.n, args.seed, args.batch_size, prompts)
    if rank == 0:
        print(json.dumps(asdict(result), indent=2))
    return 0
