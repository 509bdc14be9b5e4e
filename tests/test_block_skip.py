"""AutoDiffusion stage-2 layer skipping, checked against diffusers' own forward with the skipped branch zeroed."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from fastdiff.hooks import BlockSkipConfig, apply_block_skip, block_skip, remove_block_skip, skippable_layers
from fastdiff.search import SearchConfig, search_timesteps
from fastdiff.search.evolutionary import SearchSpace, crossover, make_candidate, mutate, random_candidate


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    from fastdiff.testing import tiny_sd_pipeline

    return tiny_sd_pipeline().unet


def _scheduler(steps: int = 3) -> DDIMScheduler:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    return scheduler


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)


def _zeroed(unet: UNet2DConditionModel, layer: int) -> UNet2DConditionModel:
    """A copy whose layer `layer` has its residual branch zeroed: diffusers' forward then computes the skip."""
    twin = copy.deepcopy(unet)
    module = skippable_layers(twin)[layer][1]
    last = module.conv2 if isinstance(module, ResnetBlock2D) else module.proj_out
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return twin


def test_skippable_layers_are_every_resnet_and_transformer_in_forward_order(unet):
    layers = skippable_layers(unet)
    names = [name for name, _ in layers]
    expected = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    assert sorted(map(id, expected)) == sorted(id(m) for _, m in layers)
    assert len(set(names)) == len(names)
    first_mid, first_up = names.index("mid_block.resnets.0"), names.index("up_blocks.0.resnets.0")
    assert all(n.startswith("down") for n in names[:first_mid]) and first_mid < first_up
    assert names[first_mid:first_mid + 3] == ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]


LAYER_KINDS = {
    "resnet": lambda m: isinstance(m, ResnetBlock2D) and m.conv_shortcut is None,
    "resnet with 1x1 shortcut": lambda m: isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None,
    "attention": lambda m: isinstance(m, Transformer2DModel),
}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_skip_at_one_step_equals_zeroed_branch_at_that_step_only(unet, kind):
    layer = next(i for i, (_, m) in enumerate(skippable_layers(unet)) if LAYER_KINDS[kind](m))
    twin = _zeroed(unet, layer)
    scheduler = _scheduler(3)
    x, ehs = _inputs()
    with torch.no_grad():
        plain = [unet(x, t, ehs).sample for t in scheduler.timesteps]
        skipped_ref = twin(x, scheduler.timesteps[1], ehs).sample
        with block_skip(unet, BlockSkipConfig(skips=[(1, layer)]), scheduler=scheduler):
            hooked = [unet(x, t, ehs).sample for t in scheduler.timesteps]
    torch.testing.assert_close(hooked[0], plain[0], atol=0, rtol=0)
    torch.testing.assert_close(hooked[1], skipped_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hooked[2], plain[2], atol=0, rtol=0)
    assert not torch.allclose(hooked[1], plain[1])


def test_no_skips_and_removal_are_bit_identical_and_calls_do_not_leak(tiny_sd):
    kw = dict(num_inference_steps=3, height=64, width=64, output_type="pt")
    signature = inspect.signature(tiny_sd.unet.forward)

    def run():
        return tiny_sd("a red cube", generator=torch.Generator().manual_seed(0), **kw).images

    plain = run()
    with block_skip(tiny_sd, BlockSkipConfig(skips={})):
        torch.testing.assert_close(run(), plain, atol=0, rtol=0)
    apply_block_skip(tiny_sd, BlockSkipConfig(skips={1: [0, 4], 2: [7]}))
    first, second = run(), run()
    remove_block_skip(tiny_sd)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # two calls in a row equal each other
    assert not torch.equal(first, plain)
    torch.testing.assert_close(run(), plain, atol=0, rtol=0)
    assert inspect.signature(tiny_sd.unet.forward) == signature


def test_clear_errors(unet):
    scheduler = _scheduler(3)
    num_layers = len(skippable_layers(unet))
    with pytest.raises(ValueError, match="out of range"):
        apply_block_skip(unet, BlockSkipConfig(skips=[(0, num_layers)]), scheduler=scheduler)
    with pytest.raises(ValueError, match="negative"):
        BlockSkipConfig(skips=[(-1, 0)])
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        apply_block_skip(torch.nn.Linear(2, 2), BlockSkipConfig(skips=[]), scheduler=scheduler)
    with pytest.raises(ValueError, match="scheduler"):
        apply_block_skip(unet, BlockSkipConfig(skips=[]))
    x, ehs = _inputs()
    with block_skip(unet, BlockSkipConfig(skips=[(5, 0)]), scheduler=scheduler):
        with pytest.raises(ValueError, match=r"skip steps \[5\] are out of range for 3 steps"):
            unet(x, scheduler.timesteps[0], ehs)
    with pytest.raises(ValueError, match="either"):
        SearchConfig(num_key_steps=2, num_skips=2)


def test_composes_with_sequential_encoder_propagation_and_refuses_parallel(tiny_sd):
    from fastdiff.hooks import EncoderPropagationConfig, encoder_propagation

    kw = dict(num_inference_steps=3, height=64, width=64, output_type="pt")

    def run():
        return tiny_sd("a red cube", generator=torch.Generator().manual_seed(0), **kw).images

    skips = BlockSkipConfig(skips={2: [len(skippable_layers(tiny_sd.unet)) - 1]})  # a decoder layer at step 2
    with encoder_propagation(tiny_sd, EncoderPropagationConfig(key_steps=[0, 1, 2])):  # all key: EP is exact
        with block_skip(tiny_sd, skips):
            both = run()
    with block_skip(tiny_sd, skips):
        only_skips = run()
    torch.testing.assert_close(both, only_skips, atol=0, rtol=0)
    with encoder_propagation(tiny_sd, EncoderPropagationConfig(key_steps=[0], parallel=True)):
        with pytest.raises(ValueError, match="parallel"):
            apply_block_skip(tiny_sd, skips)
    with block_skip(tiny_sd, skips):
        with pytest.raises(ValueError, match="parallel"):
            with encoder_propagation(tiny_sd, EncoderPropagationConfig(key_steps=[0], parallel=True)):
                pass


def test_skip_genes_respect_the_budget_and_the_per_step_bound():
    space = SearchSpace(4, 999, num_skips=5, num_layers=6, max_skips_per_step=2)
    g = torch.Generator().manual_seed(0)
    parents = [random_candidate(space, g) for _ in range(20)]
    assert all(space.contains(c) and len(c.skips) == 5 for c in parents)
    for a, b in zip(parents, parents[1:]):
        child = mutate(a, space, 0.5, g)
        assert child != a and len(child.skips) == 5 and len(set(child.skips)) == 5
        cross = crossover(a, b, g)
        assert cross is None or (len(cross.skips) == 5 and set(cross.skips) <= set(a.skips) | set(b.skips))
    too_many_at_step_0 = make_candidate(parents[0].timesteps, (), [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)])
    assert not space.contains(too_many_at_step_0)
    with pytest.raises(ValueError, match="num_skips"):
        SearchSpace(2, 999, num_skips=5, num_layers=6, max_skips_per_step=2)


def test_stage2_layer_skip_search_is_seeded_budgeted_and_applies():
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.eval.metrics import compute_stats
    from fastdiff.search.objectives import PipelineObjective
    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = compute_stats(torch.rand(8, 48, generator=torch.Generator().manual_seed(0)), {"extractor": "pixels"})

    def pixels(images):
        return torch.nn.functional.avg_pool2d(images, 16).reshape(len(images), -1)

    objective = PipelineObjective(pipe, pixels, reference, extractor="pixels", num_samples=2,
                                  pipe_kwargs={"height": 64, "width": 64}, per_image_kwargs={"prompt": ["a"] * 2})
    config = SearchConfig(max_evaluations=2, population_size=3, num_parents=2, num_skips=3, stage2_evaluations=4,
                          max_skip_fraction=0.1)
    result = search_timesteps(pipe, 3, objective, config)
    again = search_timesteps(pipe, 3, objective, config)
    assert (result.timesteps, result.skips, result.fitness) == (again.timesteps, again.skips, again.fitness)
    staged = [c for c in result.candidates if c.get("skips")]
    assert len(staged) == 4 and len({str(c) for c in result.candidates}) == len(result.candidates)
    per_step_cap = max(1, int(0.1 * len(skippable_layers(pipe.unet))))
    for c in staged:
        steps = [s for s, _ in c["skips"]]
        assert len(c["skips"]) == 3 and max(steps.count(s) for s in steps) <= per_step_cap
    # the skips change the images (the hooks really ran), through the objective and through the config
    candidate = make_candidate(result.timesteps, (), result.skips)
    skipped = objective.generate(candidate)
    assert not torch.equal(skipped, objective.generate(make_candidate(result.timesteps)))
    with block_skip(pipe, result.block_skip_config()):
        direct = objective.generate(make_candidate(result.timesteps))
    torch.testing.assert_close(direct, skipped, atol=0, rtol=0)
