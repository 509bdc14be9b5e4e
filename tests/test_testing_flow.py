"""fastdiff.testing, flow matching: the rectified-flow Gaussian mixture and the tiny SD3 / Flux pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fastdiff.testing import GaussianMixtureDenoiser, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_t5_tokenizer


def _flow_mixture(k: int = 3) -> GaussianMixtureDenoiser:
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureDenoiser(means=torch.randn(k, 1, 4, 4, generator=g, dtype=torch.float64) * 0.8,
                                   stds=torch.tensor([0.3, 0.5, 0.4][:k], dtype=torch.float64),
                                   weights=torch.tensor([0.2, 0.5, 0.3][:k], dtype=torch.float64),
                                   prediction_type="flow_prediction")


def _log_density(model: GaussianMixtureDenoiser, x: torch.Tensor, s: float) -> torch.Tensor:
    """log p(x_s) on x_s = (1 - s) x0 + s eps, written out independently of the model's posterior code."""
    flat = x.reshape(x.shape[0], -1)
    d = flat.shape[1]
    terms = []
    for w, m, c in zip(model.weights, model.means.reshape(len(model.stds), -1), model.stds):
        var = (1 - s) ** 2 * c**2 + s**2
        quad = ((flat - (1 - s) * m) ** 2).sum(1) / var
        terms.append(math.log(w) - 0.5 * quad - 0.5 * d * math.log(2 * math.pi * var))
    return torch.logsumexp(torch.stack(terms), dim=0)


@pytest.mark.parametrize("s", [0.05, 0.4, 0.95])
def test_flow_velocity_matches_finite_difference_score(s):
    """E[eps | x] = -s grad log p(x) and E[x0 | x] = (x - s E[eps | x]) / (1 - s), so v = (E[eps | x] - x) / (1 - s)."""
    model = _flow_mixture()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h = 1e-5
    score = torch.zeros(2, x[0].numel(), dtype=torch.float64)
    for i in range(x[0].numel()):
        e = torch.zeros_like(score)
        e[:, i] = h
        e = e.view_as(x)
        score[:, i] = (_log_density(model, x + e, s) - _log_density(model, x - e, s)) / (2 * h)
    eps = -s * score.view_as(x)
    v = model(x, torch.tensor(s * 1000, dtype=torch.float64)).sample
    torch.testing.assert_close(v, (eps - x) / (1 - s), atol=1e-6, rtol=1e-6)


def test_flow_ode_closed_form_and_self_consistency():
    one = _flow_mixture(k=1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t_from, t_to in ((999, 500), (700, 10), (999, None)):
        torch.testing.assert_close(one.exact_ode_solution(x, t_from, t_to, method="numeric"),
                                   one.exact_ode_solution(x, t_from, t_to, method="closed"), atol=1e-8, rtol=0)
    model = _flow_mixture()
    direct = model.exact_ode_solution(x, 990, 50)
    via = model.exact_ode_solution(model.exact_ode_solution(x, 990, 400), 400, 50)
    torch.testing.assert_close(via, direct, atol=1e-8, rtol=0)


def test_flow_mixture_agrees_with_diffusers_flow_match_euler():
    """diffusers' FlowMatchEulerDiscreteScheduler (timestep = sigma * 1000, model output = velocity) driven by the
    flow mixture converges to the mixture's exact ODE solution at first order: an independent check of the
    mixture's timestep and velocity conventions."""
    model = _flow_mixture()
    x_T = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s0 = 0.98
    reference = model.exact_ode_solution(x_T, s0 * 1000, None, rtol=1e-12, atol=1e-14)
    errs = []
    for n in (100, 200, 400):
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(sigmas=np.linspace(s0, s0 / n, n).tolist())
        x = x_T
        for t in sched.timesteps:
            x = sched.step(model(x, t.double()).sample, t, x).prev_sample
        errs.append((x - reference).abs().max().item())
    assert errs[-1] < 1e-2
    for a, b in zip(errs, errs[1:]):
        assert 1.7 < a / b < 2.3, errs  # halving the step halves the error


def test_t5_tokenizer_splits_known_words():
    tok = tiny_t5_tokenizer()
    vocab = tok.get_vocab()
    assert tok("a red cube").input_ids == [vocab["\u2581a"], vocab["\u2581red"], vocab["\u2581cube"], vocab["</s>"]]
    ids = tok("zq").input_ids
    assert ids[-1] == vocab["</s>"] and len(ids) >= 3  # unknown words fall back to pieces, not to one id


@pytest.mark.parametrize("factory", [tiny_sd3_pipeline, tiny_flux_pipeline])
def test_tiny_flow_pipelines_generate_offline(factory):
    """Stock FlowMatchEuler scheduler, plain prompts through the written CLIP and T5 tokenizers: finite images, and
    the prompt reaches the model (two prompts give two images)."""
    pipe = factory()

    def image(prompt: str) -> np.ndarray:
        return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    a, b = image("a red cube"), image("the blue sky")
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert np.abs(a - b).max() > 1e-4
