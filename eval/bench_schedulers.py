"""Benchmark of fastdiff's DPM-Solver++ schedulers (Lu et al. 2022, arXiv 2211.01095).

  (a) step() time vs diffusers' DPMSolverMultistep/Singlestep at equal settings (ratio table), CPU;
  (b) order of convergence on an exact Gaussian-mixture denoiser (fp64): warm vs cold start, plot;
  (c) reference model (needs fastdiff/models/weights): FD on the digit classifier's features vs NFE for DDIM and
      DPM-Solver++ 2M / 3M / 2S / SDE-2M, the smallest NFE within 10% of DDPM-1000's FD, and the guided stress
      test (class agreement at guidance 3 and 5, 2M + dynamic thresholding <= 20 steps vs DDIM-50);
  (d) peers: error vs NFE of DPM-Solver++ and diffusers' UniPC, DEIS, DDIM, PNDM, Euler, Heun, LMS (VP) and
      FlowMatchEuler, UniPC (flow) on exact Gaussian mixtures, against the exact ODE solution.

    nice -n 10 python eval/bench_schedulers.py [--parts a,b,c,d] [--n 500] [--out DIR]

Writes eval/results/schedulers/{results.json, results.md, convergence.png} (or DIR). Parts (c) and (fd) sample
through the harness (`MethodSpec` + `sample_images`: image i has seed i and label i % 10) and score with
`fastdiff.eval.metrics`; parts (a), (b) and (d) drive schedulers by hand on purpose: they measure `step()`
itself and exact-ODE errors, below what the harness samples.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "eval" / "results" / "schedulers"  # the recorded results; --out writes elsewhere


def _env() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(), "device": "cpu"}


# ------------------------------------------------------------------------------------------ (a) step time
def bench_step_time(repeats: int = 5, steps: int = 20) -> list[dict]:
    from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

    from fastdiff.schedulers import DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestepScheduler

    configs = [
        ("2M", dict(solver_order=2), False),
        ("3M", dict(solver_order=3), False),
        ("SDE-2M", dict(solver_order=2, algorithm_type="sde-dpmsolver++"), False),
        ("2M karras", dict(solver_order=2, use_karras_sigmas=True), False),
        ("2M thresholding", dict(solver_order=2, thresholding=True, sample_max_value=1.5), False),
        ("2S", dict(solver_order=2), True),
        ("3S", dict(solver_order=3), True),
    ]
    rows = []
    for shape in [(1, 4, 64, 64), (64, 4, 16, 16)]:
        # not harness: fixed random model outputs and start, to time step() alone (no model, no pipeline)
        outs = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
        # not harness: as above
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(999))
        for name, cfg, single in configs:
            ref_cls = DPMSolverSinglestepScheduler if single else DPMSolverMultistepScheduler
            our_cls = DPMSolverPlusPlusSinglestepScheduler if single else DPMSolverPlusPlusScheduler
            times = {}
            for label, cls in (("diffusers", ref_cls), ("fastdiff", our_cls)):
                best = math.inf
                for r in range(repeats):
                    sched = cls(**cfg)
                    sched.set_timesteps(steps)
                    x = x0
                    # not harness: the SDE solver's noise while timing step()
                    g = torch.Generator().manual_seed(r)
                    t0 = time.perf_counter()
                    for t, out in zip(sched.timesteps, outs):
                        x = sched.step(out, t, x, generator=g).prev_sample
                    best = min(best, (time.perf_counter() - t0) / steps)
                times[label] = best
            rows.append({"config": name, "shape": list(shape), "diffusers_ms": 1e3 * times["diffusers"],
                         "fastdiff_ms": 1e3 * times["fastdiff"], "ratio": times["fastdiff"] / times["diffusers"]})
            print(f"  {name:16s} {str(shape):16s} diffusers {rows[-1]['diffusers_ms']:.3f} ms  "
                  f"fastdiff {rows[-1]['fastdiff_ms']:.3f} ms  ratio {rows[-1]['ratio']:.2f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ (b) convergence
def _t_of_sigma(model, sigma: float) -> float:
    target, ac = 1.0 / (1.0 + sigma * sigma), model.alphas_cumprod.numpy()
    k = int(np.clip(np.searchsorted(-ac, -target, side="right") - 1, 0, len(ac) - 2))
    return k + (ac[k] - target) / (ac[k] - ac[k + 1])


def bench_convergence(steps=(10, 20, 40, 80, 160, 320), lam=(-2.5, 2.5)) -> dict:
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.schedulers import DPMSolverPlusPlusScheduler
    from fastdiff.testing import GaussianMixtureDenoiser

    # not harness: the exact Gaussian-mixture model and its start (an ODE-error measurement, no pipeline)
    g = torch.Generator().manual_seed(0)
    ac = DPMSolverPlusPlusScheduler().alphas_cumprod.double()
    model = GaussianMixtureDenoiser(means=torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * 0.8,
                                    stds=torch.tensor([0.3, 0.5, 0.4]), alphas_cumprod=ac)
    x_T = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    t0, t1 = _t_of_sigma(model, math.exp(-lam[0])), _t_of_sigma(model, math.exp(-lam[1]))
    reference = model.exact_ode_solution(x_T, t0, t1, rtol=1e-12, atol=1e-14)

    def run(order, n, warm, exact3=True, diffusers=False):
        sigmas = np.exp(-np.linspace(lam[0], lam[1], n + 1))
        t_model = [_t_of_sigma(model, s) for s in sigmas]
        if diffusers:  # diffusers has no sigmas=: drive its internals with the same grid (float32 maths)
            sched = DPMSolverMultistepScheduler(solver_order=order, lower_order_final=False)
            sched.set_timesteps(n)
            sched.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        else:
            sched = DPMSolverPlusPlusScheduler(solver_order=order, lower_order_final=False, exact_third_order=exact3)
            sched.set_timesteps(sigmas=sigmas)
        x = x_T if not diffusers else x_T.float()
        for i, t in enumerate(sched.timesteps):
            eps = model(x, torch.tensor(t_model[i], dtype=torch.float64)).sample
            x_next = sched.step(eps, t, x).prev_sample
            if warm and i < order - 1:
                x_next = model.exact_ode_solution(x.double(), t_model[i], t_model[i + 1], rtol=1e-12,
                                                  atol=1e-14).to(x.dtype)
            x = x_next
        return (x.double() - reference).abs().max().item()

    series = {}
    variants = [("order 1", 1, {}), ("order 2 (2M)", 2, {}), ("order 3 (3M, exact_third_order)", 3, {}),
                ("order 3 (3M, diffusers weight)", 3, {"exact3": False}),
                ("diffusers 3M (fp32)", 3, {"diffusers": True})]
    h = (lam[1] - lam[0]) / np.array(steps)
    for label, order, kw in variants:
        for warm in (True, False):
            errs = [run(order, n, warm, **kw) for n in steps]
            tail = slice(2, None)  # fit on N >= 40: the asymptotic range
            slope = float(np.polyfit(np.log(h[tail]), np.log(errs[tail]), 1)[0])
            series[f"{label} {'warm' if warm else 'cold'}"] = {"order": order, "warm": warm, "errors": errs,
                                                               "slope": slope}
            print(f"  {label:34s} {'warm' if warm else 'cold'}  slope {slope:.2f}  errors "
                  + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return {"steps": list(steps), "h": h.tolist(), "lambda_range": list(lam), "series": series,
            "fit": "least squares of log error on log h over N >= 40"}


def plot_convergence(conv: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    h = np.array(conv["h"])
    for label, s in conv["series"].items():
        ax.loglog(h, s["errors"], "o-" if s["warm"] else "x--", label=f"{label} ({s['slope']:.2f})", ms=3)
    ax.set_xlabel("h = step in log-SNR (lambda)")
    ax.set_ylabel("max |x - exact ODE solution|")
    ax.set_title("DPM-Solver++ convergence, Gaussian mixture, fp64")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------- (c) reference model
def bench_reference(n: int = 500, nfes=(5, 6, 8, 10, 15, 20), n_guided: int = 200, save=None) -> dict:
    """Guided stress test first (the paper's claim), then FD vs NFE, then DDPM-1000; `save(partial)` after each.

    Every method is a `MethodSpec` over the shipped scheduler config, sampled with `sample_images` in batches
    of 100 (image i: seed i, label i % 10); FD is on the harness's `lenet` features vs the held-out digits."""
    from fastdiff.eval import MethodSpec, compute_stats, frechet_distance, get_extractor, sample_images
    from fastdiff.models import load_digit_classifier, load_reference_pipeline
    from fastdiff.models.data import load_digits

    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    clf = load_digit_classifier()  # class agreement (log_prob)
    lenet = get_extractor("lenet")
    real, _ = load_digits("heldout")
    real_stats = compute_stats(lenet(real))
    res = {"n": n, "n_guided": n_guided, "features": "lenet (fastdiff digit classifier, 128-d penultimate layer)",
           "real_stats": "held-out split, 1000 digits", "guidance_for_fd": 1.0,
           "x0_clipping": "all FD methods clip x0 to [-1, 1] (DDIM clip_sample, DPM++ thresholding max 1)",
           "rows": [], "guided": [],
           "ddpm_fd": None, "smallest_nfe_within_10pct_of_ddpm": {}}

    def run(name: str, scheduler: str, kwargs: dict, steps: int, guidance: float, count: int):
        """(images, FD vs the held-out digits, seconds per image) of one method."""
        method = MethodSpec(name=name, scheduler=scheduler, scheduler_kwargs=kwargs, steps=steps, guidance=guidance)
        samples = sample_images(pipe, method, count, batch_size=100)
        stats = compute_stats(lenet(samples.images))
        fd = float(frechet_distance(stats.mu, stats.sigma, real_stats.mu, real_stats.sigma))
        return samples.images, fd, samples.wall_s / count

    dpm = "DPMSolverPlusPlusScheduler"
    thr = dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.995)
    stress = {
        "DDIM-50": ("DDIMScheduler", {}, 50),
        "DPM++ 2M-20 + thresholding": (dpm, dict(solver_order=2, **thr), 20),
        "DPM++ 2M-15 + thresholding": (dpm, dict(solver_order=2, **thr), 15),
        "DPM++ 2M-20": (dpm, dict(solver_order=2), 20),
    }
    for w in (3.0, 5.0):
        for name, (scheduler, kwargs, steps) in stress.items():
            images, fd, spi = run(name, scheduler, kwargs, steps, w, n_guided)
            with torch.no_grad():
                pred = clf.log_prob(images).argmax(-1).numpy()
            agree = float(np.mean(pred == np.arange(n_guided) % 10))
            res["guided"].append({"method": name, "guidance": w, "nfe": steps, "agreement": agree, "fd": fd,
                                  "s_per_image": spi})
            print(f"  w={w} {name:28s} agreement {agree:.3f} FD {fd:.3f}", flush=True)
            if save:
                save(res)

    # x0 clipped to [-1, 1] in every method, as the shipped DDIM does (clip_sample=True): thresholding with
    # sample_max_value = 1 is exactly that clipping
    clip = dict(thresholding=True, sample_max_value=1.0)
    methods = {
        "DDIM": ("DDIMScheduler", {}),
        "DPM++ 2M": (dpm, dict(solver_order=2, **clip)),
        "DPM++ 3M": (dpm, dict(solver_order=3, **clip)),
        "DPM++ 3M exact": (dpm, dict(solver_order=3, exact_third_order=True, **clip)),
        "DPM++ 2S": ("DPMSolverPlusPlusSinglestepScheduler", dict(solver_order=2, **clip)),
        "DPM++ SDE-2M": (dpm, dict(solver_order=2, algorithm_type="sde-dpmsolver++", **clip)),
    }
    for nfe in nfes:
        for name, (scheduler, kwargs) in methods.items():
            _, fd, spi = run(name, scheduler, kwargs, nfe, 1.0, n)
            res["rows"].append({"method": name, "nfe": nfe, "fd": fd, "s_per_image": spi})
            print(f"  {name:14s} NFE {nfe:3d} FD {fd:.3f}", flush=True)
            if save:
                save(res)
    _, ddpm_fd, spi = run("DDPM", "DDPMScheduler", {}, 1000, 1.0, n)
    res["rows"].append({"method": "DDPM", "nfe": 1000, "fd": ddpm_fd, "s_per_image": spi})
    res["ddpm_fd"] = ddpm_fd
    print(f"  DDPM-1000 FD {ddpm_fd:.3f}", flush=True)
    for name in methods:
        ok = [r["nfe"] for r in res["rows"] if r["method"] == name and r["fd"] <= 1.1 * ddpm_fd]
        res["smallest_nfe_within_10pct_of_ddpm"][name] = min(ok) if ok else None
    if save:
        save(res)
    return res


# ---------------------------------------------------------------------------------------------------- report
# ------------------------------------------------------------------------------------ (d) peer solvers
PEER_NFES = (5, 6, 8, 10, 15, 20, 25)


def _peer_mixture(flow: bool):
    from fastdiff.testing import GaussianMixtureDenoiser

    # not harness: the exact Gaussian-mixture model and its start (an ODE-error measurement, no pipeline)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 0.8
    model = GaussianMixtureDenoiser(means=means, stds=torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64),
                                    prediction_type="flow_prediction" if flow else "epsilon")
    return model, torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)


def _peer_run(sched, model, x_T: torch.Tensor, n: int, mode: str) -> tuple[torch.Tensor, int, float]:
    """The pipeline loop (init_noise_sigma, scale_model_input, model at the scheduler's timestep, step) in
    float32; returns (x, NFE, the starting noise level as a model timestep)."""
    if mode == "flow_sigmas":  # the same shifted grid, passed as sigmas=: fractional timesteps s T
        # not harness: a scheduler copy only to read its sigma grid
        grid = type(sched).from_config(sched.config)
        grid.set_timesteps(n)
        sched.set_timesteps(sigmas=grid.sigmas.double().tolist())
    else:
        sched.set_timesteps(n)
    x = (x_T * getattr(sched, "init_noise_sigma", 1.0)).float()
    for t in sched.timesteps:
        scaled = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # FlowMatch: none
        out = model(scaled, t).sample
        x = sched.step(out, t, x).prev_sample
    if model.prediction_type == "flow_prediction":  # start where the scheduler's sigma says, not its timestep
        start = min(float(sched.sigmas[0]), 1.0 - 1e-6) * model.num_train_timesteps  # sigma = 1: see the note
    else:
        start = float(sched.timesteps[0])
    return x, len(sched.timesteps), start


def bench_peers(nfes=PEER_NFES) -> dict:
    """Error vs NFE of DPM-Solver++ and its peers on exact Gaussian mixtures, float32 as in pipelines: a VP model
    (linear betas, epsilon prediction, every solver on 'trailing' spacing from t = 999 to sigma 0, except the
    use_lu_lambdas row) and a rectified-flow model (velocity prediction, shift 3). Error = max |x_N - exact
    ODE solution to sigma 0 from the same x_T and the solver's first noise level| over 16 samples of 4x4 pixels.
    FlowMatchEuler starts at sigma = 1, where the reference integrator cannot start: its reference starts at
    sigma = 1 - 1e-6 (an O(1e-6) change)."""
    import diffusers

    from fastdiff.schedulers import DPMSolverPlusPlusScheduler

    vp = dict(timestep_spacing="trailing")
    peers_vp = [
        ("fastdiff DPM-Solver++ 2M", lambda: DPMSolverPlusPlusScheduler(solver_order=2, **vp), "steps"),
        ("fastdiff DPM-Solver++ 3M", lambda: DPMSolverPlusPlusScheduler(solver_order=3, **vp), "steps"),
        ("fastdiff DPM-Solver++ 2M use_lu_lambdas", lambda: DPMSolverPlusPlusScheduler(
            solver_order=2, use_lu_lambdas=True), "steps"),
        ("fastdiff DPM-Solver++ 3M exact_third_order", lambda: DPMSolverPlusPlusScheduler(
            solver_order=3, exact_third_order=True, **vp), "steps"),
        ("diffusers DPMSolverMultistep 2M", lambda: diffusers.DPMSolverMultistepScheduler(solver_order=2, **vp),
         "steps"),
        ("diffusers UniPC (bh2, order 2)", lambda: diffusers.UniPCMultistepScheduler(solver_order=2, **vp),
         "steps"),
        ("diffusers UniPC (bh2, order 3)", lambda: diffusers.UniPCMultistepScheduler(solver_order=3, **vp),
         "steps"),
        ("diffusers DEIS (order 3)", lambda: diffusers.DEISMultistepScheduler(solver_order=3, **vp), "steps"),
        ("diffusers DDIM", lambda: diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False, **vp),
         "steps"),
        ("diffusers PNDM (PLMS)", lambda: diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True,
                                                                  **vp), "steps"),
        ("diffusers Euler", lambda: diffusers.EulerDiscreteScheduler(**vp), "steps"),
        ("diffusers Heun", lambda: diffusers.HeunDiscreteScheduler(**vp), "heun"),
        ("diffusers LMS", lambda: diffusers.LMSDiscreteScheduler(**vp), "steps"),
    ]
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    peers_flow = [
        ("fastdiff DPM-Solver++ 2M", lambda: DPMSolverPlusPlusScheduler(solver_order=2, **flow), "steps"),
        ("fastdiff DPM-Solver++ 3M", lambda: DPMSolverPlusPlusScheduler(solver_order=3, **flow), "steps"),
        ("fastdiff DPM-Solver++ 2M, same grid as sigmas=",
         lambda: DPMSolverPlusPlusScheduler(solver_order=2, **flow), "flow_sigmas"),
        ("diffusers DPMSolverMultistep 2M", lambda: diffusers.DPMSolverMultistepScheduler(solver_order=2, **flow),
         "steps"),
        ("diffusers UniPC (bh2, order 2)", lambda: diffusers.UniPCMultistepScheduler(solver_order=2, **flow),
         "steps"),
        ("diffusers FlowMatchEuler", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "steps"),
    ]
    out = {"nfes": list(nfes), "env": _env(), "vp": {}, "flow": {}}
    for kind, peers in (("vp", peers_vp), ("flow", peers_flow)):
        model, x_T = _peer_mixture(kind == "flow")
        refs: dict[float, torch.Tensor] = {}
        for label, make, mode in peers:
            errs, used, starts = [], [], []
            for nfe in nfes:
                n = (nfe + 1) // 2 if mode == "heun" else nfe  # Heun: 2N - 1 evaluations for N steps
                x, calls, t0 = _peer_run(make(), model, x_T, n, mode)
                if t0 not in refs:
                    refs[t0] = model.exact_ode_solution(x_T, t0, None, rtol=1e-11, atol=1e-13)
                errs.append((x.double() - refs[t0]).abs().max().item())
                used.append(calls)
                starts.append(t0)
            out[kind][label] = {"errors": errs, "nfe": used, "start_timestep": starts}
            print(f"  {kind:4s} {label:44s} " + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return out


# ------------------------------------------------------------------- (fd) peers on the reference model: FD vs NFE
FD_NFES = (4, 5, 6, 8, 10)
FD_RUN_ORDER = (4, 6, 10, 5, 8)  # columns that need no new timestep search first (a cut-short run keeps them)
SEARCH_DIR = ROOT / "eval" / "results" / "search"
# recorded 2M searches of eval/bench_search.py (diffusers' DPMSolverMultistepScheduler order 2, same objective):
# K -> (file, key with the timestep-only schedule, what it is)
RECORDED_SCHEDULES = {
    4: ("schedule_k4.json", "timesteps", "bench_search --part reference, 60 evaluations"),
    6: ("schedule_k6.json", "timesteps", "bench_search --part reference, 60 evaluations"),
    10: ("schedule_k10_joint.json", "stage1_timesteps", "bench_search --part joint, stage 1 (timesteps only), "
         "40 evaluations"),
}
FD_HEUN_STEPS = {nfe: (nfe + 1) // 2 for nfe in FD_NFES}  # k steps cost 2k - 1 evaluations: at or below the NFE


def _fd_rows() -> list[tuple[str, str, dict, str]]:
    """(label, scheduler class, scheduler_kwargs over the shipped DDPM config, how the NFE is spent)."""
    return [
        ("fastdiff DPM-Solver++ 2M, uniform", "DPMSolverPlusPlusScheduler", {"solver_order": 2}, "steps"),
        ("fastdiff DPM-Solver++ 2M, searched", "DPMSolverPlusPlusScheduler", {"solver_order": 2}, "searched"),
        ("fastdiff DPM-Solver++ 3M, uniform", "DPMSolverPlusPlusScheduler", {"solver_order": 3}, "steps"),
        ("fastdiff DPM-Solver++ 3M, 2M's searched schedule", "DPMSolverPlusPlusScheduler", {"solver_order": 3},
         "searched"),
        ("diffusers DPM-Solver++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "steps"),
        # bh1's default last step to sigma 0 returns NaN on this config (B_h = -h = -inf times a zero correction
        # at the order-1 final step, diffusers 0.42.1): measured with its only finite final step, sigma_min
        ("diffusers UniPC bh1, final sigma_min", "UniPCMultistepScheduler",
         {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, "steps"),
        ("diffusers UniPC bh2", "UniPCMultistepScheduler", {"solver_type": "bh2"}, "steps"),
        ("diffusers DEIS (order 3)", "DEISMultistepScheduler", {}, "steps"),
        ("diffusers Euler", "EulerDiscreteScheduler", {}, "steps"),
        ("diffusers Heun", "HeunDiscreteScheduler", {}, "heun"),
        ("diffusers DDIM", "DDIMScheduler", {}, "steps"),
    ]


def _shown(path: Path) -> str:
    """`path` as the tables show it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _schedule_file(k: int, out: Path) -> Path | None:
    """A K-step schedule searched by this benchmark: in `out`, else among the recorded results, else None."""
    return next((d / f"schedule_k{k}.json" for d in (out, OUT) if (d / f"schedule_k{k}.json").exists()), None)


def _searched_schedule(k: int, setup, out: Path, log=print) -> tuple[list[int], str]:
    """The 2M-searched K-step schedule: recorded in eval/results/search/ or by this benchmark when there is one,
    else searched now with bench_search's reference settings (saved to `out`/schedule_k{K}.json, resumable)."""
    if k in RECORDED_SCHEDULES:
        name, key, what = RECORDED_SCHEDULES[k]
        ts = json.loads((SEARCH_DIR / name).read_text())[key]
        return [int(t) for t in ts], f"eval/results/search/{name} ({what})"
    what = "searched here with bench_search's reference settings: 200 images at seeds 100000+, 60 evaluations"
    path = _schedule_file(k, out)
    if path is not None:
        ts = json.loads(path.read_text())["timesteps"]
        return [int(t) for t in ts], f"{_shown(path)} ({what})"
    from fastdiff.search import SearchConfig, search_timesteps

    path, checkpoint = out / f"schedule_k{k}.json", out / f".search_k{k}_checkpoint.json"
    pipe, search_obj = setup["search_pipe"], setup["search_obj"]
    t0 = time.perf_counter()
    result = search_timesteps(pipe, k, search_obj, SearchConfig(seed=0, max_evaluations=60, population_size=16,
                                                                num_parents=6), checkpoint=checkpoint)
    result.save(path)
    checkpoint.unlink(missing_ok=True)
    log(f"  searched K={k}: {result.timesteps} in {time.perf_counter() - t0:.0f} s (this session)")
    return [int(t) for t in result.timesteps], f"{_shown(path)} ({what})"


def _fd_setup(n: int) -> dict:
    """bench_search's reference setup: the pipeline with diffusers' 2M (for searches), its search objective, and
    the held-out-seed scorer (seeds 0..n-1, labels i % 10, FD vs the 4,000 training digits, lenet features);
    plus the shipped pipeline, whose DDPM config is every row's base."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_search
    from diffusers import DDPMScheduler

    from fastdiff.models import load_reference_pipeline

    pipe, clf, _, train_images, _, held_images = bench_search._reference(False)
    search_obj, _, vs_train = bench_search._objectives(pipe, clf, train_images, held_images, 200, n, 100_000)
    shipped = load_reference_pipeline()
    shipped.set_progress_bar_config(disable=True)
    assert isinstance(shipped.scheduler, DDPMScheduler), type(shipped.scheduler)
    return {"search_pipe": pipe, "search_obj": search_obj, "scorer": vs_train, "pipe": shipped}


def _fd_cell(setup, spec, n: int, batch: int = 256) -> dict:
    """Images 0..n-1 of `spec` (MethodSpec over the shipped config) at the scorer's seeds (0..n-1), labels i % 10,
    through `sample_images`; FD vs the training digits with bench_search's scorer."""
    from fastdiff.eval import sample_images

    scorer, timesteps = setup["scorer"], []

    def record(pipe, i, t, kwargs):  # the timesteps the method ran (every batch runs the same ones)
        if i == 0:
            timesteps.clear()
        timesteps.append(float(t))
        return kwargs

    samples = sample_images(setup["pipe"], spec, n, base_seed=scorer.seed, batch_size=batch,
                            pipe_kwargs={"callback_on_step_end": record})
    images = samples.images
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    return {"fd": scorer.score_images(images) if bad == 0 else float("nan"), "s_per_image": samples.wall_s / n,
            "nfe": samples.unet_calls / math.ceil(n / batch), "timesteps": timesteps, "nonfinite_images": bad}


def bench_fd_peers(n: int = 4000, nfes=FD_RUN_ORDER, out: Path = OUT, log=print, save=None) -> dict:
    """FD (lenet) vs NFE on the reference model for fastdiff's DPM-Solver++ (uniform and searched schedules) and
    diffusers' few-step schedulers, bench_search's held-out-seed protocol. Cells are appended to
    `out`/fd_cells.jsonl as they finish; a rerun skips the cells already there (same N)."""
    from fastdiff.eval import MethodSpec

    cells_path = out / "fd_cells.jsonl"
    cells = [json.loads(line) for line in cells_path.read_text().splitlines()] if cells_path.exists() else []
    cells = [c for c in cells if c["n"] == n]
    env = {**_env(), "OMP_NUM_THREADS": __import__("os").environ.get("OMP_NUM_THREADS"),
           "platform": platform.platform()}
    res = {"n": n, "nfes": list(FD_NFES), "features": "lenet (shipped digit classifier, 128-d penultimate layer)",
           "reference": "4,000 training digits (bench_search's train reference stats)",
           "images": f"seeds 0..{n - 1} (held out from every search, which used seeds 100000+), labels i % 10, "
                     "guidance 1 (pipeline default), batch 256, output_type='pt'",
           "base_config": "the shipped DDPM config (v_prediction, linear betas, timestep_spacing 'trailing', "
                          "clip_sample true): from_config(shipped, **kwargs) for every row",
           "nfe": "UNet evaluations per image, counted by the harness (sample_images); Heun with k steps costs "
                  "2k - 1: "
                  f"steps {FD_HEUN_STEPS} for the target NFEs (the nearest NFE at or below)",
           "env": env, "schedules": {}, "cells": cells}
    done = {(c["row"], c["target_nfe"]) for c in cells}
    setup = None
    for target in nfes:
        rows = _fd_rows()
        if target not in RECORDED_SCHEDULES and _schedule_file(target, out) is None:
            rows.sort(key=lambda row: row[3] == "searched")  # a new search last: a cut-short run keeps the rest
        for label, scheduler, kwargs, mode in rows:
            if (label, target) in done:
                continue
            setup = setup or _fd_setup(n)
            steps = FD_HEUN_STEPS[target] if mode == "heun" else target
            twin = next((c for c in cells if c["row"] == label and c["steps"] == steps and c.get("timesteps_source")
                         is None and mode == "heun"), None)
            if twin is not None:  # Heun at NFE 5 and 6 is the same 3-step run
                cell = {**twin, "target_nfe": target, "same_run_as_nfe": twin["target_nfe"]}
            else:
                source = None
                if mode == "searched":
                    ts, source = _searched_schedule(target, setup, out, log)
                    res["schedules"][str(target)] = {"timesteps": ts, "source": source}
                    spec = MethodSpec(name=label, scheduler=scheduler, scheduler_kwargs=kwargs, timesteps=ts,
                                      guidance=1.0)
                else:
                    spec = MethodSpec(name=label, scheduler=scheduler, scheduler_kwargs=kwargs, steps=steps,
                                      guidance=1.0)
                cell = {"row": label, "target_nfe": target, "steps": steps, "n": n, "scheduler": scheduler,
                        "scheduler_kwargs": kwargs, "timesteps_source": source, **_fd_cell(setup, spec, n)}
            cells.append(cell)
            with cells_path.open("a") as f:
                f.write(json.dumps(cell) + "\n")
            log(f"  NFE {target:2d} {label:48s} FD {cell['fd']:8.3f}  NFE used {cell['nfe']:.0f}  "
                f"{cell['s_per_image'] * 1e3:.1f} ms/img", flush=True)
            if save:
                save(res)
    for target in FD_NFES:  # the schedule sources, also when every cell came from an earlier run
        if target in RECORDED_SCHEDULES or _schedule_file(target, out) is not None:
            ts, source = _searched_schedule(target, None, out, log)
            res["schedules"][str(target)] = {"timesteps": ts, "source": source}
    return res


def _fd_markdown(fd: dict) -> list[str]:
    rows = [label for label, *_ in _fd_rows()]
    by = {(c["row"], c["target_nfe"]): c for c in fd["cells"]}
    nfes = fd["nfes"]
    lines = ["", "## (fd) Peers on the reference model: FD vs NFE", "",
             f"N = {fd['n']} images per cell: {fd['images']}. FD on {fd['features']} against the {fd['reference']}, "
             "the protocol of eval/results/search/reference.md. Base scheduler config: " + fd["base_config"] + ". "
             + "NFE: " + fd["nfe"] + ". Seconds per image: generation wall time / N, "
             f"{fd['env']['threads']} thread(s) on a CPU shared with another job (comparable within this table only).",
             "", f"Environment: `{json.dumps(fd['env'])}`", "",
             "| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for label in rows:
        cells = []
        for k in nfes:
            c = by.get((label, k))
            if c is None:
                cells.append("not run")
                continue
            used = "" if round(c["nfe"]) == k else f" (NFE {c['nfe']:.0f})"
            cells.append(f"{c['fd']:.3f}{used}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per image (same cells):", "",
              "| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for label in rows:
        cells = [f"{by[(label, k)]['s_per_image']:.4f}" if (label, k) in by else "-" for k in nfes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Searched schedules (DPM-Solver++ 2M searches; the 3M row reuses them unchanged):", ""]
    lines += [f"- K = {k}: {s['timesteps']} from {s['source']}" for k, s in sorted(fd["schedules"].items(),
                                                                                  key=lambda kv: int(kv[0]))]
    lines += ["", "Goal check (best fastdiff row vs best other row at each NFE, lower FD is better):", ""]
    for k in nfes:
        done = [r for r in rows if (r, k) in by and math.isfinite(by[(r, k)]["fd"])]  # NaN rows win nothing
        ours = [(by[(r, k)]["fd"], r) for r in done if r.startswith("fastdiff")]
        peers = [(by[(r, k)]["fd"], r) for r in done if not r.startswith("fastdiff")]
        measured = sum((r, k) in by for r in rows)
        if measured < len(rows) or not ours or not peers:
            lines.append(f"- NFE {k}: incomplete ({measured} of {len(rows)} rows measured): not evaluated")
            continue
        (a, ra), (b, rb) = min(ours), min(peers)
        verdict = "holds" if a < b else f"does NOT hold: {a - b:+.3f} ({a / b:.2f}x)"
        lines.append(f"- NFE {k}: {ra} {a:.3f} vs {rb} {b:.3f}: goal {verdict}")
    if fd.get("notes"):
        lines += ["", "Notes (written by hand after the run; the numbers above are as measured):", ""]
        lines += [f"- {note}" for note in fd["notes"]]
    return lines


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# DPM-Solver++ schedulers: benchmark", "", f"Environment: `{json.dumps(results['env'])}`", ""]
    if "step_time" in results:
        lines += ["## (a) `step()` time vs diffusers (CPU, 20 steps, best of 5; ratio = fastdiff / diffusers)", "",
                  "| config | shape | diffusers ms | fastdiff ms | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {tuple(r['shape'])} | {r['diffusers_ms']:.3f} | {r['fastdiff_ms']:.3f} | "
                  f"{r['ratio']:.2f} |" for r in results["step_time"]]
        lines.append("")
    if "convergence" in results:
        conv = results["convergence"]
        lines += ["## (b) Convergence on the exact Gaussian-mixture denoiser (fp64)", "",
                  f"Uniform log-SNR grid on lambda in {conv['lambda_range']}, N = {conv['steps']}; error = max |x_N - "
                  f"exact ODE solution| (DOP853, rtol 1e-12); slope = {conv['fit']}. Warm = multistep history "
                  "seeded with exact states; cold = plain start (first steps of lower order).", "",
                  "| solver | start | slope | error at N=40 | error at N=320 |", "|---|---|---|---|---|"]
        for label, s in conv["series"].items():
            lines.append(f"| {label.rsplit(' ', 1)[0]} | {'warm' if s['warm'] else 'cold'} | {s['slope']:.2f} | "
                         f"{s['errors'][2]:.2e} | {s['errors'][-1]:.2e} |")
        lines += ["", "![convergence](convergence.png)", ""]
    if "reference" in results:
        ref = results["reference"]
        lines += ["## (c) Reference model: FD vs NFE", "",
                  f"N = {ref['n']} images (labels i % 10, seed = index), features: {ref['features']}; real stats: "
                  f"{ref['real_stats']}; guidance 1 (plain conditional). DDPM-1000 FD = "
                  f"{'not yet measured' if ref['ddpm_fd'] is None else format(ref['ddpm_fd'], '.3f')}.", "",
                  "| method | NFE | FD | s/image |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['nfe']} | {r['fd']:.3f} | {r['s_per_image']:.4f} |" for r in ref["rows"]]
        lines += ["", "Smallest NFE with FD <= 1.1 x DDPM-1000: "
                  + ", ".join(f"{k}: {v}" for k, v in ref["smallest_nfe_within_10pct_of_ddpm"].items()), "",
                  f"### Guided stress test (N = {ref['n_guided']}, class agreement = argmax of the classifier)", "",
                  "| guidance | method | NFE | agreement | FD |", "|---|---|---|---|---|"]
        lines += [f"| {g['guidance']} | {g['method']} | {g['nfe']} | {g['agreement']:.3f} | {g['fd']:.3f} |"
                  for g in ref["guided"]]
    if "peers" in results:
        pe = results["peers"]
        lines += ["", "## (d) Peer solvers on exact Gaussian mixtures (float32, as pipelines run them)", "",
                  "Error = max |x - exact ODE solution to sigma 0| over 16 samples (4x4 pixels, 3 components), "
                  "model called at the scheduler's own timesteps. VP: linear betas, epsilon prediction, 'trailing' "
                  "spacing from t = 999. Flow: rectified-flow path, velocity prediction, shift 3 (DPM-Solver flow "
                  "timesteps are int(sigma T), as in diffusers; the sigmas= row passes the same grid with fractional "
                  "timesteps). The last step to sigma = 0 dominates at these NFEs for the single-jump solvers.", "",
                  f"Environment: `{json.dumps(pe.get('env', results['env']))}`", ""]
        for kind in ("vp", "flow"):
            lines += [f"### {kind.upper()}", "", "| solver | " + " | ".join(f"NFE {n}" for n in pe["nfes"]) + " |",
                      "|---|" + "---|" * len(pe["nfes"])]
            for label, row in pe[kind].items():
                cells = [f"{e:.2e}" + ("" if u == n else f" ({u})") for e, u, n in zip(row["errors"], row["nfe"],
                                                                                     pe["nfes"])]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append("A number in parentheses is the NFE actually used where it differs (PNDM: N + 1; Heun: 2N - 1).")
    if "fd" in results:
        lines += _fd_markdown(results["fd"])
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d,fd")
    p.add_argument("--n", type=int, default=500, help="images per FD point in part c")
    p.add_argument("--n-guided", type=int, default=200, help="images per guided stress-test cell in part c")
    p.add_argument("--nfes", default="5,6,8,10,15,20", help="NFEs of the FD-vs-NFE table in part c")
    p.add_argument("--fd-n", type=int, default=4000, help="images per cell in part fd (same N for every cell)")
    p.add_argument("--fd-nfes", default=",".join(map(str, FD_RUN_ORDER)),
                   help="NFE columns of part fd, in run order (cells already in fd_cells.jsonl are skipped)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (default: the recorded one)")
    args = p.parse_args(argv)
    out = args.out
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if parts & {"a", "b", "c"}:
        results["env"] = _env()
    if "a" in parts:
        print("(a) step() time", flush=True)
        results["step_time"] = bench_step_time()
    if "b" in parts:
        print("(b) convergence", flush=True)
        results["convergence"] = bench_convergence()
        plot_convergence(results["convergence"], out / "convergence.png")
    if "d" in parts:
        print("(d) peer solvers", flush=True)
        results["peers"] = bench_peers()
    if "c" in parts:
        from fastdiff.models.weights import UNET_FILE, WEIGHTS_DIR

        if not (WEIGHTS_DIR / UNET_FILE).exists():
            print(f"(c) skipped: {WEIGHTS_DIR / UNET_FILE} does not exist yet (run `fastdiff train-reference`).")
        else:
            print("(c) reference model", flush=True)
            def save(partial):
                results["reference"] = partial
                path.write_text(json.dumps(results, indent=2) + "\n")
                write_markdown(results, out / "results.md")

            results["reference"] = bench_reference(args.n, tuple(int(v) for v in args.nfes.split(",")),
                                                   n_guided=args.n_guided, save=save)
    if "fd" in parts:
        from fastdiff.models.train import UNET_FILE, WEIGHTS_DIR

        if not (WEIGHTS_DIR / UNET_FILE).exists():
            print(f"(fd) skipped: {WEIGHTS_DIR / UNET_FILE} does not exist yet (run `fastdiff train-reference`).")
        else:
            print("(fd) peers on the reference model", flush=True)
            notes = results.get("fd", {}).get("notes", [])  # hand-written notes survive a rerun

            def save_fd(partial):
                results["fd"] = {**partial, "notes": notes}
                path.write_text(json.dumps(results, indent=2) + "\n")
                write_markdown(results, out / "results.md")

            order = tuple(int(v) for v in args.fd_nfes.split(","))
            save_fd(bench_fd_peers(args.fd_n, order, out, save=save_fd))
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    print(f"wrote {path} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
