"""Deep-branch reuse (`EncoderPropagationConfig(reuse_decoder=True)`), checked against the DeepCache package's own
implementation (bit-identical images and FLOPs), the plain UNet, FlopCounterMode and the calibration's choice."""

from __future__ import annotations

import inspect

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff.hooks import EncoderPropagationConfig, decoder_layers, encoder_layers
from fastdiff.hooks.calibrate import calibrate, calibration_variants

STEPS = 6


@pytest.fixture(scope="module")
def pipes():
    """The reference architecture (random weights, DDIM) and the tiny SD pipeline: one and two layers per block."""
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG
    from fastdiff.testing import tiny_sd_pipeline

    reference = ReferencePipeline(unet=build_reference_unet().eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    tiny_sd = tiny_sd_pipeline()
    tiny_sd.scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config)
    for pipe in (reference, tiny_sd):
        pipe.set_progress_bar_config(disable=True)
    return {"reference": reference, "tiny_sd": tiny_sd}


def _call(pipe, kind: str) -> torch.Tensor:
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    kwargs = (dict(class_labels=[3, 7], guidance_scale=3.0) if kind == "reference"
              else dict(prompt=["a red cube", "a blue sky"], height=32, width=32))
    with torch.no_grad():
        return pipe(**kwargs, num_inference_steps=STEPS, generator=generator, output_type="latent").images


def _deepcache_depth(unet, branch: int) -> int:
    """DeepCache's `cache_branch_id` as `recompute_shallow`: the encoder layers before its block b // 3, layer b % 3."""
    block, layer = branch // 3, branch % 3
    names = [name for name, _ in encoder_layers(unet) if name != "mid_block"]
    return sum(1 for n in names if int(n.split(".")[1]) < block) + layer


def _with_deepcache(pipe, kind: str, interval: int, branch: int) -> torch.Tensor:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return _call(pipe, kind)
    finally:
        helper.disable()


@pytest.mark.parametrize("kind", ["reference", "tiny_sd"])
@pytest.mark.parametrize("interval, branch", [(2, 0), (3, 1), (2, 3), (3, 4)])
def test_equals_the_deepcache_package(pipes, kind, interval, branch):
    """key_steps=I with recompute_shallow=k and reuse_decoder=True is DeepCache's uniform 1:I at its branch."""
    pipe = pipes[kind]
    theirs = _with_deepcache(pipe, kind, interval, branch)
    config = EncoderPropagationConfig(key_steps=interval, recompute_shallow=_deepcache_depth(pipe.unet, branch),
                                      reuse_decoder=True)
    with fastdiff.apply(pipe, config):
        ours = _call(pipe, kind)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, _call(pipe, kind))  # the reuse really acted


def test_flops_equal_deepcache_and_sit_below_encoder_reuse(pipes):
    pipe = pipes["reference"]

    def flops(context) -> int:
        with FlopCounterMode(display=False) as counter, context:
            _call(pipe, "reference")
        return counter.get_total_flops()

    class DeepCache:
        def __enter__(self):
            self.helper = DeepCacheSDHelper(pipe=pipe)
            self.helper.set_params(cache_interval=2, cache_branch_id=3)
            self.helper.enable()

        def __exit__(self, *exc):
            self.helper.disable()

    deep = flops(fastdiff.apply(pipe, EncoderPropagationConfig(key_steps=2, recompute_shallow=2, reuse_decoder=True)))
    assert deep == flops(DeepCache())
    encoder_only = flops(fastdiff.apply(pipe, EncoderPropagationConfig(key_steps=2, recompute_shallow=2)))
    full = flops(torch.no_grad())
    assert deep < encoder_only < full


@pytest.mark.parametrize("kind", ["reference", "tiny_sd"])
def test_every_step_a_key_step_is_the_plain_unet_and_removal_restores_it(pipes, kind):
    pipe = pipes[kind]
    plain = _call(pipe, kind)
    signature = inspect.signature(pipe.unet.forward)
    for k in (0, 2):
        with fastdiff.apply(pipe, EncoderPropagationConfig(key_steps=1, recompute_shallow=k, reuse_decoder=True)):
            assert torch.equal(_call(pipe, kind), plain)
    with fastdiff.apply(pipe, EncoderPropagationConfig(key_steps=[0, 3], recompute_shallow=1, reuse_decoder=True)):
        assert not torch.equal(_call(pipe, kind), plain)
    assert torch.equal(_call(pipe, kind), plain)
    assert inspect.signature(pipe.unet.forward) == signature
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.unet.modules())


def test_decoder_layers_pair_each_up_resnet_with_its_skip(pipes):
    names = [(name, skip) for name, _, skip in decoder_layers(pipes["reference"].unet)]
    assert names == [("up_blocks.0.layers.0", 5), ("up_blocks.0.layers.1", 4), ("up_blocks.1.layers.0", 3),
                     ("up_blocks.1.layers.1", 2), ("up_blocks.2.layers.0", 1), ("up_blocks.2.layers.1", 0)]
    names = [(name, skip) for name, _, skip in decoder_layers(pipes["tiny_sd"].unet)]  # two layers per block
    assert names == [("up_blocks.0.layers.0", 5), ("up_blocks.0.layers.1", 4), ("up_blocks.0.layers.2", 3),
                     ("up_blocks.1.layers.0", 2), ("up_blocks.1.layers.1", 1), ("up_blocks.1.layers.2", 0)]


def test_refusals():
    with pytest.raises(ValueError, match="parallel=False"):
        EncoderPropagationConfig(key_steps=2, parallel=True, reuse_decoder=True)
    with pytest.raises(ValueError, match="True or False"):
        EncoderPropagationConfig(key_steps=2, reuse_decoder=1)


def test_calibration_compares_both_reuses_within_the_budget(pipes):
    pipe = pipes["reference"]
    layers = len(encoder_layers(pipe.unet))
    assert calibration_variants(layers) == [(d, False) for d in range(layers + 1)] + [(d, True)
                                                                                       for d in range(layers - 1)]
    result = calibrate(pipe, STEPS, 0.5, num_images=2, class_labels=[3, 7], guidance_scale=1.0)
    assert set(result.drift) == set(calibration_variants(layers))
    assert result.config.reuse_decoder  # 0.5 is below every encoder-only plan (the decoder always runs there)
    with FlopCounterMode(display=False) as full_counter:
        _call(pipe, "reference")
    with FlopCounterMode(display=False) as counter, fastdiff.apply(pipe, result.config):
        _call(pipe, "reference")
    counted = counter.get_total_flops() / full_counter.get_total_flops()
    assert counted <= 0.5 and result.config.key_steps[0] == 0
    with pytest.raises(ValueError, match="at least"):
        calibrate(pipe, STEPS, 0.5, num_images=1, reuse_decoder=False, class_labels=[3], guidance_scale=1.0)
