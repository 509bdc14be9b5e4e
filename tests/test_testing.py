"""fastdiff.testing: tiny offline pipelines and the exact Gaussian-mixture denoiser."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

from fastdiff.testing import (
    GaussianMixtureDenoiser,
    tiny_clip_tokenizer,
    tiny_controlnet_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


def test_import_fastdiff_is_cheap():
    code = "import sys, fastdiff; print(sorted(m for m in ('scipy', 'torchvision', 'cleanfid') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_splits_known_words():
    tok = tiny_clip_tokenizer()
    ids = tok("a red cube").input_ids
    vocab = tok.get_vocab()
    words = ["<|startoftext|>", "a</w>", "red</w>", "cube</w>", "<|endoftext|>"]
    assert ids == [vocab[w] for w in words]
    assert len(set(tok("zq").input_ids)) == 4  # unknown words fall back to letters, not to one id


@pytest.mark.parametrize("factory", [tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_controlnet_pipeline])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_tiny_pipelines_generate_offline(factory, scheduler):
    pipe = factory()
    if scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    # 32x32 images (16x16 latents): every component and both schedulers run as at the default 64x64, at a quarter of
    # the UNet / VAE cost; the shape still checks the VAE's 2x upsampling of the latents
    kwargs = {"image": torch.rand(1, 3, 32, 32)} if factory is tiny_controlnet_pipeline else {}
    gen = torch.Generator().manual_seed(0)
    out = pipe("a red cube", num_inference_steps=3, height=32, width=32, generator=gen, output_type="np", **kwargs)
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all()


def test_tiny_sd_prompt_embeds_route_equals_prompt_route():
    pipe = tiny_sd_pipeline()
    embeds, neg = pipe.encode_prompt("a cat", "cpu", 1, True)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = pipe("a cat", generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_array_equal(a, b)


def _mixture(dtype=torch.float64, k=3, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn((k, *shape), generator=g, dtype=torch.float64)
    stds = 0.2 + torch.rand(k, generator=g, dtype=torch.float64) * 0.5
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    ac = DDPMScheduler().alphas_cumprod.to(torch.float64)
    return GaussianMixtureDenoiser(means, stds, weights, alphas_cumprod=ac)


def _log_density(model: GaussianMixtureDenoiser, x: torch.Tensor, t: int) -> torch.Tensor:
    """log p_t(x) of the noised mixture, written independently of the denoiser's posterior code."""
    a, s = model.alpha_sigma(t)
    d = x[0].numel()
    total = []
    for mu, std, w in zip(model.means, model.stds, model.weights):
        var = a**2 * std**2 + s**2
        diff = (x - a * mu).reshape(x.shape[0], -1)
        total.append(torch.log(w) - 0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var))
    return torch.logsumexp(torch.stack(total), dim=0)


@pytest.mark.parametrize("t", [20, 300, 900])
def test_denoiser_matches_finite_difference_score(t):
    model = _mixture()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = model(x, t).sample
    h = 1e-5
    score = torch.zeros_like(x)
    flat = score.view(2, -1)
    for i in range(x[0].numel()):
        e = torch.zeros_like(x).view(2, -1)
        e[:, i] = h
        e = e.view_as(x)
        flat[:, i] = (_log_density(model, x + e, t) - _log_density(model, x - e, t)) / (2 * h)
    _, s = model.alpha_sigma(t)
    torch.testing.assert_close(eps, -s * score, atol=1e-7, rtol=1e-6)  # eps = -sigma * grad log p


def test_denoiser_prediction_types_consistent_and_fp32():
    base = _mixture()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    eps = base(x, t).sample
    a, s = base.alpha_sigma(t)
    a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    for kind, expect in (("sample", (x - s * eps) / a), ("v_prediction", a * eps - s * (x - s * eps) / a)):
        other = GaussianMixtureDenoiser(base.means, base.stds, base.weights, base.alphas_cumprod, prediction_type=kind)
        torch.testing.assert_close(other(x, t).sample, expect)
    out32 = base(x.float(), t).sample
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, eps.float(), atol=1e-5, rtol=1e-5)


def test_data_moments_match_samples():
    model = _mixture()
    data = model.sample_data(200_000, torch.Generator().manual_seed(0)).reshape(200_000, -1)
    torch.testing.assert_close(data.mean(0), model.data_mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(data.T), model.data_covariance(), atol=0.03, rtol=0)


def test_single_gaussian_numeric_ode_matches_closed_form():
    model = _mixture(k=1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for t_from, t_to in ((999, 500), (700, 10), (999, None)):
        closed = model.exact_ode_solution(x, t_from, t_to, method="closed")
        numeric = model.exact_ode_solution(x, t_from, t_to, method="numeric")
        torch.testing.assert_close(numeric, closed, atol=1e-8, rtol=0)


def test_mixture_ode_is_self_consistent():
    model = _mixture()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direct = model.exact_ode_solution(x, 999, 50)
    via = model.exact_ode_solution(model.exact_ode_solution(x, 999, 400), 400, 50)
    torch.testing.assert_close(via, direct, atol=1e-8, rtol=0)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_stock_ddpm_pipeline_runs_on_the_denoiser(scheduler_cls):
    model = _mixture(k=2, shape=(1, 8, 8))
    scheduler = scheduler_cls.from_config(DDPMScheduler().config)
    pipe = DDPMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (4, 8, 8, 1)
    assert np.isfinite(out.images).all()
