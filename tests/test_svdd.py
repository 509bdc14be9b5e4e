"""SVDD (fastdiff.guidance): exact reduction to the plain pipelines, CFG layout, multistep history, selection maths,
rewards and their validation, and the SVDD-MC value network. Tiny random-weight models, CPU, offline."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from fastdiff.guidance import SVDDConfig, rewards, select_candidates, svdd_sample
from fastdiff.guidance.svdd import _prepare, predict_x0
from fastdiff.models import train as reference_train


def _gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def reference_pipe():
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet

    pipe = ReferencePipeline(unet=build_reference_unet().eval(),
                             scheduler=DDIMScheduler(**reference_train.SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(kind: str, config):
    if kind == "fastdiff-sde-dpmsolver++":
        from fastdiff.schedulers import DPMSolverPlusPlusScheduler

        return DPMSolverPlusPlusScheduler.from_config(config, algorithm_type="sde-dpmsolver++")
    if kind == "ddpm":
        return DDPMScheduler.from_config(config)
    if kind == "sde-dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++")
    return DDIMScheduler.from_config(config)


QUIET = dict(show_progress=False)


# --- M = 1, alpha = 0 is the plain pipeline, bit for bit -------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "ddim-eta1", "fastdiff-sde-dpmsolver++"])
def test_m1_reproduces_reference_pipeline(reference_pipe, kind):
    reference_pipe.scheduler = _scheduler(kind, reference_train.SCHEDULER_CONFIG)
    # 3 steps (was 5): first, middle and last step; SDE-DPM-Solver++ 2M runs orders 1, 2, 1
    kw = dict(class_labels=[1, 7, 3], guidance_scale=2.0, num_inference_steps=3, eta=1.0)
    plain = reference_pipe(**kw, generator=_gens(3), output_type="pt").images
    out = svdd_sample(reference_pipe, brightness, SVDDConfig(num_candidates=1, **QUIET), **kw, generator=_gens(3))
    assert torch.equal(out.images, plain)
    assert out.nfe == 3 and out.unet_calls == 3


def test_m1_uses_the_pipeline_call_defaults(reference_pipe):
    """No guidance or step count given: SVDD must take the pipeline's own call defaults, whatever they are."""

    class Guided(type(reference_pipe)):  # defaults unlike any fallback: guidance 3, 7 steps
        def __call__(self, *args, guidance_scale: float = 3.0, num_inference_steps: int = 7, **kwargs):
            return super().__call__(*args, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                    **kwargs)

    pipe = Guided(unet=reference_pipe.unet, scheduler=DDPMScheduler.from_config(reference_train.SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(class_labels=[1, 7], generator=_gens(2), output_type="pt").images
    out = svdd_sample(pipe, brightness, SVDDConfig(num_candidates=1, **QUIET), class_labels=[1, 7],
                      generator=_gens(2))
    assert torch.equal(out.images, plain)


@pytest.mark.parametrize("kind", ["ddpm", "ddim-eta1", "sde-dpmsolver++"])
def test_m1_reproduces_tiny_sd(tiny_sd, kind):
    tiny_sd.scheduler = _scheduler(kind, tiny_sd.scheduler.config)
    # 32x32 images (16x16 latents) here and below: the same pipeline and SVDD code paths as 64x64
    kw = dict(prompt=["a red cube", "a blue sky"], num_inference_steps=3, height=32, width=32, guidance_scale=3.0)
    if kind.startswith("ddim"):
        kw["eta"] = 1.0
    plain = tiny_sd(**kw, generator=_gens(2), output_type="pt").images
    out = svdd_sample(tiny_sd, brightness, SVDDConfig(num_candidates=1, **QUIET), **kw, generator=_gens(2))
    assert torch.equal(out.images, plain)


def test_m1_reproduces_tiny_sdxl():
    from fastdiff.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kw = dict(prompt="a red cube", num_inference_steps=3, height=32, width=32, guidance_scale=3.0)
    plain = pipe(**kw, generator=_gens(1), output_type="pt").images
    out = svdd_sample(pipe, brightness, SVDDConfig(num_candidates=1, **QUIET), **kw, generator=_gens(1))
    assert torch.equal(out.images, plain)


def test_composes_with_encoder_propagation(tiny_sd):
    from fastdiff.hooks import EncoderPropagationConfig, encoder_propagation

    tiny_sd.scheduler = DDPMScheduler.from_config(tiny_sd.scheduler.config)
    # 3 steps, key steps 0 and 2 (was 5 steps, 0, 2, 4): still key, propagated (non-key) and key again, last
    kw = dict(prompt=["a red cube", "a blue sky"], num_inference_steps=3, height=32, width=32, guidance_scale=3.0)
    with encoder_propagation(tiny_sd, EncoderPropagationConfig(key_steps=[0, 2])):
        plain = tiny_sd(**kw, generator=_gens(2), output_type="pt").images
        out = svdd_sample(tiny_sd, brightness, SVDDConfig(num_candidates=1, **QUIET), **kw, generator=_gens(2))
        assert torch.equal(out.images, plain)
        mc = SVDDConfig(num_candidates=3, variant="mc", value_fn=lambda x, t: -x.mean(dim=(1, 2, 3)), **QUIET)
        assert svdd_sample(tiny_sd, brightness, mc, **kw, generator=_gens(2)).nfe == 3
        with pytest.raises(ValueError, match="variant='mc'"):
            svdd_sample(tiny_sd, brightness, SVDDConfig(num_candidates=2, **QUIET), **kw, generator=_gens(2))


# --- the candidate batch ------------------------------------------------------------------------------


def test_cfg_candidate_rows_match_per_image_guidance(tiny_sd):
    """Each candidate row gets its own image's [uncond; cond] embeddings (the paper's batched code interleaves)."""
    prompts, m, scale = ["a red cube", "a blue sky"], 3, 4.0
    prep = _prepare(tiny_sd, dict(prompt=prompts, guidance_scale=scale, num_inference_steps=2, height=32, width=32))
    owner = torch.arange(2).repeat_interleave(m)
    latents = torch.randn(2 * m, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = prep.timesteps[0]
    batched = prep.denoiser(latents, 0, t, owner, max_batch=4)  # chunks cross the image boundary
    for row in range(2 * m):
        cond, uncond = tiny_sd.encode_prompt(prompts[owner[row]], "cpu", 1, True)
        out = tiny_sd.unet(torch.cat([latents[row : row + 1]] * 2), t,
                           encoder_hidden_states=torch.cat([uncond, cond])).sample
        expected = out[:1] + scale * (out[1:] - out[:1])
        torch.testing.assert_close(batched[row : row + 1], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("solver", ["diffusers", "fastdiff"])
def test_sde_dpmsolver_history_follows_chosen_children(reference_pipe, solver):
    """Replaying the chosen noises through a fresh SDE-DPM-Solver++ (order 2) gives SVDD's samples."""
    from diffusers.utils.torch_utils import randn_tensor

    from fastdiff.schedulers import DPMSolverPlusPlusScheduler

    cls = DPMSolverMultistepScheduler if solver == "diffusers" else DPMSolverPlusPlusScheduler
    reference_pipe.scheduler = cls.from_config(reference_train.SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++",
                                               solver_order=2)
    n, m, steps = 2, 3, 5
    kw = dict(class_labels=[2, 5], guidance_scale=1.0, num_inference_steps=steps)
    out = svdd_sample(reference_pipe, brightness, SVDDConfig(num_candidates=m, **QUIET), **kw,
                      generator=_gens(n), output_type="latent")
    assert (out.choices != 0).any()  # the test is vacuous if candidate 0 is always kept

    gens = _gens(n)
    latents = randn_tensor((n, 4, 16, 16), generator=gens)
    scheduler = cls.from_config(reference_pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    labels = torch.tensor([2, 5])
    cond = torch.nn.functional.one_hot(labels, 11).float().unsqueeze(1)
    for i, t in enumerate(scheduler.timesteps):
        draws = randn_tensor((n * m, 4, 16, 16), generator=[g for g in gens for _ in range(m)])
        noise = draws.reshape(n, m, 4, 16, 16)[torch.arange(n), out.choices[i]]
        eps = reference_pipe.unet(latents, t, encoder_hidden_states=cond, class_labels=labels).sample
        latents = scheduler.step(eps, t, latents, variance_noise=noise).prev_sample
    torch.testing.assert_close(out.images, latents, rtol=1e-4, atol=1e-4)


def test_pm_raises_reward_and_counts_unet_calls(reference_pipe):
    reference_pipe.scheduler = DDPMScheduler.from_config(reference_train.SCHEDULER_CONFIG)
    kw = dict(batch_size=4, num_inference_steps=4)
    base = svdd_sample(reference_pipe, brightness, SVDDConfig(num_candidates=1, **QUIET), **kw, generator=_gens(4))
    out = svdd_sample(reference_pipe, brightness, SVDDConfig(num_candidates=4, max_batch=6, **QUIET), **kw,
                      generator=_gens(4))
    assert out.rewards.mean() > base.rewards.mean()
    torch.testing.assert_close(out.rewards, brightness(out.images))  # the trace ends at the returned images
    assert out.reward_trace.shape == (4, 4) and out.candidate_values.shape == (4, 4, 4)
    assert out.nfe == 1 + 3 * 4
    assert out.unet_calls == 1 + 3 * math.ceil(16 / 6)


def test_mc_uses_value_fn_at_the_childrens_timestep_and_t_unet_calls(reference_pipe):
    reference_pipe.scheduler = DDPMScheduler.from_config(reference_train.SCHEDULER_CONFIG)
    seen = []

    def value_fn(latents, timesteps):
        seen.append(int(timesteps[0]))
        return latents.mean(dim=(1, 2, 3))

    config = SVDDConfig(num_candidates=3, variant="mc", value_fn=value_fn, **QUIET)
    out = svdd_sample(reference_pipe, brightness, config, batch_size=2, num_inference_steps=4, generator=_gens(2))
    assert seen == [int(t) for t in reference_pipe.scheduler.timesteps[1:]]
    assert out.nfe == 4 and out.unet_calls == 4
    torch.testing.assert_close(out.candidate_values[0].argmax(1), out.choices[0])


# --- selection and posterior mean -------------------------------------------------------------------------


def test_select_candidates_argmax_and_softmax_frequencies():
    values = torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 2.5]])
    assert select_candidates(values, 0.0).tolist() == [1, 2]
    gen = torch.Generator().manual_seed(0)
    alpha = 0.7
    # 8000 draws per row in one call of 16000 rows (was 8000 calls of 2 rows): max |freq - p| = 0.011 either way,
    # against atol 0.02; alpha 0.6 or 0.8 instead of 0.7 is off by 0.037 / 0.023, alpha 1 by 0.067
    picks = select_candidates(values.repeat(8000, 1), alpha, gen).view(8000, 2)
    for row in range(2):
        freq = torch.bincount(picks[:, row], minlength=3).double() / len(picks)
        expected = torch.exp(values[row].double() / alpha) / torch.exp(values[row].double() / alpha).sum()
        torch.testing.assert_close(freq, expected, atol=0.02, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_matches_ddim_pred_original_sample(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[3]
    expected = scheduler.step(model_output, t, sample).pred_original_sample
    torch.testing.assert_close(predict_x0(scheduler, model_output, sample, t), expected, rtol=1e-5, atol=1e-5)


# --- bad inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(num_candidates=0), dict(alpha=-0.1), dict(alpha=float("nan")),
                                    dict(variant="mc"), dict(variant="best"), dict(max_batch=0)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SVDDConfig(**kwargs)


@pytest.mark.parametrize(("reward", "error", "match"), [
    (lambda x: x.mean(dim=(1, 2, 3)).tolist(), TypeError, "torch.Tensor"),
    (lambda x: x.mean(dim=(2, 3)), ValueError, "shape"),
    (lambda x: torch.full((len(x),), float("nan")), ValueError, "NaN"),
])
def test_bad_reward_outputs_raise(reference_pipe, reward, error, match):
    reference_pipe.scheduler = DDPMScheduler.from_config(reference_train.SCHEDULER_CONFIG)
    with pytest.raises(error, match=match):
        svdd_sample(reference_pipe, reward, SVDDConfig(num_candidates=2, **QUIET), batch_size=1,
                    num_inference_steps=2, generator=_gens(1))


def test_deterministic_scheduler_warns(reference_pipe):
    reference_pipe.scheduler = DDIMScheduler(**reference_train.SCHEDULER_CONFIG)
    kw = dict(batch_size=1, num_inference_steps=2, generator=_gens(1))
    with pytest.warns(UserWarning, match="eta > 0"):
        svdd_sample(reference_pipe, brightness, SVDDConfig(num_candidates=2, **QUIET), eta=0.0, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdd_sample(reference_pipe, brightness, SVDDConfig(num_candidates=2, **QUIET), eta=1.0, batch_size=1,
                    num_inference_steps=2, generator=_gens(1))


def test_unsupported_pipeline_kwarg_is_named(reference_pipe):
    with pytest.raises(ValueError, match="prompt"):
        svdd_sample(reference_pipe, brightness, SVDDConfig(**QUIET), prompt="a cat")


# --- rewards ----------------------------------------------------------------------------------------------


def test_jpeg_compressibility_is_minus_the_pillow_jpeg_size_in_kb():
    """The reward is -(bytes of a Pillow JPEG at quality 95) / 1000 (Pillow is fastdiff's only JPEG encoder)."""
    import io

    import PIL.Image

    g = torch.Generator().manual_seed(0)
    images = [torch.zeros(1, 32, 32), torch.rand(1, 32, 32, generator=g),
              torch.linspace(0, 1, 32).repeat(1, 32, 1), (torch.rand(1, 32, 32, generator=g) > 0.9).float()]
    ours = rewards.jpeg_compressibility(torch.stack(images))
    for img, reward in zip(images, ours):
        buf = io.BytesIO()
        PIL.Image.fromarray((img[0] * 255).round().byte().numpy(), mode="L").save(buf, format="JPEG", quality=95)
        assert reward.item() == pytest.approx(-buf.tell() / 1000)
        buf.seek(0)
        with PIL.Image.open(buf) as decoded:
            assert decoded.format == "JPEG" and decoded.size == (32, 32)
    # flat, then a smooth ramp, compress best; sparse dots and uniform noise worst
    assert ours[0] > ours[2] > max(ours[1], ours[3])
    assert rewards.jpeg_compressibility(torch.rand(2, 3, 64, 64)).shape == (2,)


def test_classifier_reward_is_the_target_log_probability():
    from fastdiff.models.classifier import DigitClassifier

    clf = DigitClassifier().eval()
    reward = rewards.ClassifierReward(7, classifier=clf)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = torch.log_softmax(clf(x), dim=-1)[:, 7]
    torch.testing.assert_close(reward(x), expected)
    torch.testing.assert_close(reward.log_probs(x).logsumexp(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    assert reward(torch.rand(2, 3, 64, 64)).shape == (2,)
    with pytest.raises(ValueError, match="0-9"):
        rewards.ClassifierReward(10)


# --- SVDD-MC value network --------------------------------------------------------------------------------


def test_value_network_learns_reward_and_round_trips(reference_pipe, tmp_path):
    from fastdiff.guidance.value import load_value_function, save_value_function, train_value_function

    g = torch.Generator().manual_seed(0)
    level = torch.rand(256, generator=g) * 2 - 1  # clean latents of varying brightness
    latents = level.view(-1, 1, 1, 1) + 0.1 * torch.randn(256, 4, 16, 16, generator=g)
    latents = latents.clamp(-1, 1)
    # 40 steps (was 80): correlation 0.994 (0.988 at 80) against the 0.9 bound; a negated or shuffled target
    # gives about -1 or 0
    net = train_value_function(reference_pipe, brightness, latents=latents, steps=40, batch_size=32, seed=0,
                               channels=16)
    from fastdiff.models.unet import decode

    target = brightness(decode(latents))
    pred = net(latents, torch.full((256,), 20))
    assert torch.corrcoef(torch.stack([pred, target]))[0, 1] > 0.9
    save_value_function(net, tmp_path / "v.safetensors", {"reward": "brightness"})
    loaded = load_value_function(tmp_path / "v.safetensors")
    torch.testing.assert_close(loaded(latents[:4], torch.tensor([0, 100, 500, 999])),
                               net(latents[:4], torch.tensor([0, 100, 500, 999])))
