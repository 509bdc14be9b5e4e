"""DPM-Solver++ schedulers: step-by-step parity with diffusers, DDIM identity, convergence order, pipelines, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from fastdiff.schedulers import DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestepScheduler
from fastdiff.testing import GaussianMixtureDenoiser

SCHEDULES = ["linspace", "leading", "trailing", "karras", "exponential", "lu", "beta"]
# N = 1, 2, 3 (warm-up, final-step rules, short grids), 8 (lowered last steps below 15), 15 and 25 (no lowering, long
# grids; N = 25 holds the multistep grid's worst cell, N = 15 the singlestep one). Was 1, 2, 3, 5, 10, 15, 25: N = 5
# and 10 took the same N < 15 branches as N = 8 (worst cells 8.9e-7 and 7.0e-7; N = 8: 1.1e-6), and the singlestep
# order lists over these N have the same 42 distinct patterns as before (order-k blocks with every tail, for each
# order, lower_order_final and final sigma type), N = 8 giving the order-3 blocks + [1, 2] tail that N = 5 gave.
STEPS = [1, 2, 3, 8, 15, 25]
# Relative per-step parity with diffusers in float32. Measured: <= 1e-6 in 98% of the grid's cells; the worst,
# 1.9e-6, is sde-dpmsolver++ with beta sigmas at N = 25, where steps near sigma_min have h ~ 1e-3 and diffusers'
# float32 `1 - exp(-2h)` loses digits (fastdiff uses expm1 on float64 coefficients); 3M reaches 1.02e-6.
PARITY_TOL = 2e-6
SCHEDULE_FLAG = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "lu": "use_lu_lambdas",
                 "beta": "use_beta_sigmas"}


def _schedule_kwargs(schedule: str) -> dict:
    return {SCHEDULE_FLAG[schedule]: True} if schedule in SCHEDULE_FLAG else {"timestep_spacing": schedule}


def _model_output(x: torch.Tensor, x0: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """The output a model would give at noise level sigma~ if the clean image were x0 (keeps every x0 bounded)."""
    alpha = 1.0 / math.sqrt(1.0 + sigma**2)
    s = sigma * alpha
    eps = (x - alpha * x0) / s
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - s * x0}[prediction_type]


def _parity(ref, ours, num_steps: int, prediction_type: str, seed: int = 0, shape=(2, 3, 4, 4)) -> float:
    """Teacher-forced step-by-step comparison: both get diffusers' sample and the same model output each step.

    Returns the largest |difference| of any step's output relative to max(1, |output|) * kappa, where
    kappa = max(1, sigma~) over the history a step uses (steps i-2..i) for epsilon / v prediction, 1 for sample
    prediction: the float32 condition number of x0 = (x - sigma eps) / alpha. At sigma~ = 157 (linear betas,
    t = 999) one ulp of alpha or sigma moves x0 by ~1e-5 in any float32 implementation, diffusers' included."""
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    assert torch.equal(ref.timesteps, ours.timesteps), (ref.timesteps, ours.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sde = ref.config.algorithm_type == "sde-dpmsolver++"
    single = isinstance(ref, DPMSolverSinglestepScheduler)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        x0 = torch.tanh(torch.randn(shape, generator=g))
        out = _model_output(x, x0, float(ref.sigmas[i]), prediction_type)
        kw_ref, kw_ours = {}, {}
        if sde and single:  # diffusers' singlestep draws its noise from the generator: give both the same seed
            kw_ref["generator"] = torch.Generator().manual_seed(i)
            kw_ours["generator"] = torch.Generator().manual_seed(i)
        elif sde:
            z = torch.randn(shape, generator=g)
            kw_ref["variance_noise"] = kw_ours["variance_noise"] = z
        y_ref = ref.step(out, t, x, **kw_ref).prev_sample
        y_ours = ours.step(out, t, x, **kw_ours).prev_sample
        assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
        kappa = 1.0 if prediction_type == "sample" else max(1.0, float(ref.sigmas[max(0, i - 2): i + 1].max()))
        worst = max(worst, ((y_ours - y_ref).abs().max() / y_ref.abs().max().clamp(min=1.0)).item() / kappa)
        x = y_ref
    return worst


# ------------------------------------------------------------------------------------------ parity: multistep
# diffusers' 3rd-order SDE weight is not the Taylor one (see test_update_is_exact_on_polynomials): not compared
@pytest.mark.parametrize("algorithm_type,order", [("dpmsolver++", 1), ("dpmsolver++", 2), ("dpmsolver++", 3),
                                                  ("sde-dpmsolver++", 1), ("sde-dpmsolver++", 2)])
def test_multistep_matches_diffusers_over_grid(order, algorithm_type):
    """Every solver type x schedule x final sigma type x lower_order_final x N, <= 1e-6 relative.

    x0 ("sample") prediction isolates the solver arithmetic; the conversions are checked in the next test."""
    worst, where = 0.0, None
    for solver_type, schedule, final, lof in itertools.product(
        ["midpoint", "heun"] if order > 1 else ["midpoint"], SCHEDULES, ["zero", "sigma_min"], [True, False]
    ):
        cfg = dict(solver_order=order, algorithm_type=algorithm_type, solver_type=solver_type,
                   final_sigmas_type=final, lower_order_final=lof, **_schedule_kwargs(schedule))
        cfg["prediction_type"] = "sample"
        # one instance of each for every N: set_timesteps must reset all step state (diffusers' multistep one resets
        # model_outputs, lower_order_nums and the step index, and leaves its config alone)
        ref, ours = DPMSolverMultistepScheduler(**cfg), DPMSolverPlusPlusScheduler(**cfg)
        for n in STEPS:
            if not lof and n >= 15:
                continue  # lower_order_final only acts below 15 steps
            err = _parity(ref, ours, n, "sample")
            if err > worst:
                worst, where = err, (cfg, n)
    assert worst <= PARITY_TOL, where


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_multistep_prediction_types_and_thresholding_match_diffusers(prediction_type):
    worst, where = 0.0, None
    for order, alg, thr, schedule in itertools.product(
        [1, 2, 3], ["dpmsolver++", "sde-dpmsolver++"], [False, True], ["linspace", "karras"]
    ):
        if alg == "sde-dpmsolver++" and order == 3:
            continue
        cfg = dict(solver_order=order, algorithm_type=alg, prediction_type=prediction_type, thresholding=thr,
                   sample_max_value=1.5, dynamic_thresholding_ratio=0.9, beta_schedule="scaled_linear",
                   beta_start=0.00085, beta_end=0.012, **_schedule_kwargs(schedule))
        ref, ours = DPMSolverMultistepScheduler(**cfg), DPMSolverPlusPlusScheduler(**cfg)  # reused over N, as above
        for n in (5, 10, 25):
            err = _parity(ref, ours, n, prediction_type)
            if err > worst:
                worst, where = err, (cfg, n)
    assert worst <= PARITY_TOL, where


def test_multistep_custom_timesteps_and_cosine_clipping_match_diffusers():
    ts = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    for order in (1, 2, 3):
        ref, ours = DPMSolverMultistepScheduler(solver_order=order), DPMSolverPlusPlusScheduler(solver_order=order)
        ref.set_timesteps(timesteps=ts)
        ours.set_timesteps(timesteps=ts)
        assert torch.equal(ref.timesteps, ours.timesteps)
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
    cfg = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3)
    assert _parity(DPMSolverMultistepScheduler(**cfg), DPMSolverPlusPlusScheduler(**cfg), 10, "epsilon") <= PARITY_TOL


# ----------------------------------------------------------------------------------------- parity: singlestep
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_matches_diffusers_over_grid(order):
    worst, where = 0.0, None
    for alg, solver_type, schedule, final, lof in itertools.product(
        ["dpmsolver++", "sde-dpmsolver++"], ["midpoint", "heun"] if order > 1 else ["midpoint"],
        ["linspace", "karras", "exponential"], ["zero", "sigma_min"], [True, False],
    ):
        if alg == "sde-dpmsolver++" and order == 3 and solver_type == "heun":
            continue  # diffusers' D2 weight differs there, as in the multistep case
        cfg = dict(solver_order=order, algorithm_type=alg, solver_type=solver_type, final_sigmas_type=final,
                   lower_order_final=lof, prediction_type="sample",
                   **({} if schedule == "linspace" else _schedule_kwargs(schedule)))
        ours = DPMSolverPlusPlusSinglestepScheduler(**cfg)  # one instance for every N
        for n in STEPS:
            ref = DPMSolverSinglestepScheduler(**cfg)  # fresh: diffusers' set_timesteps may rewrite its config
            err = _parity(ref, ours, n, "sample")
            assert ours.order_list == ref.order_list
            if err > worst:
                worst, where = err, (cfg, n)
    assert worst <= PARITY_TOL, where


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_singlestep_prediction_types_match_diffusers(prediction_type):
    for order, n in itertools.product([2, 3], [6, 10]):
        cfg = dict(solver_order=order, prediction_type=prediction_type, thresholding=True, sample_max_value=1.5)
        err = _parity(DPMSolverSinglestepScheduler(**cfg), DPMSolverPlusPlusSinglestepScheduler(**cfg), n,
                      prediction_type)
        assert err <= PARITY_TOL


# --------------------------------------------------------------------------------------------- DDIM identity
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_first_order_equals_ddim(final):
    """Order-1 DPM-Solver++ is DDIM with eta = 0 (Lu et al. 2022, Sec. 4): same grid, same final alpha_bar."""
    ddim = DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=final == "zero")
    ours = DPMSolverPlusPlusScheduler(solver_order=1, timestep_spacing="trailing", final_sigmas_type=final)
    ddim.set_timesteps(10)
    ours.set_timesteps(10)
    assert torch.equal(ddim.timesteps, ours.timesteps)
    model = GaussianMixtureDenoiser(means=torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5,
                                    stds=torch.tensor([0.2, 0.4]), alphas_cumprod=ddim.alphas_cumprod)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    a = b = x
    for t in ddim.timesteps:
        a = ddim.step(model(a, t).sample, t, a, eta=0.0).prev_sample
        b = ours.step(model(b, t).sample, t, b).prev_sample
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ order of convergence
def _t_of_sigma(model: GaussianMixtureDenoiser, sigma: float) -> float:
    """Fractional timestep at which the model's (linearly interpolated) alpha_bar gives sigma~ exactly."""
    target, ac = 1.0 / (1.0 + sigma * sigma), model.alphas_cumprod.numpy()
    k = int(np.clip(np.searchsorted(-ac, -target, side="right") - 1, 0, len(ac) - 2))
    return k + (ac[k] - target) / (ac[k] - ac[k + 1])


def _ode_error(model, x_T, reference, order: int, n: int, warm: bool, lam=(-2.5, 2.5), **config) -> float:
    sigmas = np.exp(-np.linspace(lam[0], lam[1], n + 1))  # uniform log-SNR grid, h = (lam1 - lam0) / n
    sched = DPMSolverPlusPlusScheduler(solver_order=order, lower_order_final=False, **config)
    sched.set_timesteps(sigmas=sigmas)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        t_model = _t_of_sigma(model, sigmas[i])
        x_next = sched.step(model(x, torch.tensor(t_model, dtype=torch.float64)).sample, t, x).prev_sample
        if warm and i < order - 1:  # seed the multistep history with exact states
            x_next = model.exact_ode_solution(x, t_model, _t_of_sigma(model, sigmas[i + 1]), rtol=1e-12, atol=1e-14)
        x = x_next
    return (x - reference).abs().max().item()


def test_convergence_order_on_gaussian_mixture():
    """fp64, exact-state warm start: log error vs log h has slope ~1, 2, 3 (+-0.25) for orders 1, 2, 3."""
    g = torch.Generator().manual_seed(0)
    ac = DPMSolverPlusPlusScheduler().alphas_cumprod.double()
    model = GaussianMixtureDenoiser(means=torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * 0.8,
                                    stds=torch.tensor([0.3, 0.5, 0.4]), alphas_cumprod=ac)
    x_T = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    lam = (-2.5, 2.5)
    t0, t1 = _t_of_sigma(model, math.exp(-lam[0])), _t_of_sigma(model, math.exp(-lam[1]))
    reference = model.exact_ode_solution(x_T, t0, t1, rtol=1e-12, atol=1e-14)
    # N = 40, 80, 160 (was up to 320): slopes 0.999, 2.000, 3.032 (were 0.999, 2.000, 3.023); a method one order
    # too low is off by ~1. Diffusers' w = 1 below: 2.025 at N = 80 -> 160 (2.010 at 160 -> 320).
    steps = np.array([40, 80, 160])
    for order in (1, 2, 3):
        errs = [_ode_error(model, x_T, reference, order, n, warm=True, lam=lam, exact_third_order=True) for n in steps]
        slope = np.polyfit(np.log((lam[1] - lam[0]) / steps), np.log(errs), 1)[0]
        assert abs(slope - order) <= 0.25, (order, slope, errs)
    # diffusers' 3M weight (w = 1 on D2) is second order only: its error is larger at every N and falls like h^2
    errs_w1 = [_ode_error(model, x_T, reference, 3, n, warm=True, lam=lam) for n in steps[-2:]]
    assert abs(math.log(errs_w1[0] / errs_w1[1]) / math.log(2) - 2) <= 0.25


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_update_is_exact_on_polynomials(order, algorithm_type):
    """An order-k step integrates the linear part exactly and is exact when x0(lambda) is a polynomial of degree
    k - 1 (Taylor in lambda, paper Eq. 9; the "heun" second-order form is the Taylor one, "midpoint" is not exact on
    lines); reference by scipy quadrature of the exact solution (noise = 0)."""
    from scipy.integrate import quad

    coef = [0.4, -0.7, 0.3][:order]  # x0(lambda) = sum c_k (lambda - lambda_s0)^k
    sigmas = np.array([3.0, 1.7, 0.9, 0.45, 0.2])
    sched = DPMSolverPlusPlusScheduler(solver_order=order, prediction_type="sample", algorithm_type=algorithm_type,
                                       lower_order_final=False, exact_third_order=True, solver_type="heun")
    sched.set_timesteps(sigmas=sigmas)
    lam = -np.log(sigmas)
    x = torch.full((1, 1, 1, 1), 0.8, dtype=torch.float64)
    zero = torch.zeros_like(x)
    for i, t in enumerate(sched.timesteps):
        if i == order - 1:  # history is full: check this step
            l0, lt = lam[i], lam[i + 1]
            x0 = lambda lm, l0=l0: sum(c * (lm - l0) ** k for k, c in enumerate(coef))  # noqa: E731
            a_t, s_t, s_0 = 1 / math.sqrt(1 + sigmas[i + 1] ** 2), sigmas[i + 1] / math.sqrt(1 + sigmas[i + 1] ** 2), \
                sigmas[i] / math.sqrt(1 + sigmas[i] ** 2)
            if algorithm_type == "dpmsolver++":  # x_t = s_t/s_0 x + a_t int e^{-(lt - l)} x0(l) dl
                want = s_t / s_0 * 0.8 + a_t * quad(lambda lm, lt=lt, x0=x0: math.exp(-(lt - lm)) * x0(lm), l0, lt)[0]
            else:  # x_t = s_t/s_0 e^{-h} x + 2 a_t int e^{-2(lt - l)} x0(l) dl (+ noise)
                want = s_t / s_0 * math.exp(-(lt - l0)) * 0.8 + 2 * a_t * quad(
                    lambda lm, lt=lt, x0=x0: math.exp(-2 * (lt - lm)) * x0(lm), l0, lt)[0]
        out = torch.full_like(x, sum(c * (lam[i] - lam[order - 1]) ** k for k, c in enumerate(coef)))
        y = sched.step(out, t, x, variance_noise=zero).prev_sample
        if i == order - 1:
            assert abs(y.item() - want) < 1e-12, (y.item(), want)
            break
        x = torch.full_like(x, 0.8) if i + 1 == order - 1 else y


# ------------------------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("order,n,expected", [
    (2, 10, [1, 2, 2, 2, 2, 2, 2, 2, 2, 1]),
    (3, 10, [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]),
    (3, 20, [1, 2] + [3] * 17 + [1]),
])
def test_orders_used_per_step(order, n, expected, monkeypatch):
    sched = DPMSolverPlusPlusScheduler(solver_order=order)
    sched.set_timesteps(n)
    used = []
    original = sched._update
    monkeypatch.setattr(sched, "_update", lambda x, k, noise: used.append(k) or original(x, k, noise))
    x = torch.randn(1, 1, 2, 2)
    last_x0 = None
    for t in sched.timesteps:
        out = torch.randn_like(x)
        last_x0 = sched.convert_model_output(out, sample=x) if sched.step_index is not None else None
        x = sched.step(out, t, x).prev_sample
        if last_x0 is None:
            continue
    assert used == expected
    # final sigma 0: the last step returns the last data prediction exactly
    sched.set_timesteps(n)
    x = torch.randn(1, 1, 2, 2)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn_like(x)
        if i == n - 1:
            sched._step_index = i
            want = sched.convert_model_output(out, sample=x)
        x = sched.step(out, t, x).prev_sample
    torch.testing.assert_close(x, want, atol=0, rtol=0)


def test_thresholding_with_max_one_is_clipping_and_keeps_fp16():
    sched = DPMSolverPlusPlusScheduler(prediction_type="sample", thresholding=True, sample_max_value=1.0)
    sched.set_timesteps(5)
    sched._step_index = 0
    x0 = torch.randn(3, 2, 4, 4) * 3
    torch.testing.assert_close(sched.convert_model_output(x0, sample=x0), x0.clamp(-1, 1), atol=0, rtol=0)
    sched.set_timesteps(5)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float16)
    for t in sched.timesteps:
        x = sched.step(torch.randn_like(x), t, x).prev_sample
        assert x.dtype == torch.float16
    assert x.abs().max() <= 1.0


def test_add_noise_and_begin_index_match_diffusers():
    ref, ours = DPMSolverMultistepScheduler(use_karras_sigmas=True), DPMSolverPlusPlusScheduler(use_karras_sigmas=True)
    for s in (ref, ours):
        s.set_timesteps(20)
        s.set_begin_index(8)
    x0, noise = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = ref.timesteps[8:9].repeat(2)
    a, b = ref.add_noise(x0, noise, t), ours.add_noise(x0, noise, t)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    for t in ref.timesteps[8:]:
        out = torch.randn_like(a)
        a, b = ref.step(out, t, a).prev_sample, ours.step(out, t, a).prev_sample
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- config round trips
def test_from_config_swaps_both_ways_and_save_load(tmp_path):
    """Mirrors diffusers' test_switch: PNDM config -> fastdiff -> diffusers schedulers -> back, same outputs."""
    def run(sched, n=10):
        sched.set_timesteps(n)
        x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 96 - 0.5
        for t in sched.timesteps:
            x = sched.step(x * t / (t + 1), t, x).prev_sample  # diffusers' dummy model
        return x

    base = DPMSolverPlusPlusScheduler.from_config(PNDMScheduler().config)
    want = run(DPMSolverMultistepScheduler.from_config(PNDMScheduler().config))
    torch.testing.assert_close(run(base), want, atol=1e-5, rtol=1e-5)
    chain = base
    for cls in (DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler,
                DPMSolverMultistepScheduler, DPMSolverPlusPlusSinglestepScheduler, DPMSolverPlusPlusScheduler):
        chain = cls.from_config(chain.config)
    assert chain.config.algorithm_type == "dpmsolver++" and chain.config.solver_type == "midpoint"
    torch.testing.assert_close(run(chain), want, atol=1e-5, rtol=1e-5)
    back = DPMSolverMultistepScheduler.from_config(base.config)
    torch.testing.assert_close(run(back), want, atol=1e-5, rtol=1e-5)
    base.save_config(tmp_path)
    torch.testing.assert_close(run(DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)), want, atol=1e-5, rtol=1e-5)
    assert "DPMSolverMultistepScheduler" in [c.__name__ for c in base.compatibles]
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(variance_type="fixed_small", clip_sample=True)  # DDPM-only values in shared keys
    torch.testing.assert_close(run(DPMSolverPlusPlusScheduler.from_config(ddpm.config)),
                               run(DPMSolverMultistepScheduler.from_config(ddpm.config)), atol=1e-5, rtol=1e-5)
    ss = DPMSolverPlusPlusSinglestepScheduler.from_config(DPMSolverSinglestepScheduler(solver_order=3).config)
    ref = DPMSolverSinglestepScheduler.from_config(ss.config)
    torch.testing.assert_close(run(ss, 9), run(ref, 9), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,call,match", [
    ({}, dict(timesteps=[500, 700, 100]), "descending"),
    ({}, dict(timesteps=[700, 500, 500]), "duplicates"),
    ({}, dict(timesteps=[1000, 500]), r"\[0, 999\]"),
    ({}, dict(timesteps=[500, -1]), r"\[0, 999\]"),
    ({}, dict(timesteps=[500.5, 100]), "integers"),
    ({}, dict(timesteps=[999, 500], sigmas=[10.0, 1.0, 0.0]), "exactly one"),
    ({}, dict(num_inference_steps=10, timesteps=[999, 500]), "exactly one"),
    ({}, dict(sigmas=[1.0, 10.0, 0.0]), "descending"),
    ({}, dict(sigmas=[10.0, 0.0, 0.0]), "descending"),
    ({}, dict(sigmas=[10.0, -1.0]), "positive"),
    ({"use_karras_sigmas": True}, dict(sigmas=[10.0, 1.0, 0.0]), "use_karras_sigmas"),
    ({"use_lu_lambdas": True}, dict(timesteps=[999, 500]), "use_lu_lambdas"),
])
def test_bad_set_timesteps_inputs_raise(kwargs, call, match):
    for cls in (DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestepScheduler):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs).set_timesteps(**call)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver_order=4), "solver_order"),
    (dict(algorithm_type="dpmsolver"), "dpmsolver\\+\\+"),
    (dict(solver_type="taylor"), "solver_type"),
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(final_sigmas_type="one"), "final_sigmas_type"),
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
    (dict(use_karras_sigmas=True, use_lu_lambdas=True), "at most one"),
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(use_flow_sigmas=True, use_lu_lambdas=True), "use_lu_lambdas=False"),
])
def test_bad_config_raises(kwargs, match):
    for cls in (DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestepScheduler):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_step_before_set_timesteps_raises():
    with pytest.raises(ValueError, match="set_timesteps"):
        DPMSolverPlusPlusScheduler().step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("which", ["sd", "sdxl", "controlnet"])
def test_swap_into_tiny_pipelines_matches_diffusers(which, tmp_path):
    from fastdiff.testing import tiny_controlnet_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

    pipe = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "controlnet": tiny_controlnet_pipeline}[which]()
    # 32x32 images (16x16 latents): the same scheduler calls as 64x64 at a quarter of the UNet / VAE cost
    cond = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    extra = {"image": cond} if which == "controlnet" else {}
    def images(**kw):
        return pipe("a red cube", height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0),
                    **extra, **kw).images

    config = pipe.scheduler.config
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    want = images(num_inference_steps=4)
    want_ts = images(timesteps=[999, 736, 455, 124])
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(config)
    np.testing.assert_allclose(images(num_inference_steps=4), want, atol=1e-4)
    np.testing.assert_allclose(images(timesteps=[999, 736, 455, 124]), want_ts, atol=1e-4)
    # sigmas= (diffusers' DPM schedulers lack it): the sigma~ of those timesteps + 0 give the same grid
    s = pipe.scheduler._train_sigma
    np.testing.assert_allclose(images(sigmas=[*s[[999, 736, 455, 124]], 0.0]), want_ts, atol=1e-3)
    pipe.scheduler = DPMSolverPlusPlusSinglestepScheduler.from_config(config)
    assert np.isfinite(images(num_inference_steps=4)).all()
    if which == "sd":  # save_pretrained / from_pretrained keeps the fastdiff scheduler and its config
        pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(config, solver_order=3)
        pipe.save_pretrained(tmp_path)
        loaded = type(pipe).from_pretrained(tmp_path)
        assert type(loaded.scheduler) is DPMSolverPlusPlusScheduler and loaded.scheduler.config.solver_order == 3
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.scheduler.config) == public(pipe.scheduler.config)


def test_swap_into_reference_pipeline():
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    pipe = ReferencePipeline(unet=build_reference_unet(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, thresholding=True)
    kw = dict(class_labels=[3, 7], guidance_scale=3.0, num_inference_steps=5, output_type="pt")
    want = pipe(**kw, generator=gens()).images
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
    got = pipe(**kw, generator=gens()).images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
