"""Offline test fixtures: tiny random-weight diffusers pipelines and an exact Gaussian-mixture denoiser."""

from fastdiff.testing.gaussian_mixture import GaussianMixtureDenoiser
from fastdiff.testing.tiny_pipelines import (
    tiny_clip_tokenizer,
    tiny_controlnet_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_t5_tokenizer,
)

__all__ = [
    "GaussianMixtureDenoiser",
    "tiny_clip_tokenizer",
    "tiny_controlnet_pipeline",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_tokenizer",
]
