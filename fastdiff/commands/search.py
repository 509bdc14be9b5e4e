"""`fastdiff search`: AutoDiffusion search of a step schedule; writes the schedule JSON (resumable checkpoint)."""

from __future__ import annotations

import argparse

from fastdiff.search.autodiffusion import OBJECTIVES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, required=True, help="K, the number of steps of the schedule")
    parser.add_argument("--objective", choices=OBJECTIVES, default="fd",
                        help="fd/kid: reference-model digits vs training digits; exact: a built-in Gaussian mixture")
    parser.add_argument("--out", default="schedule.json", help="schedule JSON to write")
    parser.add_argument("--checkpoint", default=None, help="JSON checkpoint, updated per evaluation; resumed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--parents", type=int, default=6)
    parser.add_argument("--evaluations", type=int, default=80, help="stage-1 budget (objective evaluations)")
    parser.add_argument("--num-samples", type=int, default=256, help="images per evaluation (fixed seeds)")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--reference-stats", default=None, help=".npz stats (default: 4000 training digits, lenet)")
    parser.add_argument("--key-steps", type=int, default=None, help="stage 2: search this many key steps jointly")
    parser.add_argument("--skips", type=int, default=None,
                        help="stage 2 (the paper's): search this many skipped (step, layer) pairs jointly")
    parser.add_argument("--max-skip-fraction", type=float, default=0.1,
                        help="the most UNet layers skipped at one step, as a fraction (paper: 0.1)")
    parser.add_argument("--stage2-evaluations", type=int, default=40)
    parser.add_argument("--device", default="cpu")


def demo_mixture():
    """The exact objective's toy: a seeded 3-component Gaussian mixture in 1x4x4."""
    import torch

    from fastdiff.testing import GaussianMixtureDenoiser

    gen = torch.Generator().manual_seed(0)
    return GaussianMixtureDenoiser(means=torch.rand((3, 1, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1,
                                   stds=torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64))


def reference_pipeline(device: str):
    """The shipped digit model with DPM-Solver++ 2M from its config, as in eval/sweeps/reference.toml."""
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.models import load_reference_pipeline

    pipe = load_reference_pipeline(device=device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(args: argparse.Namespace) -> int:
    from fastdiff.eval.distributed import check_device
    from fastdiff.eval.progress import Progress
    from fastdiff.search.autodiffusion import SearchConfig, search_timesteps

    config = SearchConfig(seed=args.seed, population_size=args.population, num_parents=args.parents,
                          max_evaluations=args.evaluations, num_samples=args.num_samples,
                          pipe_kwargs={} if args.objective == "exact" else {"guidance_scale": args.guidance_scale},
                          reference_stats=args.reference_stats, num_key_steps=args.key_steps,
                          num_skips=args.skips, max_skip_fraction=args.max_skip_fraction,
                          stage2_evaluations=args.stage2_evaluations)
    features = reference = None
    check_device(args.device)
    if args.objective == "exact":
        pipe = demo_mixture()
    else:  # the built-in model, scored with its digit features against 4000 training digits (or --reference-stats)
        from fastdiff.search.objectives import digit_reference

        pipe = reference_pipeline(args.device)
        features, reference = digit_reference(args.device, args.reference_stats)
    stage2 = config.num_key_steps is not None or config.num_skips is not None
    total = config.max_evaluations + (config.stage2_evaluations if stage2 else 0)
    bar = Progress(total, f"search K={args.steps}", unit="evaluation")  # evaluations done / budget, best so far

    def progress(candidate, value: float, state) -> None:
        bar.update(1, note=f"best {args.objective} {min(state.fitness.values()):.4g}, generation {state.generations}")

    try:
        result = search_timesteps(pipe, args.steps, args.objective, config, features=features, reference=reference,
                                  checkpoint=args.checkpoint, on_evaluation=progress)
    finally:
        bar.close()
    path = result.save(args.out)
    keys = f" key_steps={result.key_steps}" if result.key_steps else ""
    keys += f" skips={result.skips}" if result.skips else ""
    print(f"timesteps={result.timesteps}{keys} {result.objective}={result.fitness:.4f} "
          f"evaluations={result.evaluations} wall={result.wall_time_s:.0f}s -> {path}")
    return 0
