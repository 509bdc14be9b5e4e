"""DPM-Solver++ config handling: saved configs of every diffusers scheduler family load exactly as diffusers' own
DPM-Solver schedulers load them (same grid, same steps, or the same refusal), and edge-case grids stay finite."""

from __future__ import annotations

import itertools
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from diffusers.utils import logging as diffusers_logging

from fastdiff.schedulers import DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestepScheduler

SOURCES = [
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "FlowMatchEulerDiscreteScheduler",
]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Non-default source configs, on top of each class's defaults (keys the class does not take are left out).
VARIANTS = {
    "DDIMScheduler": [dict(**SD, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
                      dict(thresholding=True, sample_max_value=0.5, dynamic_thresholding_ratio=0.0)],
    "DDPMScheduler": [dict(variance_type="fixed_small", clip_sample=True, thresholding=True, sample_max_value=0.8)],
    "PNDMScheduler": [dict(**SD, skip_prk_steps=True, steps_offset=1)],
    "EulerDiscreteScheduler": [dict(**SD, use_karras_sigmas=True, prediction_type="v_prediction"),
                               dict(timestep_spacing="trailing", rescale_betas_zero_snr=True)],
    "UniPCMultistepScheduler": [dict(solver_type="bh1", solver_order=3), dict(use_karras_sigmas=True)],
    "DEISMultistepScheduler": [dict(solver_order=3)],
    "DPMSolverMultistepScheduler": [dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")],
    "DPMSolverSinglestepScheduler": [dict(solver_order=3, use_exponential_sigmas=True)],
    "FlowMatchEulerDiscreteScheduler": [dict(shift=3.0, use_dynamic_shifting=True)],
}
# x0 = (x - sigma eps) / alpha amplifies float32 rounding by sigma~ (157 at t = 999 for linear betas) in any
# implementation; the comparison is relative to max(1, |x|) and scaled by that condition number, as in
# tests/test_schedulers.py. Measured worst: see the docstring of test_saved_configs_load_like_diffusers.
TOL = 1e-6
# Zero terminal SNR (sigma~ = 4096 at t = 999): diffusers' float32 log-SNR differences lose digits. Measured at
# N = 25 on x0 outputs: diffusers vs a float64 evaluation 1.75e-6, fastdiff (float64 coefficients) vs it 1.1e-7.
TOL_ZERO_SNR = 5e-6


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # unknown-key and lower_order_final warnings of the swaps
    yield
    diffusers_logging.set_verbosity(level)


def _cases():
    for name in SOURCES:
        yield name, {}
        for extra in VARIANTS.get(name, []):
            yield name, extra


def _saved_config(name: str, extra: dict, tmp_path) -> dict:
    cls = getattr(diffusers, name)
    cls(**extra).save_config(tmp_path)
    return cls.load_config(tmp_path)


def _build(cls, config: dict, **overrides):
    try:
        return cls.from_config(config, **overrides), None
    except (ValueError, NotImplementedError) as err:
        return None, err


def _model_output(x: torch.Tensor, x0: torch.Tensor, alpha: float, sigma: float, prediction_type: str):
    eps = (x - alpha * x0) / sigma
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0,
            "flow_prediction": eps - x0}[prediction_type]


def run_side_by_side(ref, ours, num_steps: int, seed: int = 0, shape=(2, 4, 4, 4), **set_kw) -> float:
    """Teacher-forced step-by-step comparison on identical model outputs; returns the worst relative difference
    (|diff| / max(1, |ref|), divided by max(1, sigma~) over the steps' history for epsilon / v prediction)."""
    ref.set_timesteps(num_steps, **set_kw)
    ours.set_timesteps(num_steps, **set_kw)
    assert torch.equal(ref.timesteps, ours.timesteps), (ref.timesteps, ours.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
    flow = bool(ref.config.use_flow_sigmas)
    pred = ref.config.prediction_type
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sde = ref.config.algorithm_type == "sde-dpmsolver++"
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        s = float(ref.sigmas[i])
        alpha, sigma = (1.0 - s, s) if flow else (1.0 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s))
        out = _model_output(x, torch.tanh(torch.randn(shape, generator=g)), alpha, sigma, pred)
        kw = {}
        if sde:
            kw["variance_noise"] = torch.randn(shape, generator=g)
        y_ref = ref.step(out, t, x, **kw).prev_sample
        y_ours = ours.step(out, t, x, **kw).prev_sample
        assert torch.isfinite(y_ref).all() and torch.isfinite(y_ours).all()
        hist = ref.sigmas[max(0, i - 2): i + 1]
        kappa = 1.0 if pred == "sample" or flow else max(1.0, float(hist.max()))
        worst = max(worst, ((y_ours - y_ref).abs().max() / y_ref.abs().max().clamp(min=1.0)).item() / kappa)
        x = y_ref
    return worst


# ---------------------------------------------------------------------------------- saved configs, every family
@pytest.mark.parametrize("name,extra", list(_cases()), ids=lambda v: v if isinstance(v, str) else str(sorted(v)))
def test_saved_configs_load_like_diffusers(name, extra, tmp_path):
    """save_config -> load_config -> from_config into diffusers' DPMSolverMultistepScheduler and into fastdiff's:
    the same refusal, or the same timesteps and steps (<= 1e-6 relative, measured worst 8.9e-7; zero terminal
    SNR: 3.3e-6)."""
    config = _saved_config(name, extra, tmp_path)
    ref, ref_err = _build(DPMSolverMultistepScheduler, config)
    ours, our_err = _build(DPMSolverPlusPlusScheduler, config)
    if ref_err is not None:  # diffusers refuses: so must fastdiff, with a ValueError on the same key
        assert isinstance(our_err, ValueError), (name, ref_err, our_err)
        assert "final_sigmas_type" in str(ref_err) and "final_sigmas_type" in str(our_err)
        return
    if config.get("algorithm_type") == "dpmsolver":  # DPM-Solver (not ++): fastdiff refuses it, by design
        assert isinstance(our_err, ValueError) and "dpmsolver++" in str(our_err)
        return
    assert our_err is None, (name, our_err)
    for key in ("algorithm_type", "solver_type", "prediction_type", "timestep_spacing", "steps_offset",
                "beta_schedule", "thresholding", "sample_max_value", "use_karras_sigmas", "final_sigmas_type"):
        assert ours.config[key] == ref.config[key], key
    for n in (1, 4, 10, 25):
        ref, ours = DPMSolverMultistepScheduler.from_config(config), DPMSolverPlusPlusScheduler.from_config(config)
        tol = TOL_ZERO_SNR if config.get("rescale_betas_zero_snr") else TOL
        assert run_side_by_side(ref, ours, n) <= tol, (name, extra, n)


def test_deis_config_refused_like_diffusers_and_override_works(tmp_path):
    config = _saved_config("DEISMultistepScheduler", {}, tmp_path)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverMultistepScheduler.from_config(config)
    with pytest.raises(ValueError, match="sigma_min"):
        DPMSolverPlusPlusScheduler.from_config(config)
    for kw in (dict(final_sigmas_type="sigma_min"), dict(algorithm_type="dpmsolver++")):
        ref, ours = DPMSolverMultistepScheduler.from_config(config, **kw), DPMSolverPlusPlusScheduler.from_config(
            config, **kw)
        assert ours.config.algorithm_type == "dpmsolver++" and ours.config.solver_type == "midpoint"
        assert run_side_by_side(ref, ours, 10) <= TOL


def test_unipc_config_swap_in_tiny_sd_pipeline(tmp_path):
    """A saved UniPC config (solver_type='bh2') swapped into the tiny SD pipeline: fastdiff's image equals the one
    with diffusers' DPMSolverMultistepScheduler swapped in the same way."""
    from diffusers import UniPCMultistepScheduler

    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    UniPCMultistepScheduler.from_config(pipe.scheduler.config).save_config(tmp_path)
    config = UniPCMultistepScheduler.load_config(tmp_path)
    assert config["solver_type"] == "bh2"

    def image():  # 32x32 images (16x16 latents): the same scheduler calls as 64x64, a quarter of the UNet cost
        return pipe("a red cube", height=32, width=32, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    want = image()
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(config)
    assert pipe.scheduler.config.solver_type == "midpoint"
    np.testing.assert_allclose(image(), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("cls", [DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestepScheduler])
@pytest.mark.parametrize("order", [2, 3])
def test_as_many_steps_as_training_steps_is_finite(cls, order):
    """N = num_train_timesteps with linspace spacing rounds two grid points onto one timestep; diffusers keeps both
    (a zero-length step: h = 0). fastdiff keeps each timestep once: diffusers' distinct timesteps, in order."""
    ref = DPMSolverMultistepScheduler()
    ref.set_timesteps(1000)
    distinct = [t for i, t in enumerate(ref.timesteps.tolist()) if t not in ref.timesteps.tolist()[:i]]
    assert len(distinct) < 1000  # the duplicate is real
    sched = cls(solver_order=order)
    sched.set_timesteps(1000)
    assert sched.timesteps.tolist() == distinct
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(torch.randn(x.shape, generator=g), t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("single", [False, True])
def test_sigma_schedule_timesteps_equal_diffusers(single):
    """karras / exponential / beta / lu timesteps for N = 1..29 under four training schedules, including the ends
    of the range where float32 log-sigmas decide between 998 and 999."""
    ref_cls, our_cls = ((DPMSolverSinglestepScheduler, DPMSolverPlusPlusSinglestepScheduler) if single else
                        (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler))
    betas = [{}, SD, dict(beta_schedule="squaredcos_cap_v2")] + ([] if single else [dict(**SD,
                                                                                      rescale_betas_zero_snr=True)])
    flags = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"] + ([] if single else ["use_lu_lambdas"])
    for beta, flag in itertools.product(betas, flags):
        # one instance of each for every N: both recompute the grid from alphas_cumprod and the config in
        # set_timesteps (diffusers' singlestep only ever flips lower_order_final there, which the grid does not read)
        ref, ours = ref_cls(**beta, **{flag: True}), our_cls(**beta, **{flag: True})
        for n in range(1, 30):
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            assert torch.equal(ref.timesteps, ours.timesteps), (beta, flag, n, ref.timesteps, ours.timesteps)


def test_thresholding_values_diffusers_accepts():
    """sample_max_value < 1 (a hard clip at that value, rescaled) and dynamic_thresholding_ratio = 0 load and step
    as in diffusers; a non-positive sample_max_value (diffusers: division by zero) is refused."""
    for kw in (dict(sample_max_value=0.5), dict(dynamic_thresholding_ratio=0.0), dict(dynamic_thresholding_ratio=1.0,
                                                                                      sample_max_value=2.0)):
        cfg = dict(thresholding=True, prediction_type="sample", **kw)
        assert run_side_by_side(DPMSolverMultistepScheduler(**cfg), DPMSolverPlusPlusScheduler(**cfg), 10) <= TOL
    with pytest.raises(ValueError, match="sample_max_value"):
        DPMSolverPlusPlusScheduler(thresholding=True, sample_max_value=0.0)
