"""Pure schedule functions and the schedule JSON format, checked against diffusers' own schedulers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from fastdiff.schedulers import load_schedule, save_schedule, schedules


@pytest.mark.parametrize("spacing,expected", [
    ("linspace", [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]),
    ("leading", [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]),
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
])
def test_spacings_n10(spacing, expected):
    offset = 1 if spacing == "leading" else 0
    assert schedules.spaced_timesteps(10, 1000, spacing, steps_offset=offset).tolist() == expected


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 25, 50])
def test_spacings_match_diffusers(spacing, n):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(n)
    assert schedules.spaced_timesteps(n, 1000, spacing, steps_offset=1).tolist() == ref.timesteps.tolist()


def test_karras_endpoints_for_sd_and_uniform_logsnr():
    betas = schedules.make_betas(1000, 0.00085, 0.012, "scaled_linear")
    train = schedules.train_sigmas(torch.cumprod(1 - betas, 0))
    s = schedules.karras_sigmas(train[0], train[-1], 10)
    assert s[0] == pytest.approx(14.6146, abs=1e-3) and s[-1] == pytest.approx(0.0292, abs=1e-4)
    assert np.all(np.diff(s) < 0)
    lam = -np.log(schedules.uniform_logsnr_sigmas(train[0], train[-1], 12))
    np.testing.assert_allclose(np.diff(lam), np.full(11, (lam[-1] - lam[0]) / 11), rtol=1e-12)
    np.testing.assert_allclose(schedules.exponential_sigmas(0.1, 10.0, 3), [10.0, 1.0, 0.1], rtol=1e-12)


def test_ays_timesteps_give_published_sigmas():
    """SD's scaled-linear sigma~ at the Align-Your-Steps timesteps reproduces diffusers' AysSchedules sigmas."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    betas = schedules.make_betas(1000, 0.00085, 0.012, "scaled_linear")
    train = schedules.train_sigmas(torch.cumprod(1 - betas, 0))
    got = schedules.timesteps_to_sigmas(AysSchedules["StableDiffusionTimesteps"], train)
    np.testing.assert_allclose(got, AysSchedules["StableDiffusionSigmas"][:-1], atol=3e-3)


def test_sigma_to_timestep_matches_diffusers_and_inverts():
    ref = EulerDiscreteScheduler()
    log_sigmas = np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))
    train = schedules.train_sigmas(ref.alphas_cumprod)
    s = np.array([150.0, 14.6, 3.0, 0.5, 0.05, 0.0101, 1e-3])
    want = np.array([ref._sigma_to_t(v, log_sigmas) for v in s])
    np.testing.assert_allclose(schedules.sigmas_to_timesteps(s, train), want, atol=1e-4)
    t = schedules.sigmas_to_timesteps(s[1:5], train)
    back = np.exp(np.interp(t, np.arange(1000), np.log(train)))
    np.testing.assert_allclose(back, s[1:5], rtol=1e-10)


def test_zero_terminal_snr_rescale():
    betas = schedules.rescale_zero_terminal_snr(schedules.make_betas(1000, 0.00085, 0.012, "scaled_linear"))
    ac = torch.cumprod(1 - betas, 0)
    assert ac[-1].item() == pytest.approx(0.0, abs=1e-7) and betas.max() <= 1.0
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    torch.testing.assert_close(betas, rescale_zero_terminal_snr(schedules.make_betas(1000, 0.00085, 0.012,
                                                                                     "scaled_linear")))


def test_cosine_betas_match_diffusers():
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(schedules.make_betas(1000, beta_schedule="squaredcos_cap_v2"), ref.betas)


def test_schedule_json_round_trip(tmp_path):
    path = save_schedule(tmp_path / "s.json", [999, 850, 500, 24], method="autodiffusion", score=1.5)
    record = load_schedule(path)
    assert record["timesteps"] == [999, 850, 500, 24] and record["method"] == "autodiffusion"
    assert record["score"] == 1.5 and record["format"] == "fastdiff.schedule" and record["version"] == 1
    record = load_schedule(save_schedule(tmp_path / "t.json", None, sigmas=[14.6, 3.0, 0.0]))
    assert record["sigmas"] == [14.6, 3.0, 0.0] and "timesteps" not in record
    with pytest.raises(ValueError, match="descending"):
        save_schedule(tmp_path / "u.json", [10, 20])
    with pytest.raises(ValueError, match="reserved"):
        save_schedule(tmp_path / "v.json", [20, 10], version=3)
    (tmp_path / "w.json").write_text(json.dumps({"timesteps": [3, 2]}))
    with pytest.raises(ValueError, match="not a fastdiff schedule"):
        load_schedule(tmp_path / "w.json")


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, fastdiff.schedulers; print(any(m.split('.')[0] == 'scipy' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
