"""Acceptance numbers of the built-in reference model: class agreement, guided-sampling stress table, FD.

Run:  python eval/bench_reference.py [--n-default 1000] [--n-stress 200] [--n-ddpm 100]
Writes eval/results/reference_model/{results.json,results.md}. Seeds are image indices; one generator
per image; labels cycle 0-9 so every class gets N/10 images.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fastdiff.eval.metrics import compute_stats, frechet_distance
from fastdiff.models import load_digit_classifier, load_reference_pipeline, reference_record
from fastdiff.models.data import load_digits

OUT = Path(__file__).parent / "results" / "reference_model"


def generate(pipe, n: int, guidance: float, steps: int, batch: int = 250) -> tuple[torch.Tensor, float]:
    """n images, labels i % 10, seed i; returns images (n, 1, 32, 32) and seconds per image."""
    images, t0 = [], time.perf_counter()
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        out = pipe(class_labels=[i % 10 for i in idx], guidance_scale=guidance, num_inference_steps=steps,
                   generator=[torch.Generator().manual_seed(i) for i in idx], output_type="pt")
        images.append(out.images)
    return torch.cat(images), (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-default", type=int, default=1000)
    ap.add_argument("--n-stress", type=int, default=200)
    ap.add_argument("--n-ddpm", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    clf = load_digit_classifier()
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    shipped = pipe.scheduler
    default = reference_record()["default_sampler"]

    heldout, _ = load_digits("heldout")
    train, _ = load_digits("train")
    with torch.no_grad():
        f_held = clf.features(heldout).numpy()
        f_train = clf.features(train[: len(heldout)]).numpy()
    held = compute_stats(f_held)
    rows = []

    def evaluate(name: str, scheduler, steps: int, g: float, n: int) -> dict:
        pipe.scheduler = scheduler
        images, spi = generate(pipe, n, g, steps)
        labels = torch.arange(n) % 10
        with torch.no_grad():
            agree = (clf.log_prob(images).argmax(-1) == labels).float().mean().item()
            feats = clf.features(images).numpy()
        gen = compute_stats(feats)
        fd = frechet_distance(gen.mu, gen.sigma, held.mu, held.sigma)
        row = {"method": name, "steps": steps, "guidance": g, "n": n, "class_agreement": round(agree, 4),
               "fd_lenet_vs_heldout": round(float(fd), 3), "s_per_image": round(spi, 4)}
        print(row, flush=True)
        rows.append(row)
        return row

    evaluate(f"{default['scheduler']} (shipped default)", shipped, default["num_inference_steps"],
             default["guidance_scale"], args.n_default)
    for g in (1.0, 2.0, 3.0, 5.0):
        evaluate("DDIM", ddim, 50, g, args.n_stress)
    evaluate("DDPM", ddpm, 1000, 3.0, args.n_ddpm)
    real = compute_stats(f_train)
    fd_real = float(frechet_distance(real.mu, real.sigma, held.mu, held.sigma))

    result = {
        "rows": rows, "fd_real_train_vs_heldout": round(fd_real, 3), "n_real": len(heldout),
        "feature_extractor": "lenet (shipped digit classifier, penultimate layer, d=128)",
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
        "seeds": "image i uses torch.Generator().manual_seed(i) and label i % 10",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["| sampler | steps | guidance | N | class agreement | FD (lenet) vs held-out | s / image |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['steps']} | {r['guidance']} | {r['n']} | {r['class_agreement']:.1%} | "
              f"{r['fd_lenet_vs_heldout']:.2f} | {r['s_per_image']:.4f} |" for r in rows]
    lines += ["", f"FD real-train vs held-out real at N = {len(heldout)}: {fd_real:.2f} "
              f"(FD ratio default sampler / real: {rows[0]['fd_lenet_vs_heldout'] / fd_real:.2f}x)", "",
              f"Hardware: {result['hardware']}; torch {torch.__version__}, diffusers {diffusers.__version__}."]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
