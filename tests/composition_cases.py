"""The stacks of tests/test_composition.py, defined once: run in the test process and in its torchrun workers.

Members of a stack (any subset, applied in the order given, one `fastdiff.apply` each):
- "dpm": fastdiff's DPM-Solver++ (SDE variant under SVDD, which needs a stochastic step) with `timesteps=`;
  without it the stack samples with DDIM (DDPM under SVDD) for `STEPS` steps;
- "ep" / "ep_parallel": encoder propagation with sparse key steps, sequential / parallel decoding;
- "ep_shallow": the same key steps with shallow recompute (conv_in and two encoder layers run at every step);
- "ep_deep": the same key steps with DeepCache's deep-branch reuse (conv_in, one encoder layer and the two decoder
  layers that read their skips run at every step);
- "block_skip": AutoDiffusion layer skips at three steps;
- "svdd1", "svdd3" (SVDD-PM with M = 1, 3), "svdd3_mc" (SVDD-MC, M = 3, a fixed value function), and
  each with "_chunked" (max_batch = 1): `svdd_sample` instead of `pipe(...)`;
- "sde": no accelerator: only the stochastic scheduler SVDD would use (the reference of SVDD with M = 1);
- "pp": patch parallelism (only under torchrun; its config and group are passed separately).
"""

from __future__ import annotations

from typing import Any

import torch

import fastdiff
from fastdiff.guidance import SVDDConfig, svdd_sample
from fastdiff.hooks import BlockSkipConfig, EncoderPropagationConfig
from fastdiff.schedulers import DPMSolverPlusPlusScheduler

STEPS = 6
TIMESTEPS = [999, 850, 700, 500, 300, 100]
HOOKS = {
    "ep": EncoderPropagationConfig(key_steps=[0, 1, 3]),
    "ep_all_keys": EncoderPropagationConfig(key_steps=1),
    "ep_parallel": EncoderPropagationConfig(key_steps=[0, 1, 3], parallel=True),
    "ep_shallow": EncoderPropagationConfig(key_steps=[0, 1, 3], recompute_shallow=2),
    "ep_shallow_all_keys": EncoderPropagationConfig(key_steps=1, recompute_shallow=2),
    "ep_deep": EncoderPropagationConfig(key_steps=[0, 1, 3], recompute_shallow=1, reuse_decoder=True),
    "ep_deep_all_keys": EncoderPropagationConfig(key_steps=1, recompute_shallow=1, reuse_decoder=True),
    "block_skip": BlockSkipConfig(skips=[(1, 0), (2, 3), (4, 5)]),
}


def _value(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return -latents.float().square().mean(dim=(1, 2, 3))


def _brightness(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(dim=(1, 2, 3))


SVDD = {
    "svdd1": dict(num_candidates=1),
    "svdd3": dict(num_candidates=3),
    "svdd1_chunked": dict(num_candidates=1, max_batch=1),
    "svdd3_chunked": dict(num_candidates=3, max_batch=1),
    "svdd3_mc": dict(num_candidates=3, variant="mc", value_fn=_value),
    "svdd3_mc_chunked": dict(num_candidates=3, max_batch=1, variant="mc", value_fn=_value),
}


def pipeline(kind: str):
    """The shipped reference pipeline or the tiny random-weight SD pipeline, progress bars off."""
    if kind == "reference":
        from fastdiff.models import load_reference_pipeline

        pipe = load_reference_pipeline()
    else:
        from fastdiff.testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(kind: str, guidance: float) -> dict[str, Any]:
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    if kind == "reference":
        return dict(class_labels=[3, 7], guidance_scale=guidance, generator=generator)
    return dict(prompt=["a red cube", "a blue sky"], guidance_scale=guidance, height=32, width=32,
                generator=generator)


def set_scheduler(pipe, members: tuple[str, ...], base_config) -> dict[str, Any]:
    """Swap in the stack's scheduler (from the pipeline's original config); return the step arguments."""
    from diffusers import DDIMScheduler, DDPMScheduler

    stochastic = any(m.startswith("svdd") or m == "sde" for m in members)
    if "dpm" in members:
        algorithm = "sde-dpmsolver++" if stochastic else "dpmsolver++"
        pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(base_config, algorithm_type=algorithm)
        return {"timesteps": TIMESTEPS}
    pipe.scheduler = (DDPMScheduler if stochastic else DDIMScheduler).from_config(base_config)
    return {"num_inference_steps": STEPS}


def run(pipe, kind: str, guidance: float, members: tuple[str, ...], *, pp: Any = None, group: Any = None,
        pp_first: bool = False, base_config=None) -> torch.Tensor:
    """Images (2, C, H, W) of one stack: scheduler, then the hooks in `members` order (PP first or last)."""
    original = pipe.scheduler
    steps = set_scheduler(pipe, members, base_config or original.config)
    handles = []
    try:
        if pp is not None and pp_first:
            handles.append(fastdiff.apply(pipe, pp, group=group))
        for member in members:
            if member in HOOKS:
                handles.append(fastdiff.apply(pipe, HOOKS[member]))
        if pp is not None and not pp_first:
            handles.append(fastdiff.apply(pipe, pp, group=group))
        kwargs = {**call_kwargs(kind, guidance), **steps}
        svdd = [m for m in members if m in SVDD]
        if svdd:
            config = SVDDConfig(**SVDD[svdd[0]], show_progress=False)
            return svdd_sample(pipe, _brightness, config, **kwargs, output_type="pt").images
        return pipe(**kwargs, output_type="pt").images
    finally:
        for handle in reversed(handles):
            handle.remove()
        pipe.scheduler = original
