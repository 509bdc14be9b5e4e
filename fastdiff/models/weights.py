"""The manifest of the shipped reference weights: where they are, their file names, the noise schedule.

The loader (`fastdiff.models.load_*`), the trainer (`fastdiff.models.train`) and the digit features
(`fastdiff.eval.features`) all read these names from here. Importing this module imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["WEIGHTS_DIR", "UNET_FILE", "SCHEDULER_FILE", "CLASSIFIER_FILE", "RECORD_FILE", "SCHEDULER_CONFIG",
           "scheduler_config"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
UNET_FILE = "reference_unet.safetensors"
SCHEDULER_FILE = "reference_scheduler.json"
CLASSIFIER_FILE = "digit_classifier.safetensors"
RECORD_FILE = "reference_model.json"

# Linear betas (a cosine schedule with alpha_bar(T) ~ 0 makes DPM-Solver++ diverge on small pixel models).
# v-prediction (Salimans & Ho 2022, arXiv 2202.00512): with epsilon-prediction, x0 = (x_t - sigma eps) / alpha
# multiplies the epsilon error by 1/alpha (~160 at t = 999 here), and the measured epsilon model's small,
# image-wide per-channel biases at high noise turned every deterministic (ODE) sampler's output into stripes.
# With v, the x0 error is at most the v error. x0 is clipped to [-1, 1] (pixel space), so 10-50-step samplers
# work as is. The shipped default sampler is DDPM (ancestral) at 50 steps without guidance (pipeline.py).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True,
    set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing", prediction_type="v_prediction",
)


def scheduler_config(prediction_type: str | None = None) -> dict:
    """SCHEDULER_CONFIG for a model trained with `prediction_type` (default: the shipped one)."""
    return {**SCHEDULER_CONFIG, "prediction_type": prediction_type or SCHEDULER_CONFIG["prediction_type"]}
