"""Acceptance numbers of the built-in reference model: class agreement, guided-sampling stress table, FD.

Run:  python eval/bench_reference.py [--n-default 1000] [--n-stress 200] [--n-ddpm 100] [--out DIR]
Writes eval/results/reference_model/{results.json,results.md} (or DIR). Images come from the harness
(`MethodSpec` + `sample_images`): image i has seed i and label i % 10, so every class gets N/10 images.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import diffusers
import numpy as np
import torch

from fastdiff.eval import MethodSpec, compute_stats, frechet_distance, get_extractor, sample_images
from fastdiff.models import load_digit_classifier, load_reference_pipeline, reference_record
from fastdiff.models.data import load_digits

OUT = Path(__file__).parent / "results" / "reference_model"
BATCH = 250  # images per pipeline call, as in the recorded runs (another batch changes float round-off only)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-default", type=int, default=1000)
    ap.add_argument("--n-stress", type=int, default=200)
    ap.add_argument("--n-ddpm", type=int, default=100)
    ap.add_argument("--out", type=Path, default=OUT, help="results folder (default: the recorded one)")
    args = ap.parse_args()
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    clf = load_digit_classifier()  # class agreement (log_prob); features come from the harness's `lenet`
    lenet = get_extractor("lenet")
    default = reference_record()["default_sampler"]

    heldout, _ = load_digits("heldout")
    train, _ = load_digits("train")
    held = compute_stats(lenet(heldout))
    rows = []

    def evaluate(method: MethodSpec, n: int) -> dict:
        samples = sample_images(pipe, method, n, batch_size=BATCH)
        labels = torch.arange(n) % 10
        with torch.no_grad():
            agree = (clf.log_prob(samples.images).argmax(-1) == labels).float().mean().item()
        gen = compute_stats(lenet(samples.images))
        fd = frechet_distance(gen.mu, gen.sigma, held.mu, held.sigma)
        row = {"method": method.name, "steps": method.steps, "guidance": method.guidance, "n": n,
               "class_agreement": round(agree, 4), "fd_lenet_vs_heldout": round(float(fd), 3),
               "s_per_image": round(samples.wall_s / n, 4)}
        print(row, flush=True)
        rows.append(row)
        return row

    evaluate(MethodSpec(name=f"{default['scheduler']} (shipped default)", scheduler=default["scheduler"],
                        steps=default["num_inference_steps"], guidance=default["guidance_scale"]), args.n_default)
    for g in (1.0, 2.0, 3.0, 5.0):
        evaluate(MethodSpec(name="DDIM", scheduler="DDIMScheduler", steps=50, guidance=g), args.n_stress)
    evaluate(MethodSpec(name="DDPM", scheduler="DDPMScheduler", steps=1000, guidance=3.0), args.n_ddpm)
    real = compute_stats(lenet(train[: len(heldout)]))
    fd_real = float(frechet_distance(real.mu, real.sigma, held.mu, held.sigma))

    result = {
        "rows": rows, "fd_real_train_vs_heldout": round(fd_real, 3), "n_real": len(heldout),
        "feature_extractor": "lenet (shipped digit classifier, penultimate layer, d=128)",
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
        "seeds": "image i: seed i (its own CPU generator, fastdiff.eval.sample_images) and label i % 10",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["| sampler | steps | guidance | N | class agreement | FD (lenet) vs held-out | s / image |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['steps']} | {r['guidance']} | {r['n']} | {r['class_agreement']:.1%} | "
              f"{r['fd_lenet_vs_heldout']:.2f} | {r['s_per_image']:.4f} |" for r in rows]
    lines += ["", f"FD real-train vs held-out real at N = {len(heldout)}: {fd_real:.2f} "
              f"(FD ratio default sampler / real: {rows[0]['fd_lenet_vs_heldout'] / fd_real:.2f}x)", "",
              f"Hardware: {result['hardware']}; torch {torch.__version__}, diffusers {diffusers.__version__}."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
