"""Flow-matching detection (rectified-flow models such as SD3 and Flux, Esser et al. 2024), so that features built
for VP diffusion models refuse such pipelines up front instead of failing inside the sampling loop."""

from __future__ import annotations

from typing import Any


def flow_matching_reason(pipe: Any) -> str | None:
    """Why `pipe` (a pipeline, or a bare model such as `GaussianMixtureDenoiser`) is a flow-matching one; None if
    it is not: a FlowMatch* scheduler, a scheduler with `use_flow_sigmas` / `prediction_type="flow_prediction"`, or
    a model that predicts flow velocities."""
    if getattr(pipe, "prediction_type", None) == "flow_prediction":
        return f"{type(pipe).__name__} predicts flow velocities (prediction_type='flow_prediction')"
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return None
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return f"its scheduler is {name}"
    config = getattr(scheduler, "config", {}) or {}
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return f"its scheduler {name} has use_flow_sigmas=True / prediction_type='flow_prediction'"
    return None


def refuse_flow_matching(pipe: Any, feature: str, missing: str) -> None:
    """Raise ValueError naming `feature`, why `pipe` is flow matching, and what `feature` lacks for it."""
    reason = flow_matching_reason(pipe)
    if reason is not None:
        raise ValueError(
            f"{feature} does not support flow-matching pipelines ({type(pipe).__name__}: {reason}). Missing: "
            f"{missing}. Use it with a VP diffusion (UNet) pipeline; for SD3 / Flux, sample with "
            "DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True, "
            "prediction_type='flow_prediction') and num_inference_steps."
        )
