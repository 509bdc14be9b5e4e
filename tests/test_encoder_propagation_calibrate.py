"""Shallow recompute and key-step calibration for encoder propagation, checked against the plain UNet,
FlopCounterMode counts, diffusers' DDIM step and a brute-force search over every key-step set."""

from __future__ import annotations

import inspect
import itertools
import json
import random
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff.hooks import EncoderPropagationConfig, calibrate_key_steps, encoder_layers, encoder_propagation
from fastdiff.hooks.calibrate import (
    calibrate,
    calibration_variants,
    candidate_plans,
    choose_plan,
    max_key_steps,
    plan_key_steps,
    predicted_error,
    step_error_weights,
    uniform_plan,
)

STEPS = 6


@pytest.fixture(scope="module")
def reference():
    """The reference pipeline's architecture with fresh random weights (fast), DDIM."""
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    pipe = ReferencePipeline(unet=build_reference_unet().eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sd_pipe():
    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, kind: str, steps: int = STEPS, **extra):
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    if kind == "reference":
        kwargs = dict(class_labels=[3, 7], guidance_scale=extra.pop("guidance_scale", 3.0))
    else:
        kwargs = dict(prompt=["a red cube", "a blue sky"], height=32, width=32)
    return pipe(**kwargs, num_inference_steps=steps, generator=generator, output_type="latent", **extra).images


def _unet_outputs(pipe, kind: str, config: EncoderPropagationConfig | None):
    """Final latents and the UNet output of every step (a plain torch hook outside every diffusers hook)."""
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].clone()))
    try:
        if config is None:
            return _call(pipe, kind), outputs
        with encoder_propagation(pipe, config):
            return _call(pipe, kind), outputs
    finally:
        handle.remove()


# --- shallow recompute: exact at the ends of the ladder -------------------------------------------------------


@pytest.mark.parametrize("kind", ["reference", "tiny_sd"])
def test_shallow_recompute_ends_of_the_ladder_are_the_plain_unet(kind, reference, tiny_sd_pipe):
    pipe = reference if kind == "reference" else tiny_sd_pipe
    layers = len(encoder_layers(pipe.unet))
    plain, plain_outputs = _unet_outputs(pipe, kind, None)
    signature = inspect.signature(pipe.unet.forward)
    for k in (1, layers):  # every step a key step: nothing is replayed, whatever the depth
        assert torch.equal(_unet_outputs(pipe, kind, EncoderPropagationConfig(key_steps=1, recompute_shallow=k))[0],
                           plain)
    # sparse key steps, but every layer recomputed: the UNet output of every step is the plain one
    latents, outputs = _unet_outputs(pipe, kind, EncoderPropagationConfig(key_steps=[0, 3], recompute_shallow=layers))
    assert len(outputs) == STEPS and all(torch.equal(a, b) for a, b in zip(outputs, plain_outputs))
    assert torch.equal(latents, plain)
    # in between, each depth really acts, and differently
    results = [_unet_outputs(pipe, kind, EncoderPropagationConfig(key_steps=[0, 3], recompute_shallow=k))[0]
               for k in (0, 1, 2)]
    assert not torch.equal(results[0], plain) and not torch.equal(results[1], results[0])
    assert not torch.equal(results[2], results[1])
    # removal restores the plain pipeline
    assert torch.equal(_call(pipe, kind), plain)
    assert inspect.signature(pipe.unet.forward) == signature
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.unet.modules())


def test_recomputed_layers_read_the_current_latent(tiny_sd_pipe):
    """A non-key step depends on the latent with recompute_shallow > 0 (and not with 0: the paper's non-key step)."""
    unet, scheduler = tiny_sd_pipe.unet, DDIMScheduler.from_config(tiny_sd_pipe.scheduler.config)
    x0, x1, ehs = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    changed = {}
    for k in (0, 1):
        outs = []
        with torch.no_grad(), encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0], recompute_shallow=k),
                                                  scheduler=scheduler):
            for perturbation in (0.0, 1.0):
                scheduler.set_timesteps(4)
                unet(x0, scheduler.timesteps[0], ehs)
                outs.append(unet(x1 + perturbation, scheduler.timesteps[1], ehs).sample)
        changed[k] = not torch.equal(outs[0], outs[1])
    assert changed == {0: False, 1: True}


def test_non_key_flops_climb_the_ladder_to_the_full_unet(reference):
    """FlopCounterMode: a non-key step costs more with each recomputed layer, and the whole ladder costs a full step."""
    unet = reference.unet
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 1, 11)
    labels = torch.tensor([3, 10])
    t = torch.tensor(500)
    stub = SimpleNamespace(timesteps=torch.tensor([500, 500]))

    def flops(config=None) -> int:
        with torch.no_grad():
            if config is None:
                with FlopCounterMode(display=False) as counter:
                    unet(x, t, ehs, class_labels=labels)
                return counter.get_total_flops()
            with fastdiff.apply(unet, config, scheduler=stub):
                unet(x, t, ehs, class_labels=labels)
                with FlopCounterMode(display=False) as counter:
                    unet(x, t, ehs, class_labels=labels)
            return counter.get_total_flops()

    layers = len(encoder_layers(unet))
    ladder = [flops(EncoderPropagationConfig(key_steps=[0], recompute_shallow=k)) for k in range(layers + 1)]
    assert all(a < b for a, b in zip(ladder, ladder[1:]))
    assert ladder[-1] == flops()


def test_shallow_recompute_refusals(reference):
    with pytest.raises(ValueError, match="parallel=False"):
        EncoderPropagationConfig(key_steps=2, parallel=True, recompute_shallow=1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="recompute_shallow"):
            EncoderPropagationConfig(key_steps=2, recompute_shallow=bad)
    layers = len(encoder_layers(reference.unet))
    with pytest.raises(ValueError, match=f"has {layers} layers"):
        fastdiff.apply(reference, EncoderPropagationConfig(key_steps=2, recompute_shallow=layers + 1))
    assert fastdiff.compose.attachments(reference) == {}


def test_encoder_layers_of_the_reference_unet(reference):
    names = [name for name, _ in encoder_layers(reference.unet)]
    assert names == ["down_blocks.0.layers.0", "down_blocks.0.downsamplers", "down_blocks.1.layers.0",
                     "down_blocks.1.downsamplers", "down_blocks.2.layers.0", "mid_block"]


# --- the planner (pure) against brute force ------------------------------------------------------------------


def _brute_force(drift, weights, key_cost, non_key_cost, budget):
    """The least-error key set among all sets with step 0 and the most key steps that fit (the definition)."""
    n = len(drift)
    fits = [m for m in range(1, n + 1) if m * key_cost + (n - m) * non_key_cost <= budget * n * key_cost]
    if not fits:
        return None
    best = None
    for rest in itertools.combinations(range(1, n), max(fits) - 1):
        keys = (0, *rest)
        error = 0.0
        for j in range(n):
            s = max(k for k in keys if k <= j)
            error += weights[j] * sum(drift[s + 1 : j + 1])
        if best is None or error < best[0] - 1e-12:
            best = (error, list(keys))
    return best


def test_plan_equals_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 8)
        drift = [0.0] + [rng.random() for _ in range(n - 1)]
        weights = [rng.random() for _ in range(n)]
        key, non_key = 100, rng.randint(50, 90)
        budget = rng.uniform(0.5, 1.0)
        plan = plan_key_steps(drift, key, non_key, budget, weights)
        expected = _brute_force(drift, weights, key, non_key, budget)
        if expected is None:
            assert plan is None
            continue
        assert plan.key_steps[0] == 0
        assert plan.predicted_error == pytest.approx(expected[0], abs=1e-9)
        assert len(plan.key_steps) == len(expected[1])
        assert plan.flops_fraction <= budget


def test_predicted_error_of_a_key_set_is_the_planner_objective():
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(2, 8)
        drift = [0.0] + [rng.random() for _ in range(n - 1)]
        weights = [rng.random() for _ in range(n)]
        plan = plan_key_steps(drift, 100, 60, rng.uniform(0.8, 0.95), weights)  # 0.8: step 0 and one more fit
        assert predicted_error(plan.key_steps, drift, weights) == pytest.approx(plan.predicted_error, abs=1e-9)
        keys = sorted({0, *rng.sample(range(1, n), rng.randint(0, n - 1))})  # any key set, by the definition
        direct = sum(weights[j] * sum(drift[max(k for k in keys if k <= j) + 1 : j + 1]) for j in range(n))
        assert predicted_error(keys, drift, weights) == pytest.approx(direct, abs=1e-9)


def test_uniform_plan_is_deepcache_schedule_with_the_smallest_interval_that_fits():
    drift = [0.0] + [0.1] * 9
    # 10 steps, key 10, non-key 2: m key steps cost (10m + 2(10 - m)) / 100; budget 0.6 allows m <= 5
    plan = uniform_plan(drift, 10, 2, 0.6)
    assert plan.key_steps == [0, 2, 4, 6, 8] and plan.flops_fraction == pytest.approx(0.6)
    assert uniform_plan(drift, 10, 2, 0.59).key_steps == [0, 3, 6, 9]  # 5 no longer fits: interval 3
    assert uniform_plan(drift, 10, 2, 1.0).key_steps == list(range(10))
    assert uniform_plan(drift, 10, 2, 0.1) is None
    assert plan.predicted_error == pytest.approx(predicted_error(plan.key_steps, drift))


def test_candidate_plans_rank_planned_and_uniform_schedules():
    drifts = {(0, False): [0, 1, 1, 1, 1, 1], (1, True): [0, 0.1, 0.5, 0.1, 0.5, 0.1]}
    costs = {(0, False): 7, (1, True): 2}
    found = candidate_plans(drifts, 10, costs, 0.7, None, limit=10)
    errors = [plan.predicted_error for _, plan in found]
    assert errors == sorted(errors)
    assert ((1, True), [0, 2, 4]) in [(v, p.key_steps) for v, p in found]  # the uniform 1:2 schedule
    assert len({(v, tuple(p.key_steps)) for v, p in found}) == len(found)  # no plan twice
    assert all(p.flops_fraction <= 0.7 for _, p in found)
    assert found[:1] == candidate_plans(drifts, 10, costs, 0.7, None, limit=1)


def test_max_key_steps_is_exact_at_the_boundary():
    # 10 steps, key 10, non-key 7: n key steps cost 70 + 3n, budget 0.82 * 100 = 82 -> n = 4
    assert max_key_steps(10, 10, 7, 0.82) == 4
    assert max_key_steps(10, 10, 7, 0.8199) == 3
    assert max_key_steps(10, 10, 7, 0.70) == 0
    assert max_key_steps(10, 10, 10, 1.0) == 10 and max_key_steps(10, 10, 10, 0.99) == 0


def test_choose_plan_prefers_the_depth_with_less_predicted_error():
    drifts = {0: [0, 1, 1, 1], 1: [0, 0.1, 0.1, 0.1]}
    depth, plan = choose_plan(drifts, 10, {0: 7, 1: 8}, 0.9)  # depth 1: 2 key steps; depth 0: 2 key steps
    assert depth == 1 and plan.key_steps[0] == 0
    with pytest.raises(ValueError, match="at least 0.7750"):
        choose_plan(drifts, 10, {0: 7, 1: 8}, 0.7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_error_weights_match_ddim(prediction_type):
    """An output error e at step j moves diffusers' DDIM update, in x = z / sqrt(alpha_bar_prev), by weight_j * e."""
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    bars = [float(scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps]
    weights = step_error_weights(bars, float(scheduler.final_alpha_cumprod), prediction_type)
    z, out, e = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64), 1e-3
    for j, t in enumerate(scheduler.timesteps):
        last = j + 1 == len(scheduler.timesteps)
        a_prev = scheduler.final_alpha_cumprod if last else scheduler.alphas_cumprod[int(scheduler.timesteps[j + 1])]
        a_prev = float(a_prev)
        a = scheduler.step(out, t, z).prev_sample
        b = scheduler.step(out + e, t, z).prev_sample
        moved = ((b - a) / a_prev**0.5).abs().mean().item() / e
        assert moved == pytest.approx(weights[j], rel=1e-6)


# --- calibration on a real pipeline --------------------------------------------------------------------------


def _call_flops(pipe, config=None) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if config is None:
            _call(pipe, "reference", guidance_scale=1.0)
        else:
            with fastdiff.apply(pipe, config):
                _call(pipe, "reference", guidance_scale=1.0)
    return counter.get_total_flops()


def _assert_within_budget(pipe, result, budget: float) -> None:
    full = _call_flops(pipe)
    counted = _call_flops(pipe, result.config) / full  # FlopCounterMode over a real call
    assert result.config.key_steps[0] == 0 and counted <= budget
    assert counted == pytest.approx(result.flops_fraction, rel=1e-9)  # the plan's count is the real one
    assert counted > budget - 0.1  # the budget is used, not wasted
    assert fastdiff.compose.attachments(pipe) == {}


def test_calibration_chooses_a_depth_within_the_budget(reference):
    chosen = calibrate(reference, STEPS, 0.9, num_images=2, class_labels=[3, 7], guidance_scale=1.0)
    assert set(chosen.drift) == set(calibration_variants(len(encoder_layers(reference.unet))))
    _assert_within_budget(reference, chosen, 0.9)


def test_calibration_returns_the_candidate_closest_to_the_full_unet(reference):
    """The measured errors are those of the plain pipeline against the hooked one, and the least one is chosen."""
    kwargs = dict(class_labels=[3, 7], guidance_scale=1.0)
    result = calibrate(reference, STEPS, 0.6, num_images=2, verify=4, **kwargs)
    assert 1 <= len(result.candidates) <= 4
    assert result.measured_error == min(c["measured_error"] for c in result.candidates)
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    plain = reference(**kwargs, num_inference_steps=STEPS, generator=generator, output_type="latent").images
    with fastdiff.apply(reference, result.config):
        generator = [torch.Generator().manual_seed(i) for i in range(2)]
        hooked = reference(**kwargs, num_inference_steps=STEPS, generator=generator, output_type="latent").images
    rms = float((hooked - plain).flatten(1).square().mean(1).sqrt().mean())
    assert rms == pytest.approx(result.measured_error, rel=1e-5)
    unchecked = calibrate(reference, STEPS, 0.6, num_images=2, verify=0, **kwargs)
    assert unchecked.candidates == [] and unchecked.measured_error is None
    drift, non_key = unchecked.drift, unchecked.non_key_flops
    variant, plan = choose_plan(drift, unchecked.key_flops, non_key, 0.6, unchecked.weights)
    assert (unchecked.config.recompute_shallow, unchecked.config.reuse_decoder) == variant
    assert unchecked.config.key_steps == plan.key_steps
    with pytest.raises(ValueError, match="verify"):
        calibrate(reference, STEPS, 0.6, verify=-1)


def test_calibration_is_seeded_and_deterministic(reference):
    kwargs = dict(class_labels=[3, 7], guidance_scale=1.0, recompute_shallow=2)
    fixed = calibrate(reference, STEPS, 0.85, num_images=2, **kwargs)
    again = calibrate(reference, STEPS, 0.85, num_images=2, **kwargs)
    assert fixed.config == again.config and fixed.drift == again.drift and fixed.config.recompute_shallow == 2
    other = calibrate(reference, STEPS, 0.85, num_images=2, seed=5, **kwargs)
    assert other.drift != fixed.drift  # the seed matters
    _assert_within_budget(reference, fixed, 0.85)


def test_calibration_refuses_before_any_unet_call(reference):
    calls = []
    handle = reference.unet.conv_in.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for kwargs, match in (({"flops_budget": 0}, "flops_budget"), ({"num_inference_steps": 0}, "num_inference"),
                              ({"num_images": 0}, "num_images"), ({"recompute_shallow": 99}, "layers"),
                              ({"generator": None}, "set by calibrate_key_steps")):
            args = {"num_inference_steps": 10, "flops_budget": 0.9, **kwargs}
            with pytest.raises(ValueError, match=match):
                calibrate_key_steps(reference, **args)
        with fastdiff.apply(reference, EncoderPropagationConfig(key_steps=2)):
            with pytest.raises(ValueError, match="fastdiff.remove"):
                calibrate_key_steps(reference, 10, 0.9)
        assert calls == []
        with pytest.raises(ValueError, match="at least"):  # measured first: the least budget needs the FLOPs
            calibrate_key_steps(reference, 4, 0.5, num_images=1, recompute_shallow=0, reuse_decoder=False,
                                class_labels=[3])
    finally:
        handle.remove()


# --- the config as a file: sweeps, `fastdiff sample`, `fastdiff calibrate` ---------------------------------------


def test_config_json_round_trip_and_method_spec(tmp_path):
    from fastdiff.eval.methods import MethodSpec
    from fastdiff.eval.sweep import load_sweep

    config = EncoderPropagationConfig(key_steps=[0, 2, 5], recompute_shallow=1)
    path = config.to_json(tmp_path / "ep.json", calibration={"predicted_error": 0.1})
    assert EncoderPropagationConfig.from_json(path) == config
    (tmp_path / "plain.json").write_text(json.dumps({"key_steps": 3}))
    assert EncoderPropagationConfig.from_json(tmp_path / "plain.json") == EncoderPropagationConfig(key_steps=3)
    (tmp_path / "bad.json").write_text(json.dumps({"key_steps": 3, "nonsense": 1}))
    with pytest.raises(ValueError, match="key_steps and any of"):
        EncoderPropagationConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        EncoderPropagationConfig.from_json(tmp_path / "missing.json")
    spec = MethodSpec(name="calibrated", steps=10, encoder_propagation=str(path))
    assert spec.accelerator_configs() == [config]
    (tmp_path / "sweep.toml").write_text(
        '[[methods]]\nname = "calibrated"\nsteps = 10\nencoder_propagation = "ep.json"\n')
    assert load_sweep(tmp_path / "sweep.toml").methods[0].accelerator_configs() == [config]


def test_calibrate_command_writes_a_config(tmp_path):
    from fastdiff import cli

    out = tmp_path / "ep.json"
    code = cli.main(["calibrate", "--steps", "6", "--budget", "0.95", "--num-images", "1", "--guidance", "1.0",
                     "--recompute-shallow", "0", "--reuse-decoder", "no", "--out", str(out)])
    assert code == 0
    config = EncoderPropagationConfig.from_json(out)
    assert config.key_steps[0] == 0
    record = json.loads(out.read_text())
    assert record["calibration"]["flops_fraction"] <= 0.95
    assert not config.reuse_decoder
    code = cli.main(["calibrate", "--steps", "6", "--budget", "0.5", "--num-images", "1", "--guidance", "1.0",
                     "--reuse-decoder", "yes", "--out", str(out)])
    assert code == 0 and EncoderPropagationConfig.from_json(out).reuse_decoder
    assert cli.main(["calibrate", "--steps", "6", "--budget", "0.5", "--reuse-decoder", "no",
                     "--out", str(tmp_path / "x.json")]) == 2  # encoder reuse alone cannot reach 0.5
    assert cli.main(["calibrate", "--steps", "6", "--budget", "0.01", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
