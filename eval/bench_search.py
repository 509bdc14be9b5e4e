"""Benchmark of AutoDiffusion timestep search (fastdiff.search) against uniform, logSNR, Karras, AYS- and GITS-style.

Parts (each prints a table and writes JSON + markdown to eval/results/search/):
  exact      Gaussian mixture in 1x4x4, exact moments, DPM-Solver++ 2M, K = 4 and 6            (seconds)
  reference  the shipped digit model, DPM-Solver++ 2M, K = 4 and 6: search with FD (lenet features) of
             N_search images at seeds 100000+ against the training digits; every schedule is then scored on
             held-out seeds 0..N_eval-1 (never seen by the search), all N_eval = 4000 images against the
             training digits and the first 1000 against the 1000 held-out digits               (~12 min)
  joint      reference model, K = 10: timestep search + Faster Diffusion "fd20" key steps vs joint search of
             timesteps and key steps, same number of key steps (equal UNet FLOPs); scored like the
             skips part on N_eval held-out-seed images against the training digits              (~10 min)
  skips      reference model, K = 10: the paper's stage 2, 10 skipped (step, layer) pairs, vs the same number
             of random skips on the stage-1 schedule; counted UNet FLOPs                         (~8 min)

  nice -n 10 .venv/bin/python eval/bench_search.py --part exact reference joint
  .venv/bin/python eval/bench_search.py --part reference joint --smoke     (random weights, tiny: checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastdiff.search import SearchConfig, search_timesteps
from fastdiff.search.evolutionary import make_candidate

RESULTS = Path(__file__).parent / "results" / "search"


def _env() -> dict:
    import diffusers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _write(name: str, record: dict, table: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)


# ------------------------------------------------------------------------------------------------ exact
def part_exact(out: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.search.objectives import ExactObjective, betas_from_alphas_cumprod
    from fastdiff.testing import GaussianMixtureDenoiser

    # not harness: the exact Gaussian-mixture model (no pipeline; ExactObjective seeds its own noise)
    gen = torch.Generator().manual_seed(0)
    model = GaussianMixtureDenoiser(means=torch.rand((3, 1, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1,
                                    stds=torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64))
    betas = betas_from_alphas_cumprod(model.alphas_cumprod)

    def sched(**flags):
        return DPMSolverMultistepScheduler(trained_betas=betas, algorithm_type="dpmsolver++", solver_order=2, **flags)

    held = ExactObjective(model, num_samples=8192, seed=777)  # initial noise never used by the search
    rows, record = [], {"setting": "GaussianMixtureDenoiser 3 components 1x4x4, stds 0.05/0.1/0.2; DPM-Solver++ 2M "
                        "(diffusers); fitness = Frechet distance of sample moments to the exact data moments",
                        "search": {"num_samples": 1024, "max_evaluations": 150, "seed": 0}, "held_out_samples": 8192,
                        "env": _env(), "rows": []}
    for fix_first in (True, False):
        for k in (4, 6):
            t0 = time.perf_counter()
            result = search_timesteps(model, k, "exact", SearchConfig(seed=0, num_samples=1024, max_evaluations=150,
                                                                      fix_first=fix_first))
            wall = time.perf_counter() - t0
            scores = {"uniform": held.score(held.sample(scheduler=sched(), num_inference_steps=k)),
                      "logSNR": held.score(held.sample(scheduler=sched(use_lu_lambdas=True), num_inference_steps=k)),
                      "Karras": held.score(held.sample(scheduler=sched(use_karras_sigmas=True), num_inference_steps=k)),
                      "searched": held.score(held.sample(result.timesteps, scheduler=sched()))}
            row = {"K": k, "fix_first": fix_first, "timesteps": result.timesteps, "search_wall_s": wall, **scores}
            record["rows"].append(row)
            first = "999" if fix_first else "free"
            rows.append(f"| {k} | {first} | {scores['uniform']:.4f} | {scores['logSNR']:.4f} | "
                        f"{scores['Karras']:.4f} | **{scores['searched']:.4f}** | "
                        f"{scores['searched'] / scores['uniform']:.2f} | {result.timesteps} | {wall:.1f} |")
    floor = held.score(held.sample(scheduler=sched(), num_inference_steps=200))
    record["dpmpp_200_steps"] = floor
    table = ["# AutoDiffusion search, exact objective (Gaussian mixture)", "",
             f"Held-out: {held.noise.shape[0]} initial noises never seen by the search (search: 1024, 150 evaluations)."
             f" FD of exact moments; DPM-Solver++ 2M with 200 steps reaches {floor:.4f} (estimation floor).", "",
             "| K | first step | uniform | logSNR | Karras | searched | searched/uniform | schedule | search s |",
             "|---|---|---|---|---|---|---|---|---|", *rows, "", f"Hardware: {_env()}"]
    _write("exact", record, table, out)


# ------------------------------------------------------------------------------------------------ reference model
def _reference(smoke: bool):
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.models.data import load_digits
    from fastdiff.models.unet import encode

    if smoke:
        from diffusers import DDIMScheduler

        from fastdiff.models.classifier import DigitClassifier
        from fastdiff.models.pipeline import ReferencePipeline
        from fastdiff.models.unet import build_reference_unet
        from fastdiff.models.weights import SCHEDULER_CONFIG

        pipe = ReferencePipeline(unet=build_reference_unet().eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
        clf = DigitClassifier().eval().requires_grad_(False)
    else:
        from fastdiff.models import load_digit_classifier, load_reference_pipeline

        pipe, clf = load_reference_pipeline(), load_digit_classifier()
    # the reference sweep's settings: DPM-Solver++ 2M (diffusers' DPMSolverMultistepScheduler, as in
    # eval/sweeps/reference.toml) from the model's config, labels i % 10, no guidance
    # not harness: the search and its objectives sample with the pipeline's own scheduler, so it is set here
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    train_images, train_labels = load_digits("train")
    held_images, _ = load_digits("heldout")
    return pipe, clf, encode, train_images, train_labels, held_images


def _objectives(pipe, clf, train_images, held_images, n_search: int, n_eval: int, search_seed: int):
    """The search objective and two held-out-seed scorers: vs the training digits and vs the held-out digits."""
    from fastdiff.eval.metrics import compute_stats
    from fastdiff.search.objectives import PipelineObjective

    with torch.no_grad():
        train_ref = compute_stats(clf.features(train_images[:4000]), {"extractor": "lenet"})
        held_ref = compute_stats(clf.features(held_images), {"extractor": "lenet"})
    search = PipelineObjective(pipe, clf.features, train_ref, extractor="lenet", num_samples=n_search,
                               seed=search_seed, per_image_kwargs={"class_labels": [i % 10 for i in range(n_search)]})
    held = PipelineObjective(pipe, clf.features, held_ref, extractor="lenet", num_samples=n_eval, seed=0,
                             per_image_kwargs={"class_labels": [i % 10 for i in range(n_eval)]})
    held_vs_train = PipelineObjective(pipe, clf.features, train_ref, extractor="lenet", num_samples=n_eval, seed=0,
                                      per_image_kwargs={"class_labels": [i % 10 for i in range(n_eval)]})
    return search, held, held_vs_train


def _flag_timesteps(pipe, k: int, **flags) -> list[int]:
    # not harness: a scheduler copy only to read its K timesteps
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config, **flags)
    sched.set_timesteps(k)
    return [int(t) for t in sched.timesteps]


def _flag_images(pipe, held, k: int, **flags) -> tuple[torch.Tensor, list[int]]:
    """Images of the scheduler's own K-step schedule with `flags` (karras / lu use their exact sigmas), at the
    held-out scorer's seeds and batches, through the harness."""
    from fastdiff.eval import MethodSpec, sample_images

    method = MethodSpec(name=f"K={k} {flags}", scheduler=type(pipe.scheduler).__name__, scheduler_kwargs=flags,
                        steps=k)
    samples = sample_images(pipe, method, held.num_samples, base_seed=held.seed, batch_size=held.batch_size)
    return samples.images, _flag_timesteps(pipe, k, **flags)


def part_reference(out: Path, smoke: bool, n_search: int = 200, n_eval: int = 4000) -> None:
    """Search at K = 4 and 6; score every schedule on held-out seeds 0..n_eval-1 against two references.

    Against the 4,000 training digits with all n_eval images (the usual FID protocol, training-set statistics),
    and against the 1,000 held-out digits with the first 1,000 images. FD is biased upward by about
    tr-terms / N for N samples on either side; with 1,000 held-out digits that bias alone is ~11 (real
    held-out digits vs the training digits score 10.8), which hides most differences between good schedules,
    so the ratio goals are read on the training-set reference with N = 4,000.
    """
    from fastdiff.search.baselines import ays_timesteps, gits_timesteps

    pipe, clf, encode, train_images, train_labels, held_images = _reference(smoke)
    n_search, n_eval = (16, 32) if smoke else (n_search, n_eval)
    n_held = min(n_eval, len(held_images))
    budgets = {4: 4, 6: 4} if smoke else {4: 60, 6: 60}
    warm = 8 if smoke else 32
    search_obj, held, vs_train = _objectives(pipe, clf, train_images, held_images, n_search, n_eval, 100_000)

    def scores_of(images: torch.Tensor) -> dict[str, float]:
        return {"train": vs_train.score_images(images), "heldout": held.score_images(images[:n_held])}

    with torch.no_grad():
        floor = {"train": vs_train.score_images(held_images), "heldout": float("nan")}
    record = {"setting": f"reference digit model, {type(pipe.scheduler).__name__} order 2 (from the model's config), "
              "labels i % 10, guidance 1.0; features: lenet (shipped digit classifier, 128-d)",
              "search": {"num_samples": n_search, "image_seeds": f"100000..{100000 + n_search - 1}",
                         "reference": "4000 training digits", "budgets": budgets, "population": 16, "parents": 6},
              "eval": {"num_samples": n_eval, "seeds": f"0..{n_eval - 1}",
                       "references": {"train": f"4000 training digits, all {n_eval} images",
                                      "heldout": f"1000 held-out digits, the first {n_held} images"}},
              "real_heldout_digits_vs_train": floor["train"], "smoke": smoke, "env": _env(), "rows": []}
    rows = []
    for k, budget in budgets.items():
        times, scores, schedules = {}, {}, {}
        t0 = time.perf_counter()
        result = search_timesteps(pipe, k, search_obj, SearchConfig(seed=0, max_evaluations=budget,
                                                                    population_size=16, num_parents=6))
        times["searched"] = time.perf_counter() - t0
        print(f"K={k}: searched {result.timesteps} in {times['searched']:.0f} s", flush=True)
        if not smoke:
            result.save(out / f"schedule_k{k}.json")  # usable as a sweep method
        t0 = time.perf_counter()
        # not harness: the GITS-style baseline's fixed calibration noise (an input of the baseline, not images)
        noise = torch.randn((warm, 4, 16, 16), generator=torch.Generator().manual_seed(555))
        schedules["GITS-style"] = gits_timesteps(pipe, k, noise, {"class_labels": [i % 10 for i in range(warm)]})
        times["GITS-style"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # not harness: which training digits calibrate the AYS-style baseline (a data subset)
        pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:warm]
        schedules["AYS-style"] = ays_timesteps(pipe, k, encode(train_images[pick]),
                                               {"class_labels": train_labels[pick].tolist()}, sweeps=1 if smoke else 2)
        times["AYS-style"] = time.perf_counter() - t0
        for name, flags in (("uniform", {}), ("logSNR", {"use_lu_lambdas": True}),
                            ("Karras", {"use_karras_sigmas": True})):
            images, schedules[name] = _flag_images(pipe, held, k, **flags)
            scores[name] = scores_of(images)
        schedules["searched"] = result.timesteps
        for name in ("GITS-style", "AYS-style", "searched"):
            scores[name] = scores_of(vs_train.generate(make_candidate(schedules[name])))
        record["rows"].append({"K": k, "fd": scores, "timesteps": schedules, "wall_s": times,
                               "search_fd_on_search_seeds": result.fitness, "evaluations": result.evaluations,
                               "history": result.history})
        for name in ("uniform", "logSNR", "Karras", "GITS-style", "AYS-style", "searched"):
            wall = f"{times[name]:.0f}" if name in times else "-"
            fd = scores[name]
            rows.append(f"| {k} | {name} | {fd['train']:.3f} | {fd['train'] / scores['uniform']['train']:.2f} | "
                        f"{fd['heldout']:.3f} | {fd['heldout'] / scores['uniform']['heldout']:.2f} | "
                        f"{schedules[name]} | {wall} |")
        print("\n".join(rows[-6:]), flush=True)
    table = ["# AutoDiffusion search on the reference digit model (DPM-Solver++ 2M)", "",
             f"FD (lenet features) of images at held-out seeds 0..{n_eval - 1} (never seen by the search): all "
             f"{n_eval} against the 4,000 training digits, and the first {n_held} against the 1,000 held-out digits. "
             f"Search: N = {n_search} images per candidate at seeds 100000+, vs the training digits, budgets "
             f"{budgets} evaluations, population 16. Wall times: 2 CPU cores (shared).", "",
             f"Floor: the 1,000 real held-out digits score FD {floor['train']:.3f} against the training digits; FD of "
             f"N samples carries a positive bias that shrinks with N, so with 1,000 held-out digits as the reference "
             f"every good schedule sits near that floor.", "",
             "| K | schedule | FD vs train (N = 4000) | / uniform | FD vs held-out (N = 1000) | / uniform | timesteps "
             "| compute s |", "|---|---|---|---|---|---|---|---|", *rows, "", f"Hardware: {_env()}"]
    _write("reference_smoke" if smoke else "reference", record, table, out)


def part_joint(out: Path, smoke: bool, n_search: int = 200, n_eval: int = 4000) -> None:
    from fastdiff.hooks.encoder_propagation import key_step_indices

    pipe, clf, _, train_images, _, held_images = _reference(smoke)
    k = 10
    n_search, n_eval = (16, 32) if smoke else (n_search, n_eval)
    stage1, stage2 = (3, 3) if smoke else (40, 30)
    preset = list(key_step_indices("fd20", k))
    search_obj, _, held = _objectives(pipe, clf, train_images, held_images, n_search, n_eval, 100_000)
    t0 = time.perf_counter()
    config = SearchConfig(seed=0, max_evaluations=stage1, population_size=16, num_parents=6,
                          num_key_steps=len(preset), key_step_presets=[preset], stage2_evaluations=stage2)
    result = search_timesteps(pipe, k, search_obj, config)
    wall = time.perf_counter() - t0
    if not smoke:
        result.save(out / f"schedule_k{k}_joint.json")
    ts_only = result.stage1_timesteps
    scores = {
        "uniform, all steps full": held(make_candidate(_flag_timesteps(pipe, k))),
        "uniform + fd20 keys": held(make_candidate(_flag_timesteps(pipe, k), preset)),
        "searched timesteps, all full": held(make_candidate(ts_only)),
        "searched timesteps + fd20 keys": held(make_candidate(ts_only, preset)),
        "joint search (timesteps + keys)": held(make_candidate(result.timesteps, result.key_steps)),
    }
    keys = {"uniform, all steps full": list(range(k)), "searched timesteps, all full": list(range(k)),
            "uniform + fd20 keys": preset, "searched timesteps + fd20 keys": preset,
            "joint search (timesteps + keys)": result.key_steps}
    record = {"K": k, "scheduler": type(pipe.scheduler).__name__, "preset": preset, "stage1_evaluations": stage1,
              "stage2_evaluations": stage2,
              "search_samples": n_search, "eval_samples": n_eval, "timesteps_only": ts_only,
              "joint": {"timesteps": result.timesteps, "key_steps": result.key_steps}, "fd": scores,
              "search_wall_s": wall, "smoke": smoke, "env": _env()}
    rows = [f"| {name} | {len(keys[name])}/{k} | {v:.3f} | {keys[name]} |" for name, v in scores.items()]
    table = ["# Joint search of timesteps and encoder-propagation key steps (reference model, K = 10)", "",
             f"DPM-Solver++ 2M, FD (lenet) of N = {n_eval} held-out-seed images vs the 4,000 training digits. Stage 1: "
             f"{stage1} evaluations, stage 2: {stage2}, N = {n_search} per candidate; search wall {wall:.0f} s. "
             "Rows with the same number of key steps cost the same UNet FLOPs.", "",
             "| method | key steps | FD | keys |", "|---|---|---|---|", *rows, "",
             f"searched timesteps {ts_only}; joint timesteps {result.timesteps}", "", f"Hardware: {_env()}"]
    _write("joint_smoke" if smoke else "joint", record, table, out)


def _unet_flops(pipe, candidate) -> int:
    """UNet FLOPs of one batch-1 call of `candidate` (timesteps, key steps, layer skips), FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff.search.objectives import _propagation, _skipping

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        with _propagation(pipe, candidate.key_steps), _skipping(pipe, candidate.skips):
            pipe(class_labels=[0], timesteps=list(candidate.timesteps), output_type="pt",
                 # not harness: one batch-1 call under FlopCounterMode, counting FLOPs, not sampling images
                 generator=torch.Generator().manual_seed(0))
    return counter.get_total_flops()


def part_skips(out: Path, smoke: bool, n_search: int = 200, n_eval: int = 4000) -> None:
    """The paper's stage 2 on the reference model, K = 10: skip 10 (step, layer) pairs, at most 10% per step."""
    from fastdiff.hooks import skippable_layers
    from fastdiff.search.evolutionary import SearchSpace, random_candidate

    pipe, clf, _, train_images, _, held_images = _reference(smoke)
    k, num_skips = 10, 10
    n_search, n_eval = (16, 32) if smoke else (n_search, n_eval)
    stage1, stage2 = (3, 3) if smoke else (40, 30)
    search_obj, _, vs_train = _objectives(pipe, clf, train_images, held_images, n_search, n_eval, 100_000)
    t0 = time.perf_counter()
    config = SearchConfig(seed=0, max_evaluations=stage1, population_size=16, num_parents=6, num_skips=num_skips,
                          max_skip_fraction=0.1, stage2_evaluations=stage2)
    result = search_timesteps(pipe, k, search_obj, config)
    wall = time.perf_counter() - t0
    num_layers = len(skippable_layers(pipe.unet))
    space = SearchSpace(k, 999, num_skips=num_skips, num_layers=num_layers, max_skips_per_step=max(1, num_layers // 10))
    # not harness: the draw of the random-skips control row (a candidate, not an image seed)
    random_skips = random_candidate(space, torch.Generator().manual_seed(1)).skips
    rows = {
        "uniform, full network": make_candidate(_flag_timesteps(pipe, k)),
        "stage 1 (searched timesteps), full network": make_candidate(result.stage1_timesteps),
        "stage 1 timesteps + random skips": make_candidate(result.stage1_timesteps, (), random_skips),
        "stage 2 (timesteps + skips searched)": make_candidate(result.timesteps, (), result.skips),
    }
    full_flops = _unet_flops(pipe, rows["uniform, full network"])
    scores = {name: vs_train(c) for name, c in rows.items()}
    flops = {name: _unet_flops(pipe, c) / full_flops for name, c in rows.items()}
    names = [name for name, _ in skippable_layers(pipe.unet)]
    record = {"K": k, "num_skips": num_skips, "num_layers": num_layers, "max_skips_per_step": space.max_skips_per_step,
              "stage1_evaluations": stage1, "stage2_evaluations": stage2, "search_samples": n_search,
              "eval_samples": n_eval, "reference": "4000 training digits", "search_wall_s": wall,
              "rows": {name: {"timesteps": list(c.timesteps), "skips": [list(x) for x in c.skips], "fd": scores[name],
                              "unet_flops": flops[name]} for name, c in rows.items()},
              "smoke": smoke, "env": _env()}
    lines = [f"| {name} | {flops[name]:.3f} | {scores[name]:.3f} | {list(c.timesteps)} | "
             f"{', '.join(f'{s}:{names[layer]}' for s, layer in c.skips) or '-'} |" for name, c in rows.items()]
    table = ["# AutoDiffusion stage 2: per-step layer skips (reference model, K = 10)", "",
             f"DPM-Solver++ 2M. Stage 1: {stage1} evaluations; stage 2: {stage2}, {num_skips} skipped (step, layer) "
             f"pairs of {k} x {num_layers}, at most {space.max_skips_per_step} per step (the paper's 10%); N = "
             f"{n_search} per candidate; search wall {wall:.0f} s. FD (lenet) of {n_eval} images at held-out seeds "
             "vs the 4,000 training digits; UNet FLOPs of a batch-1 call (FlopCounterMode) relative to the first row.",
             "", "| schedule | UNet FLOPs | FD | timesteps | skips (step:layer) |", "|---|---|---|---|---|", *lines, "",
             f"Hardware: {_env()}"]
    _write("skips_smoke" if smoke else "skips", record, table, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=("exact", "reference", "joint", "skips"), default=["exact"])
    parser.add_argument("--smoke", action="store_true", help="random weights, tiny sizes: checks the script only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--n-search", type=int, default=200, help="images per candidate during the search")
    parser.add_argument("--n-eval", type=int, default=4000,
                        help="held-out-seed images per scored schedule (reference, joint and skips parts)")
    args = parser.parse_args()
    out = Path("/tmp/bench_search_smoke") if args.smoke else args.out
    if not args.smoke and {"reference", "joint", "skips"} & set(args.part):
        from fastdiff.models.weights import UNET_FILE, WEIGHTS_DIR

        if not (WEIGHTS_DIR / UNET_FILE).exists():
            print(f"{WEIGHTS_DIR / UNET_FILE} is missing: run `fastdiff train-reference` first "
                  "(or --smoke to check this script).", file=sys.stderr)
            return 2
    np.set_printoptions(precision=4)
    for part in args.part:
        if part == "exact":
            part_exact(out)
        elif part == "reference":
            part_reference(out, args.smoke, args.n_search, args.n_eval)
        elif part == "joint":
            part_joint(out, args.smoke, args.n_search, args.n_eval)
        else:
            part_skips(out, args.smoke, args.n_search, args.n_eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
