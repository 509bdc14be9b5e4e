"""Faster Diffusion encoder propagation hooks, checked against the unhooked diffusers pipelines and closed forms."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DConditionModel

from fastdiff.hooks import (
    EncoderPropagationConfig,
    apply_encoder_propagation,
    encoder_propagation,
)
from fastdiff.hooks.encoder_propagation import (
    PRESETS,
    injection_eps_coefficient,
    injection_v_coefficient,
    key_step_indices,
)
from fastdiff.schedulers import DPMSolverPlusPlusScheduler

STEPS = 5
KEYS = [0, 3]  # groups [1, 2] and [4]: a batched decode of two steps and of one
SIZE = dict(height=64, width=64)


def _reference_pipeline():
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    pipe = ReferencePipeline(unet=build_reference_unet().eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _shared_pipe(kind: str):
    """A pipeline for tests that do not change its components (hooks are always removed after use)."""
    return _pipe(kind)


def _pipe(kind: str):
    from fastdiff import testing

    if kind == "reference":
        return _reference_pipeline()
    return {
        "sd": testing.tiny_sd_pipeline,
        "sdxl": testing.tiny_sdxl_pipeline,
        "controlnet": testing.tiny_controlnet_pipeline,
    }[kind]()


def _run(pipe, kind: str, steps: int = STEPS, guidance_scale: float | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "reference":
        gs = 3.0 if guidance_scale is None else guidance_scale
        return pipe(
            class_labels=[3], guidance_scale=gs, num_inference_steps=steps, generator=g, output_type="latent"
        ).images
    kwargs = dict(num_inference_steps=steps, generator=g, output_type="latent", **SIZE)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if kind == "controlnet":
        kwargs["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return pipe("a red cube", **kwargs).images


KINDS = ["sd", "sdxl", "controlnet", "reference"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_key_is_bit_identical_and_removal_restores(kind):
    pipe = _shared_pipe(kind)
    reference = _run(pipe, kind)
    signature = inspect.signature(pipe.unet.forward)
    for parallel in (False, True):
        with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=1, parallel=parallel)):
            assert torch.equal(_run(pipe, kind), reference)
    assert torch.equal(_run(pipe, kind), reference)
    assert inspect.signature(pipe.unet.forward) == signature
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.unet.modules())


def _recorded(pipe, kind: str, config: EncoderPropagationConfig, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final latents and every UNet output (what the scheduler received) of one hooked pipeline call."""
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].clone()))
    try:
        with encoder_propagation(pipe, config):
            latents = _run(pipe, kind, **kwargs)
    finally:
        handle.remove()
    return latents, outputs


def _assert_parallel_matches_sequential(pipe, kind: str, extra: dict | None = None, **kwargs) -> torch.Tensor:
    """Parallel decoding == sequential decoding: the first group's UNet outputs (same inputs) to 1e-5 absolute.

    Later groups start from latents that already differ by float32 rounding, amplified by the sampler (the
    reference pipeline's first DDIM step divides eps by sqrt(alphas_cumprod[999]) ~ 1/156), so the final
    latents are compared to 1e-3.
    """
    extra = extra or {}
    sequential, seq_outputs = _recorded(pipe, kind, EncoderPropagationConfig(key_steps=KEYS, **extra), **kwargs)
    for max_batch in (None, 1):
        config = EncoderPropagationConfig(key_steps=KEYS, parallel=True, max_parallel_batch=max_batch, **extra)
        parallel, par_outputs = _recorded(pipe, kind, config, **kwargs)
        assert len(par_outputs) == len(seq_outputs) == STEPS
        for step in range(KEYS[1]):
            torch.testing.assert_close(par_outputs[step], seq_outputs[step], atol=1e-5, rtol=0)
        torch.testing.assert_close(parallel, sequential, atol=1e-3, rtol=0)
    return sequential


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_equals_sequential_and_calls_are_independent(kind):
    pipe = _shared_pipe(kind)
    with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=KEYS)):
        first = _run(pipe, kind)
        again = _run(pipe, kind)
    full = _run(pipe, kind)
    assert torch.equal(first, again)  # state was reset after the first call
    assert (first - full).abs().max() > 1e-3  # propagation did change something
    assert torch.equal(_assert_parallel_matches_sequential(pipe, kind), first)


def test_two_calls_equal_two_fresh_calls_with_different_seeds():
    pipe = _shared_pipe("sd")
    config = EncoderPropagationConfig(key_steps=2, parallel=True)
    with encoder_propagation(pipe, config):
        first, second = _run(pipe, "sd", seed=1), _run(pipe, "sd", seed=2)
    for seed, got in ((1, first), (2, second)):
        fresh = _pipe("sd")
        with encoder_propagation(fresh, config):
            assert torch.equal(_run(fresh, "sd", seed=seed), got)


def test_cfg_off_and_batch_of_prompts():
    pipe = _shared_pipe("sd")
    _assert_parallel_matches_sequential(pipe, "sd", guidance_scale=1.0)
    with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=KEYS)):
        single = pipe(
            "a red cube",
            num_inference_steps=STEPS,
            output_type="latent",
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            **SIZE,
        ).images
        batch = pipe(
            ["a red cube", "a blue sky"],
            num_inference_steps=STEPS,
            output_type="latent",
            guidance_scale=1.0,
            generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(5)],
            **SIZE,
        ).images
    torch.testing.assert_close(batch[:1], single, atol=1e-5, rtol=1e-5)


def test_non_key_step_output_ignores_the_latent():
    pipe = _shared_pipe("sd")
    unet, scheduler = pipe.unet, pipe.scheduler
    scheduler.set_timesteps(4)
    x0, x1 = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    ehs = torch.randn(2, 77, 32)
    outs = []
    with torch.no_grad(), encoder_propagation(unet, EncoderPropagationConfig(key_steps=KEYS), scheduler=scheduler):
        for perturbation in (0.0, 1.0):
            scheduler.set_timesteps(4)  # a new call: new timesteps object
            unet(x0, scheduler.timesteps[0], ehs)
            outs.append(unet(x1 + perturbation * torch.randn_like(x1), scheduler.timesteps[1], ehs).sample)
    with torch.no_grad():
        plain = [unet(x1 + p, scheduler.timesteps[1], ehs).sample for p in (0.0, 1.0)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(plain[0], plain[1])


def test_controlnet_runs_only_at_key_steps():
    pipe = _shared_pipe("controlnet")
    runs = []
    handle = pipe.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: runs.append(1))
    _run(pipe, "controlnet", steps=10)
    assert len(runs) == 10
    runs.clear()
    for parallel in (False, True):
        with encoder_propagation(pipe, EncoderPropagationConfig(key_steps="fd20", parallel=parallel)):
            _run(pipe, "controlnet", steps=10)
        assert len(runs) == len(key_step_indices("fd20", 10))
        runs.clear()
    handle.remove()


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler", "fastdiff-dpm++"])
def test_schedulers(scheduler):
    pipe = _pipe("sd")
    classes = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
               "fastdiff-dpm++": DPMSolverPlusPlusScheduler}
    cls = classes[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    full = _run(pipe, "sd")
    with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=1)):
        assert torch.equal(_run(pipe, "sd"), full)
    _assert_parallel_matches_sequential(pipe, "sd")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_injection_coefficient_matches_ddim_step_on_injected_latent(prediction_type):
    """diffusers' DDIM step of the injected latent z + delta == its step of z with the shifted model output."""
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    coefficient = injection_eps_coefficient if prediction_type == "epsilon" else injection_v_coefficient
    scheduler.set_timesteps(10)
    z, out, delta = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    for i, t in enumerate(scheduler.timesteps):
        prev = scheduler.timesteps[i + 1] if i + 1 < 10 else None
        a_prev = scheduler.alphas_cumprod[prev] if prev is not None else scheduler.final_alpha_cumprod
        c = coefficient(float(scheduler.alphas_cumprod[t]), float(a_prev))
        paper = scheduler.step(out, t, z + delta).prev_sample
        ours = scheduler.step(out + c * delta, t, z).prev_sample
        torch.testing.assert_close(ours, paper, atol=1e-6, rtol=1e-5)  # the scheduler's alphas are float32


def test_noise_injection_equals_the_papers_loop():
    """All key steps + injection == the paper's loop (z <- z + alpha z_T while t < tau) on the plain UNet."""
    pipe = _shared_pipe("sd")
    unet, scheduler = pipe.unet, pipe.scheduler
    alpha, tau, w = 0.05, 500, 5.0
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3))
    z_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))

    def loop(inject: bool) -> torch.Tensor:
        scheduler.set_timesteps(STEPS)
        z = z_T.clone()
        for t in scheduler.timesteps:
            if inject and t < tau:
                z = z + alpha * z_T
            u, c = unet(torch.cat([z, z]), t, ehs).sample.chunk(2)
            z = scheduler.step(u + w * (c - u), t, z).prev_sample
        return z

    with torch.no_grad():
        paper, plain = loop(inject=True), loop(inject=False)
        config = EncoderPropagationConfig(key_steps=1, noise_injection_alpha=alpha, noise_injection_tau=tau)
        with encoder_propagation(unet, config, scheduler=scheduler):
            ours = loop(inject=False)
    assert (paper - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, paper, atol=1e-5, rtol=1e-5)


def test_noise_injection_parallel_equals_sequential():
    pipe = _shared_pipe("controlnet")
    injection = dict(noise_injection_alpha=0.01, noise_injection_tau=700)
    injected = _assert_parallel_matches_sequential(pipe, "controlnet", extra=injection)
    with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=KEYS)):
        assert (_run(pipe, "controlnet") - injected).abs().max() > 1e-4


def test_key_step_presets():
    assert key_step_indices("fd50", 50) == PRESETS["fd50"][1]
    assert key_step_indices("fd20", 20) == PRESETS["fd20"][1]
    assert key_step_indices("fd50", 25) == (0, 1, 2, 3, 5, 8, 13, 18)  # floor(k/2 + 1/2), merged
    assert key_step_indices(4, 10) == (0, 4, 8)
    assert key_step_indices([3, 0], 4) == (0, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(key_steps=[1, 2]),
        dict(key_steps=[0, -1]),
        dict(key_steps=0),
        dict(key_steps="fd10"),
        dict(key_steps=[0, 1.5]),
        dict(key_steps=2, noise_injection_alpha=-0.1),
        dict(key_steps=2, max_parallel_batch=0),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        EncoderPropagationConfig(**kwargs)


def test_bad_targets_and_ranges_raise():
    from diffusers import UNet2DModel

    config = EncoderPropagationConfig(key_steps=[0, 1])
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        unet = UNet2DModel(
            block_out_channels=(32, 32),
            down_block_types=("DownBlock2D",) * 2,
            up_block_types=("UpBlock2D",) * 2,
            norm_num_groups=8,
        )
        apply_encoder_propagation(unet, config, scheduler=DDIMScheduler())
    pipe = _pipe("sd")
    with pytest.raises(ValueError, match="scheduler"):
        apply_encoder_propagation(pipe.unet, config)
    with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=[0, 10])):
        with pytest.raises(ValueError, match="out of range"):
            _run(pipe, "sd", steps=4)
        with pytest.raises(ValueError, match="already applied"):
            apply_encoder_propagation(pipe, config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with encoder_propagation(pipe, EncoderPropagationConfig(key_steps=1, noise_injection_alpha=0.003)):
        with pytest.raises(ValueError, match="variance-preserving"):
            _run(pipe, "sd", steps=4)


def test_fd50_flops_on_sd15_unet():
    """fd50 on the SD1.5 UNet (meta tensors, classic attention): -27% +- 1 point of UNet FLOPs, counted."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD1.5 architecture
        x, ehs = torch.empty(1, 4, 64, 64), torch.empty(1, 77, 768)
    unet.set_attn_processor(AttnProcessor())

    def flops(t) -> int:
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ehs)
        return counter.get_total_flops()

    full = flops(torch.tensor(999))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    keys = key_step_indices("fd50", 50)
    with encoder_propagation(unet, EncoderPropagationConfig(key_steps="fd50"), scheduler=scheduler):
        key = flops(scheduler.timesteps[0])
        for t in scheduler.timesteps[1:4]:  # steps 1-3 are key steps too
            unet(x, t, ehs)
        non_key = flops(scheduler.timesteps[4])
    assert key == full
    total = len(keys) * key + (50 - len(keys)) * non_key
    saving = 1 - total / (50 * full)
    assert abs(saving - 0.27) <= 0.01, saving
