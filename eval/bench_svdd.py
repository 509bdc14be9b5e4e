"""Benchmark: SVDD (Li et al. 2024, arXiv 2408.08252) on the reference digit model vs compute-matched best-of-N.

One run, same seeds, same scheduler (the shipped DDPM sampler, T steps, x0 clipped), unconditional generation
(null label, no CFG), every sample drawn through the harness (`MethodSpec` + `sample_images`):
  (a) reward = ClassifierReward(7): fraction classified as 7, base vs SVDD-PM M = 8;
  (b) for ClassifierReward(7) and jpeg_compressibility: SVDD-PM M = 4 / 8 vs best-of-N with N = ceil(SVDD-PM
      NFE / T) (so best-of-N gets at least SVDD's UNet evaluations), and SVDD-MC M = 8 with a small value
      network trained on the best-of-N pool (no extra samples). FD (digit-classifier features) to the
      1,000 held-out real digits beside every reward.

    nice -n 10 .venv/bin/python eval/bench_svdd.py            # N = 200 images per row (~15 min on 2 cores)
    .venv/bin/python eval/bench_svdd.py --smoke               # random weights, tiny N: plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from fastdiff.guidance import rewards
from fastdiff.guidance.value import train_value_function

OUT = Path(__file__).parent / "results" / "svdd"


def load_models(smoke: bool):
    from diffusers import DDIMScheduler

    from fastdiff.models import load_digit_classifier, load_reference_pipeline
    from fastdiff.models.classifier import DigitClassifier
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    if smoke:
        pipe = ReferencePipeline(unet=build_reference_unet().eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
        clf = DigitClassifier().eval().requires_grad_(False)
    else:
        pipe, clf = load_reference_pipeline(), load_digit_classifier()
    pipe.set_progress_bar_config(disable=True)
    return pipe, clf


def lenet_extractor(clf, smoke: bool):
    """The harness's `lenet` features; with --smoke the random-weight classifier's, under the same name."""
    from fastdiff.eval.features import FeatureExtractor, get_extractor

    if not smoke:
        return get_extractor("lenet")
    return FeatureExtractor("lenet", "random-weight DigitClassifier (--smoke)", "none", clf.features, 500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per row")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps T")
    parser.add_argument("--max-batch", type=int, default=800)
    parser.add_argument("--value-steps", type=int, default=1500)
    parser.add_argument("--smoke", action="store_true", help="random weights, N=6, T=4: plumbing check only")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder (default: the recorded one)")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.steps, args.value_steps = 6, 4, 20
        args.out = Path("/tmp/bench_svdd_smoke") if args.out == OUT else args.out
    n, steps, t_start = args.n, args.steps, time.time()

    from fastdiff.eval import MethodSpec, compute_stats, frechet_distance, sample_images
    from fastdiff.models.data import load_digits
    from fastdiff.models.unet import decode

    pipe, clf = load_models(args.smoke)
    lenet = lenet_extractor(clf, args.smoke)
    real, _ = load_digits("heldout")
    real_stats = compute_stats(lenet(real))
    train_real, _ = load_digits("train")
    reward_fns = {"classifier7": rewards.ClassifierReward(7, classifier=clf), "jpeg": rewards.jpeg_compressibility}
    # the same rewards as an SVDD method names them (reward_args may hold objects: the classifier in use)
    reward_options = {
        "classifier7": {"reward": "ClassifierReward", "reward_args": {"target_class": 7, "classifier": clf}},
        "jpeg": {"reward": "jpeg_compressibility"},
    }
    pm_m = (4, 8)
    nfe_pm = {m: 1 + (steps - 1) * m for m in pm_m}
    bon = {m: math.ceil(nfe_pm[m] / steps) for m in pm_m}
    pool_size = max(bon.values())

    def method(name: str, svdd: dict | None = None) -> MethodSpec:
        return MethodSpec(name=name, scheduler="DDPMScheduler", steps=steps, guidance=1.0, svdd=svdd)

    def sample(spec: MethodSpec, count: int, base_seed: int = 0, batch: int = 400, output_type: str = "pt"):
        # class_labels None replaces the harness's label i % 10: the null label, unconditional samples
        return sample_images(pipe, spec, count, base_seed, batch, pipe_kwargs={"class_labels": None},
                             output_type=output_type)

    # 1. Best-of-N pool: pool_size plain samples per image; column 0 (seed i) is the base sample of image i, the
    # others are seeds 100000 + i * pool_size + j (j >= 1). They are taken from the harness's block of seeds
    # 100000..100000 + n * pool_size - 1, whose draws j = 0 go unused: the recorded seeds, for n extra samples.
    plain = method(f"DDPM-{steps}")
    base = sample(plain, n, output_type="latent")
    extra = sample(plain, n * pool_size, base_seed=100_000, output_type="latent")
    grid = extra.images.reshape(n, pool_size, *extra.images.shape[1:])
    grid[:, 0] = base.images
    pool_latents = grid.reshape(n * pool_size, *grid.shape[2:])
    pool_images = decode(pool_latents.float())
    per_plain_s = (base.wall_s + extra.wall_s) / (n + n * pool_size)
    pool_images_grid = pool_images.reshape(n, pool_size, *pool_images.shape[1:])

    rows, fractions = [], {}

    def add_row(reward_name, method, m_or_n, images, values, nfe, seconds):
        stats = compute_stats(lenet(images))
        fd = frechet_distance(stats.mu, stats.sigma, real_stats.mu, real_stats.sigma)
        row = dict(reward=reward_name, method=method, param=m_or_n, n=len(images), mean_reward=float(values.mean()),
                   median_reward=float(values.median()), fd_lenet=fd, nfe_per_image=nfe, s_per_image=seconds)
        if reward_name == "classifier7":
            row["frac_7"] = float((clf.log_prob(images).argmax(1) == 7).float().mean())
        rows.append(row)
        print(f"  {reward_name:12s} {method:12s} {m_or_n:>3}  mean {row['mean_reward']:8.3f}  median "
              f"{row['median_reward']:8.3f}  FD {fd:7.2f}  NFE {nfe:6.1f}  s/img {seconds:.3f}", flush=True)

    # not harness: which real digits form the "real (train)" row (a data subset, not a sampling seed)
    real_sub = train_real[torch.randperm(len(train_real), generator=torch.Generator().manual_seed(0))[:n]]
    for name, reward_fn in reward_fns.items():
        print(f"reward {name}", flush=True)
        pool_values = reward_fn(pool_images).reshape(n, pool_size)
        add_row(name, "real (train)", "-", real_sub, reward_fn(real_sub), 0.0, 0.0)
        add_row(name, "base", 1, pool_images_grid[:, 0], pool_values[:, 0], float(steps), per_plain_s)
        for m in pm_m:
            k = bon[m]
            best = pool_values[:, :k].argmax(1)
            add_row(name, "best-of-N", k, pool_images_grid[torch.arange(n), best], pool_values[:, :k].max(1).values,
                    float(k * steps), k * per_plain_s)
        # SVDD rows: one batch of all n images (max_batch bounds the UNet batch), seeds 0..n-1 as the base row.
        # The reward of the returned images is SVDD's final reward; denoiser rows per image are its NFE.
        for m in pm_m:
            svdd = {**reward_options[name], "num_candidates": m, "max_batch": args.max_batch, "show_progress": False}
            out = sample(method(f"SVDD-PM M={m}", svdd), n, batch=n)
            add_row(name, "SVDD-PM", m, out.images, reward_fn(out.images), out.unet_rows / n, out.wall_s / n)
        # SVDD-MC: value net regressed on the pool (the model's own samples), then M = 8 children per step
        t0 = time.time()
        net = train_value_function(pipe, reward_fn, latents=pool_latents, steps=args.value_steps, seed=0)
        train_s = time.time() - t0
        svdd = {**reward_options[name], "num_candidates": 8, "variant": "mc", "value_fn": net,
                "max_batch": args.max_batch, "show_progress": False}
        out = sample(method("SVDD-MC M=8", svdd), n, batch=n)
        add_row(name, "SVDD-MC", 8, out.images, reward_fn(out.images), out.unet_rows / n, out.wall_s / n)
        rows[-1]["value_net_train_s"] = train_s
        if name == "classifier7":
            fractions = {"base": rows[1]["frac_7"], "SVDD-PM M=8": next(
                r["frac_7"] for r in rows if r["method"] == "SVDD-PM" and r["param"] == 8 and r["reward"] == name)}

    meta = dict(
        n_per_row=n, scheduler=f"DDPMScheduler (shipped), {steps} steps (trailing, x0 clipped)", conditioning=
        "unconditional (null label, guidance_scale=1)", feature_extractor="lenet (shipped digit classifier, 128-d)",
        fd_reference="1,000 held-out real digits (fastdiff.models.data.load_digits('heldout'))",
        best_of_n="N = ceil(SVDD-PM NFE / T): at least SVDD-PM's UNet evaluations; column 0 of the pool = base",
        seeds="image i: seed i (base, SVDD); best-of-N extra draws: 100000 + i*N + j",
        value_net=f"ValueNetwork trained {args.value_steps} steps on the {len(pool_latents)} pool samples",
        hardware=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        versions={"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                  "python": platform.python_version()},
        total_wall_s=time.time() - t_start, smoke=args.smoke,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "fraction_7": fractions, "rows": rows}, indent=2))
    lines = [f"# SVDD on the reference digit model (N = {n} per row)", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             f"(a) fraction classified 7: base {fractions.get('base', float('nan')):.1%}, "
             f"SVDD-PM M=8 {fractions.get('SVDD-PM M=8', float('nan')):.1%}", "",
             "| reward | method | M / N | mean reward | median reward | frac 7 | FD (lenet) | NFE/img | s/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{r['frac_7']:.1%}" if "frac_7" in r else ""
        lines.append(f"| {r['reward']} | {r['method']} | {r['param']} | {r['mean_reward']:.3f} | "
                     f"{r['median_reward']:.3f} | {frac} | {r['fd_lenet']:.2f} | {r['nfe_per_image']:.1f} | "
                     f"{r['s_per_image']:.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
