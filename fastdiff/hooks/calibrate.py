"""Faster Diffusion / DeepCache key steps measured for a model: drift under reuse, a budgeted plan, then a check.

Faster Diffusion (arXiv 2312.09608) reuses encoder features at non-key steps, DeepCache (arXiv 2312.00858) the
deep branch of encoder and decoder; which steps can reuse them depends on the model. `calibrate_key_steps`
measures it on a few seeded full-UNet calls of the user's own pipeline:

- **drift**: at every step j >= 1 and every variant of the non-key step (recompute depth d = `recompute_shallow`,
  with or without `reuse_decoder`), the UNet output when the layers deeper than d are served from step j - 1,
  against the full output at step j (RMS over the output, mean over the batch rows): the error of reusing
  one-step-old features;
- **costs**: FLOPs of a key step and of a non-key step of each variant, counted once with
  `torch.utils.flop_counter.FlopCounterMode` on the pipeline's UNet at the inputs of the calibration call;
- **plan** (`plan_key_steps`, pure): reusing key step s's features at step j is predicted to cost
  ``w_j * (drift[s+1] + ... + drift[j])`` (one-step drifts accumulate along the gap), with ``w_j = 1``
  (`weighting="uniform"`) or the first-order effect of an output error at step j on the final sample
  (`weighting="sigma"`, `step_error_weights`); a dynamic programme picks the key steps with the least total
  predicted error among the plans whose FLOPs fit the budget, and `choose_plan` picks the variant whose best
  plan predicts the least error;
- **check** (`verify`): the prediction only ranks plans. The best-predicted candidates (per variant the planned
  key steps and DeepCache's uniform 1:I schedule, `uniform_plan`) are run on the calibration images, and the
  one whose final latents are closest to the full UNet's is returned. On the reference model (N = 500, 16
  budgets over DDIM-50 and DPM++-20) the check changed one choice: at DeepCache I=2 B=0's FLOPs on DDIM-50 it
  took DeepCache's uniform schedule, 0.76 dB closer to the full-UNet images than the planned one.

On the reference digit model (DDIM-50, N = 50) uniform weights gave plans 1-2 dB closer to the full-UNet
images at 0.90-0.93 of the FLOPs and sigma weights 0.3-0.7 dB closer at 0.78-0.80: the sigma weights ignore
that the sampler damps early errors, so uniform is the default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import SimpleNamespace
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook

from fastdiff.compose import apply, attachments
from fastdiff.hooks.encoder_propagation import EncoderPropagationConfig, Variant, encoder_layers

_INPUTS_HOOK = "fastdiff_calibrate_inputs"


# ---------------------------------------------------------------------------------------------- the maths
@dataclass
class KeyStepPlan:
    """A Faster Diffusion key-step plan: the key steps, their predicted error and FLOPs (fraction of full)."""

    key_steps: list[int]
    predicted_error: float
    flops_fraction: float


def max_key_steps(num_steps: int, key_cost: float, non_key_cost: float, flops_budget: float) -> int:
    """Faster Diffusion FLOPs budget: the most key steps with ``n key + (N - n) non-key <= budget * N key`` (pure).

    Exact rational arithmetic (costs are FLOP counts; the budget is read as its shortest decimal, 0.82 = 82/100),
    so a plan at the returned count never exceeds the budget; 0 when even step 0 alone does not fit.
    """
    if num_steps < 1 or key_cost <= 0 or non_key_cost < 0:
        raise ValueError("need num_steps >= 1, key_cost > 0 and non_key_cost >= 0.")
    key, non_key, budget = Fraction(key_cost), Fraction(non_key_cost), Fraction(repr(float(flops_budget)))
    if non_key >= key:
        return num_steps if budget * key >= non_key else 0
    n = math.floor((budget * num_steps * key - num_steps * non_key) / (key - non_key))
    return max(0, min(num_steps, n))


def step_error_weights(alpha_bars: Sequence[float], final_alpha_bar: float, prediction_type: str) -> list[float]:
    """DDIM in sigma form (Song et al. 2021): first-order effect of a UNet output error at each step on the sample.

    With ``sigma = sqrt((1 - a) / a)`` and ``x = z / sqrt(a)``, a deterministic step is
    ``x_prev = x + (sigma_prev - sigma) * eps``, so an epsilon error e moves the final sample by about
    ``(sigma - sigma_prev) * e``; a v error e is an epsilon error ``sqrt(a) * e``, an x0 error ``e / sigma``.
    `alpha_bars` are the cumulative alphas at the steps' timesteps; `final_alpha_bar` the one after the last.
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type {prediction_type!r}: use 'epsilon', 'v_prediction' or 'sample'.")
    bars = [float(a) for a in alpha_bars] + [float(final_alpha_bar)]
    if not all(0 < a <= 1 for a in bars):
        raise ValueError("alpha_bars must lie in (0, 1].")
    sigma = [math.sqrt((1 - a) / a) for a in bars]
    weights = []
    for j in range(len(alpha_bars)):
        gap = abs(sigma[j] - sigma[j + 1])
        scale = {"epsilon": 1.0, "v_prediction": math.sqrt(bars[j]), "sample": 1 / max(sigma[j], 1e-12)}
        weights.append(gap * scale[prediction_type])
    return weights


def _segment_errors(drift: Sequence[float], weights: Sequence[float]):
    """seg(s, e): predicted error of steps s+1 .. e-1 served from key step s (prefix sums: O(1) per segment)."""
    n = len(drift)
    acc = [0.0] * (n + 1)  # acc[j + 1] = drift[1] + ... + drift[j]
    w_sum = [0.0] * (n + 1)
    wd_sum = [0.0] * (n + 1)
    for j in range(n):
        acc[j + 1] = acc[j] + (drift[j] if j > 0 else 0.0)
        w_sum[j + 1] = w_sum[j] + weights[j]
        wd_sum[j + 1] = wd_sum[j] + weights[j] * acc[j + 1]

    def seg(s: int, e: int) -> float:
        # sum over j in (s, e) of w_j * (acc(j) - acc(s))
        return (wd_sum[e] - wd_sum[s + 1]) - acc[s + 1] * (w_sum[e] - w_sum[s + 1])

    return seg


def plan_key_steps(drift: Sequence[float], key_cost: float, non_key_cost: float, flops_budget: float,
                   weights: Sequence[float] | None = None) -> KeyStepPlan | None:
    """Faster Diffusion key steps by dynamic programming: least predicted reuse error within a FLOPs budget (pure).

    Args:
        drift: per step j (index 0 unused), the error of serving step j from step j - 1's encoder features.
        key_cost, non_key_cost: FLOPs of a key step and of a non-key step.
        flops_budget: the plan's FLOPs over the whole call, as a fraction of every step being a key step.
        weights: per step, how much an error there counts (default 1).

    Returns:
        The plan with step 0 and as many key steps as the budget allows, placed to minimise
        ``sum over non-key j of weights[j] * (drift[s+1] + ... + drift[j])`` (s = j's key step); None when
        even step 0 alone exceeds the budget.
    """
    n = len(drift)
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if n < 1 or len(weights) != n or min(drift[1:], default=0) < 0 or min(weights) < 0:
        raise ValueError("drift and weights need one non-negative value per step (at least one step).")
    k = max_key_steps(n, key_cost, non_key_cost, flops_budget)
    if k == 0:
        return None
    if k == n:
        return KeyStepPlan(list(range(n)), 0.0, 1.0)
    seg = _segment_errors(drift, weights)
    # best[e]: least error of steps 0..e-1 with m key steps, the last segment ending at e; back[m][e]: its last key
    best = [seg(0, e) if e > 0 else math.inf for e in range(n + 1)]
    back = [[0] * (n + 1)]
    for m in range(2, k + 1):
        nxt, arg = [math.inf] * (n + 1), [0] * (n + 1)
        for e in range(m, n + 1):
            for s in range(m - 1, e):
                value = best[s] + seg(s, e)
                if value < nxt[e]:
                    nxt[e], arg[e] = value, s
        best = nxt
        back.append(arg)
    keys, e = [], n
    for m in range(k, 1, -1):
        e = back[m - 1][e]
        keys.append(e)
    keys = [0, *sorted(keys)]
    flops = (len(keys) * key_cost + (n - len(keys)) * non_key_cost) / (n * key_cost)
    return KeyStepPlan(keys, float(best[n]), flops)


def predicted_error(key_steps: Sequence[int], drift: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Faster Diffusion reuse error of a key-step set under the drift model of `plan_key_steps` (pure)."""
    n = len(drift)
    seg = _segment_errors(drift, [1.0] * n if weights is None else weights)
    ends = [*key_steps[1:], n]
    return float(sum(seg(s, e) for s, e in zip(key_steps, ends)))


def uniform_plan(drift: Sequence[float], key_cost: float, non_key_cost: float, flops_budget: float,
                 weights: Sequence[float] | None = None) -> KeyStepPlan | None:
    """DeepCache's uniform 1:I schedule: key steps 0, I, 2I, ... with the smallest interval I that fits (pure)."""
    n = len(drift)
    most = max_key_steps(n, key_cost, non_key_cost, flops_budget)
    if most == 0:
        return None
    interval = next(i for i in range(1, n + 1) if math.ceil(n / i) <= most)
    keys = list(range(0, n, interval))
    flops = (len(keys) * key_cost + (n - len(keys)) * non_key_cost) / (n * key_cost)
    return KeyStepPlan(keys, predicted_error(keys, drift, weights), flops)


def choose_plan(drifts: Mapping[Any, Sequence[float]], key_cost: float, non_key_costs: Mapping[Any, float],
                flops_budget: float, weights: Sequence[float] | None = None) -> tuple[Any, KeyStepPlan]:
    """Faster Diffusion with shallow recompute / DeepCache's deep branch: the non-key variant (any sortable key of
    `drifts`, e.g. (recompute_shallow, reuse_decoder)) whose best plan predicts the least error within the budget
    (ties: the fewer FLOPs, then the smaller key); pure. Raises ValueError naming the least budget any variant meets."""
    found = []
    for variant in sorted(drifts):
        plan = plan_key_steps(drifts[variant], key_cost, non_key_costs[variant], flops_budget, weights)
        if plan is not None:
            found.append((plan.predicted_error, plan.flops_fraction, variant, plan))
    if not found:
        n = len(next(iter(drifts.values())))
        least = min((key_cost + (n - 1) * non_key_costs[v]) / (n * key_cost) for v in drifts)
        raise ValueError(
            f"flops_budget={flops_budget} is below the cheapest plan for this UNet ({least:.4f} of the full UNet's "
            f"FLOPs: step 0 full, every other step at the cheapest non-key step): use a budget of at least {least:.4f}."
        )
    _, _, variant, plan = min(found, key=lambda item: item[:3])
    return variant, plan


def variant_name(variant: Variant) -> str:
    """A non-key variant as text (JSON keys, tables): "2" = recompute_shallow=2, "2+decoder" = with reuse_decoder."""
    depth, reuse_decoder = variant
    return f"{depth}+decoder" if reuse_decoder else str(depth)


# ---------------------------------------------------------------------------------------- the measurement
@dataclass
class Calibration:
    """What `calibrate` measured and chose (the chosen config is `config`)."""

    config: EncoderPropagationConfig
    predicted_error: float
    flops_fraction: float
    num_steps: int
    drift: dict[Variant, list[float]]  # (depth, reuse_decoder) -> per-step drift of the UNet output (step 0: 0)
    weights: list[float]
    key_flops: int
    non_key_flops: dict[Variant, int]  # (depth, reuse_decoder) -> FLOPs of a non-key step
    seconds: float
    plans: dict[Variant, dict[str, Any]] = field(default_factory=dict)  # variant -> its best plan
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the plans run on the calibration images
    measured_error: float | None = None  # the chosen plan's final-latent RMS error on the calibration images

    def metadata(self) -> dict[str, Any]:
        """JSON-ready record of the measurement, for `EncoderPropagationConfig.to_json(path, calibration=...)`."""
        return {
            "num_steps": self.num_steps, "predicted_error": self.predicted_error,
            "flops_fraction": self.flops_fraction, "key_flops": self.key_flops,
            "non_key_flops": {variant_name(v): f for v, f in self.non_key_flops.items()}, "seconds": self.seconds,
            "weights": self.weights, "drift": {variant_name(v): d for v, d in self.drift.items()},
            "plans": {variant_name(v): p for v, p in self.plans.items()},
            "candidates": self.candidates, "measured_error": self.measured_error,
        }


class _FirstInputs(ModelHook):
    """Keeps the arguments of the UNet's first call (the inputs at which FLOPs are counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.call: tuple[tuple, dict] | None = None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.call is None:
            self.call = (args, dict(kwargs))
        return args, kwargs


class _DriftMeter:
    """Accumulates, per variant and step, the mean over rows of RMS(served output - full output)."""

    def __init__(self, variants: Sequence[Variant], num_steps: int) -> None:
        self.drift = {v: [0.0] * num_steps for v in variants}

    def __call__(self, step: int, served: dict[Variant, torch.Tensor], full: torch.Tensor) -> None:
        for variant, output in served.items():
            rms = (output.float() - full.float()).flatten(1).square().mean(1).sqrt()
            self.drift[variant][step] = float(rms.mean())


def _weights(scheduler: Any, num_steps: int, weighting: str) -> list[float]:
    """`step_error_weights` of the scheduler's last timesteps ("sigma"; uniform when it has no alphas_cumprod)."""
    bars = getattr(scheduler, "alphas_cumprod", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if weighting == "uniform" or bars is None or timesteps is None or len(timesteps) != num_steps:
        return [1.0] * num_steps
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        return [1.0] * num_steps
    at = [float(bars[int(t)]) for t in timesteps]
    final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
    return step_error_weights(at, final, prediction)


def _count_flops(unet: torch.nn.Module, call: tuple[tuple, dict],
                 variants: Sequence[Variant]) -> tuple[int, dict[Variant, int]]:
    """FlopCounterMode FLOPs of the UNet at `call`: a full forward, and a non-key forward of each variant."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = call
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    stub = SimpleNamespace(timesteps=torch.stack([torch.as_tensor(timestep)] * 2))  # a 2-step call: key, non-key
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(*args, **kwargs)
        key = counter.get_total_flops()
        non_key = {}
        for depth, reuse_decoder in variants:
            config = EncoderPropagationConfig(key_steps=[0], recompute_shallow=depth, reuse_decoder=reuse_decoder)
            with apply(unet, config, scheduler=stub):
                unet(*args, **kwargs)
                with FlopCounterMode(display=False) as counter:
                    unet(*args, **kwargs)
            non_key[(depth, reuse_decoder)] = counter.get_total_flops()
    return key, non_key


def _generators(seed: int, num_images: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]


def _measure(pipe, num_steps: int, variants: list[Variant], num_images: int, seed: int,
             call_kwargs: dict) -> tuple[dict[Variant, list[float]], tuple[tuple, dict], torch.Tensor]:
    """The seeded full-UNet call with drift probes of every variant; returns the drifts, the first UNet inputs and
    the final latents."""
    unet = pipe.unet
    meter = _DriftMeter(variants, num_steps)
    inputs = _FirstInputs()
    full = len(encoder_layers(unet))
    every_step = EncoderPropagationConfig(key_steps=1, recompute_shallow=full, reuse_decoder=True)
    with apply(pipe, every_step) as handle:
        handle["encoder_propagation"].set_probe(variants, meter)
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(inputs, _INPUTS_HOOK)
        try:
            with torch.no_grad():
                latents = pipe(num_inference_steps=num_steps, generator=_generators(seed, num_images),
                               **call_kwargs).images
        finally:
            unet._diffusers_hook.remove_hook(_INPUTS_HOOK, recurse=False)
    if inputs.call is None:
        raise ValueError("the pipeline never called its UNet: check call_kwargs.")
    return meter.drift, inputs.call, latents


def _final_error(pipe, config: EncoderPropagationConfig, num_steps: int, num_images: int, seed: int,
                 call_kwargs: dict, full: torch.Tensor) -> float:
    """Mean over the calibration images of RMS(final latents with `config` - the full UNet's final latents)."""
    with torch.no_grad(), apply(pipe, config):
        latents = pipe(num_inference_steps=num_steps, generator=_generators(seed, num_images), **call_kwargs).images
    return float((latents.float() - full.float()).flatten(1).square().mean(1).sqrt().mean())


def calibration_variants(layers: int, recompute_shallow: int | None = None,
                         reuse_decoder: bool | None = None) -> list[Variant]:
    """The non-key variants a calibration compares for an encoder of `layers` layers (pure).

    Encoder reuse at depths 0..layers (Faster Diffusion; `layers` recomputes the whole encoder, a full step), and
    deep-branch reuse (DeepCache) at depths 0..layers - 2 (at layers - 1 and deeper no decoder layer is replayed:
    the same step as encoder reuse); `recompute_shallow` / `reuse_decoder` fix either choice.
    """
    variants = [(d, False) for d in range(layers + 1)] + [(d, True) for d in range(max(0, layers - 1))]
    return [(d, r) for d, r in variants
            if (recompute_shallow is None or d == recompute_shallow) and (reuse_decoder is None or r == reuse_decoder)]


def candidate_plans(drift: Mapping[Variant, Sequence[float]], key_cost: float,
                    non_key_costs: Mapping[Variant, float], flops_budget: float, weights: Sequence[float] | None,
                    limit: int) -> list[tuple[Variant, KeyStepPlan]]:
    """Faster Diffusion / DeepCache plans worth running: per variant its planned key steps and its uniform 1:I
    schedule, without repeats, the `limit` with least predicted error first (ties: fewer FLOPs); pure."""
    found: dict[tuple[Variant, tuple[int, ...]], KeyStepPlan] = {}
    for variant in sorted(drift):
        for make in (plan_key_steps, uniform_plan):
            plan = make(drift[variant], key_cost, non_key_costs[variant], flops_budget, weights)
            if plan is not None:
                found.setdefault((variant, tuple(plan.key_steps)), plan)
    ranked = sorted(found.items(), key=lambda item: (item[1].predicted_error, item[1].flops_fraction, item[0]))
    return [(variant, plan) for (variant, _), plan in ranked[:limit]]


def calibrate(pipe, num_inference_steps: int, flops_budget: float, num_images: int = 4, *,
              recompute_shallow: int | None = None, reuse_decoder: bool | None = None, seed: int = 0,
              weighting: Literal["uniform", "sigma"] = "uniform", verify: int = 8, **call_kwargs: Any) -> Calibration:
    """Faster Diffusion key steps (and non-key variant) measured for `pipe`'s UNet; see `calibrate_key_steps`.

    Returns the whole measurement (`Calibration`): the chosen config, the drift table, the FLOPs, the plans and
    the candidates run on the calibration images.
    """
    start = time.perf_counter()
    _check(pipe, num_inference_steps, flops_budget, num_images, call_kwargs)
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise ValueError(f"verify={verify!r} must be an int >= 0 (plans run on the calibration images; 0 = none).")
    if weighting not in ("uniform", "sigma"):
        raise ValueError(f"weighting={weighting!r}: use 'uniform' or 'sigma'.")
    if reuse_decoder is not None and not isinstance(reuse_decoder, bool):
        raise ValueError(f"reuse_decoder={reuse_decoder!r}: use True, False or None (try both).")
    layers = len(encoder_layers(pipe.unet))
    if recompute_shallow is not None and (not isinstance(recompute_shallow, int) or
                                          not 0 <= recompute_shallow <= layers):
        raise ValueError(f"recompute_shallow={recompute_shallow!r}: this UNet's encoder has {layers} layers, use "
                         f"0-{layers} or None (choose the depth).")
    variants = calibration_variants(layers, recompute_shallow, reuse_decoder)
    if not variants:
        raise ValueError(f"reuse_decoder=True needs recompute_shallow <= {layers - 2} on this UNet (deeper, no "
                         "decoder layer is replayed): use a shallower depth or reuse_decoder=None.")
    probed = [v for v in variants if v[0] < layers]  # at the full depth a non-key step is the full UNet: no drift
    call_kwargs = {"output_type": "latent", **call_kwargs}
    drift, call, full = _measure(pipe, num_inference_steps, probed, num_images, seed, call_kwargs)
    drift.update({v: [0.0] * num_inference_steps for v in variants if v[0] == layers})
    key, non_key = _count_flops(pipe.unet, call, variants)
    weights = _weights(pipe.scheduler, num_inference_steps, weighting)
    (depth, decoder), plan = choose_plan(drift, key, non_key, flops_budget, weights)
    candidates, measured = [], None
    for (d, r), p in candidate_plans(drift, key, non_key, flops_budget, weights, verify):
        config = EncoderPropagationConfig(key_steps=p.key_steps, recompute_shallow=d, reuse_decoder=r)
        error = _final_error(pipe, config, num_inference_steps, num_images, seed, call_kwargs, full)
        candidates.append({"variant": variant_name((d, r)), "key_steps": p.key_steps,
                           "flops_fraction": p.flops_fraction, "predicted_error": p.predicted_error,
                           "measured_error": error})
        if measured is None or error < measured:
            (depth, decoder), plan, measured = (d, r), p, error
    plans = {}
    for v in variants:
        p = plan_key_steps(drift[v], key, non_key[v], flops_budget, weights)
        if p is not None:
            plans[v] = {"key_steps": p.key_steps, "predicted_error": p.predicted_error,
                        "flops_fraction": p.flops_fraction}
    config = EncoderPropagationConfig(key_steps=plan.key_steps, recompute_shallow=depth, reuse_decoder=decoder)
    return Calibration(config, plan.predicted_error, plan.flops_fraction, num_inference_steps, drift, weights, key,
                       non_key, time.perf_counter() - start, plans, candidates, measured)


def _check(pipe, num_steps: int, flops_budget: float, num_images: int, call_kwargs: dict) -> None:
    """Every argument error of `calibrate`, raised before any UNet call."""
    from diffusers import UNet2DConditionModel

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) or not hasattr(pipe, "scheduler"):
        raise ValueError("calibrate_key_steps needs a diffusers pipeline with a UNet2DConditionModel as pipe.unet.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps={num_steps!r} must be an int >= 1.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if not isinstance(flops_budget, (int, float)) or not 0 < flops_budget:
        raise ValueError(f"flops_budget={flops_budget!r} must be a fraction > 0 of the full UNet's FLOPs (e.g. 0.75).")
    taken = {"num_inference_steps", "generator", "timesteps"} & set(call_kwargs)
    if taken:
        raise ValueError(f"{sorted(taken)} are set by calibrate_key_steps: pass num_inference_steps (and seed).")
    if attachments(pipe):
        raise ValueError("calibrate on a pipeline without fastdiff accelerators: fastdiff.remove(pipe) first.")


def calibrate_key_steps(pipe, num_inference_steps: int, flops_budget: float, num_images: int = 4, *,
                        recompute_shallow: int | None = None, reuse_decoder: bool | None = None, seed: int = 0,
                        weighting: Literal["uniform", "sigma"] = "uniform", verify: int = 8,
                        **call_kwargs: Any) -> EncoderPropagationConfig:
    """Faster Diffusion (arXiv 2312.09608) key steps measured for this pipeline's UNet within a FLOPs budget.

    Runs one seeded full-UNet call of `num_images` images (image i: seed `seed + i`), measures how far the UNet
    output moves when features are one step old (each `recompute_shallow` depth, with and without the deep decoder
    replayed as well: `reuse_decoder`), counts FLOPs with
    FlopCounterMode at the call's inputs, and plans key steps for each variant whose UNet FLOPs over a
    `num_inference_steps` call are at most `flops_budget` times the full UNet's. The `verify` plans with least
    predicted error (planned key steps and DeepCache's uniform 1:I schedules) then run on the same images, and
    the one whose final latents are closest to the full UNet's is returned. Step 0 is always a key step.

    Args:
        pipe: a diffusers pipeline with `.unet` (a `UNet2DConditionModel`) and the scheduler it will sample with.
        num_inference_steps: the step count the plan is for.
        flops_budget: fraction of the full UNet's FLOPs over the whole call (e.g. 0.75).
        num_images: images of the calibration call.
        recompute_shallow: a fixed depth, or None to choose it (0 = replay the whole encoder).
        reuse_decoder: also replay the deep decoder at non-key steps (DeepCache's branch: True), not (False), or
            None to compare both and take the better plan.
        seed: the first image's seed.
        weighting: how an error counts per step: `"uniform"`, or `"sigma"` (its first-order effect on the sample).
        verify: how many candidate plans to run on the calibration images (0: trust the prediction alone).
        **call_kwargs: passed to the pipeline (class_labels, prompt, guidance_scale, height, ...), one entry per image.

    Raises:
        ValueError: bad arguments, or a budget below the cheapest plan (the message gives the least budget).

    Example:
        >>> from fastdiff.models import load_reference_pipeline
        >>> pipe = load_reference_pipeline()
        >>> config = calibrate_key_steps(pipe, 50, 0.9, class_labels=[1, 4, 7, 9], guidance_scale=1.0)
        >>> with fastdiff.apply(pipe, config):
        ...     images = pipe(class_labels=[3], guidance_scale=1.0, num_inference_steps=50).images
    """
    return calibrate(pipe, num_inference_steps, flops_budget, num_images, recompute_shallow=recompute_shallow,
                     reuse_decoder=reuse_decoder, seed=seed, weighting=weighting, verify=verify, **call_kwargs).config
