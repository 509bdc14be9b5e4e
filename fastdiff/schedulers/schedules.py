"""Timestep and noise-level schedules for DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): pure functions + JSON I/O.

All sigmas here are "Karras units" of a VP model, sigma~ = sigma_t / alpha_t = sqrt((1 - alpha_bar) / alpha_bar),
so lambda = log(alpha_t / sigma_t) = -log(sigma~) is the half log-SNR the solver steps in.

Spacings follow Table 2 of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
arXiv 2305.08891) as diffusers implements them; the sigma schedules are Karras et al. 2022 (rho = 7),
log-uniform ("exponential"), uniform log-SNR (Lu et al. 2022, "logSNR"), and Beta(0.6, 0.6) (Lee et al. 2024).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Spacing = Literal["linspace", "leading", "trailing"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]

SCHEDULE_FORMAT = "fastdiff.schedule"
SCHEDULE_VERSION = 1


# ----------------------------------------------------------------------------------------- training schedule
def make_betas(
    num_train_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: BetaSchedule = "linear",
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """Training betas (float32, as diffusers builds them) of a DDPM-style schedule."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}: use 'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas."
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that the last step has zero SNR."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def train_sigmas(alphas_cumprod: torch.Tensor | np.ndarray) -> np.ndarray:
    """sigma~ at every training timestep (float64 numpy), from alpha_bar."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - ac) / ac)


# ------------------------------------------------------------------------------------------------ spacings
def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: Spacing = "linspace",
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Integer timesteps, descending, one per model evaluation (Lin et al. 2023, Table 2).

    `last_timestep` (default `num_train_timesteps`) truncates the noisy end, e.g. after `lambda_min_clipped`.
    Repeated values (only when N >= T) are kept once, so the result may be shorter than N.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    n, top = num_inference_steps, num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":  # N + 1 evenly spaced points on [0, top - 1]; drop the final 0
        ts = np.round(np.linspace(0, top - 1, n + 1))[::-1][:-1]
    elif spacing == "leading":  # integer multiples of top // (N + 1), shifted by steps_offset
        if top // (n + 1) == 0:
            raise ValueError(f"'leading' spacing needs num_inference_steps < {top}, got {n}: "
                             "use fewer steps or timestep_spacing='linspace' / 'trailing'.")
        ts = (np.arange(n + 1) * (top // (n + 1)))[::-1][:-1] + steps_offset
    elif spacing == "trailing":  # evenly spaced downwards from the last training step
        ts = np.round(np.arange(top, 0, -num_train_timesteps / n)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}: use 'linspace', 'leading' or 'trailing'.")
    ts = np.ascontiguousarray(ts).astype(np.int64)
    # N >= T rounds two grid points to the same integer (e.g. linspace with N = T): a repeated timestep is a
    # zero-length step, which breaks multistep solvers (division by h = 0), so keep each timestep once
    _, first = np.unique(ts, return_index=True)
    return ts[np.sort(first)]


# ---------------------------------------------------------------------------------------- sigma schedules
def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, descending."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Log-uniform sigmas from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def uniform_logsnr_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Lu et al. 2022 ('logSNR' skip type): lambda = -log sigma~ evenly spaced from lambda_min to lambda_max."""
    lambdas = np.linspace(-math.log(sigma_max), -math.log(sigma_min), n)
    return np.exp(-lambdas)


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024 ('Beta Sampling is All You Need'): sigma_min + ppf_Beta(a, b)(1 - i/(n-1)) (max - min)."""
    from scipy.stats import beta as beta_dist  # scipy stays out of `import fastdiff.schedulers`

    q = 1.0 - np.linspace(0.0, 1.0, n)
    return sigma_min + beta_dist.ppf(q, alpha, beta) * (sigma_max - sigma_min)


def sigmas_to_timesteps(sigmas: np.ndarray, train_sigma: np.ndarray, log_dtype: type = np.float64) -> np.ndarray:
    """Fractional timesteps whose log-sigma~ (interpolated linearly between training steps) equals log `sigmas`.

    Values outside the training range clamp to its ends (t = 0 or T - 1). `log_dtype=np.float32` takes the training
    log-sigmas in float32 and t = (1 - w) k + w (k + 1), as diffusers computes them: generated grids use it so that
    the integer part of t (which exponential and beta schedules keep) agrees with diffusers' (998 vs 999 at the top).
    """
    log_train = np.log(np.asarray(train_sigma).astype(log_dtype)).astype(np.float64)
    log_s = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    # train_sigma increases with t: index of the segment [k, k+1] holding each log sigma
    k = np.clip(np.searchsorted(log_train, log_s, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[k] - log_s) / (log_train[k] - log_train[k + 1]), 0.0, 1.0)
    return (1.0 - w) * k + w * (k + 1)


def timesteps_to_sigmas(timesteps: np.ndarray, train_sigma: np.ndarray) -> np.ndarray:
    """sigma~ at (possibly fractional) timesteps, linearly interpolated between training steps."""
    return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(train_sigma)), train_sigma)


# ---------------------------------------------------------------------------------------------- JSON I/O
def save_schedule(path: str | Path, timesteps: Sequence[int] | None, **meta: Any) -> Path:
    """Write a step schedule as JSON: `{"format", "version", "timesteps", **meta}`.

    `timesteps` are distinct integers in descending order (what `pipe(..., timesteps=...)` takes), or None when
    `meta` holds `sigmas` instead (descending, N + 1 values, last may be 0). Extra keys (method, objective,
    score, model, ...) must be JSON-serialisable and are returned unchanged by `load_schedule`.
    """
    if timesteps is None and "sigmas" not in meta:
        raise ValueError("pass timesteps, or sigmas=[...] as a keyword, to save_schedule.")
    record: dict[str, Any] = {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION}
    if timesteps is not None:
        record["timesteps"] = validate_timesteps(timesteps)
    if "sigmas" in meta:
        meta["sigmas"] = [float(s) for s in validate_sigmas(meta["sigmas"])]
    reserved = {"format", "version", "timesteps"} & set(meta)
    if reserved:
        raise ValueError(f"{sorted(reserved)} are reserved keys of the schedule format; rename them.")
    record.update(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_schedule(path: str | Path) -> dict[str, Any]:
    """Read a schedule written by `save_schedule`; returns the dict with `timesteps` as a list of ints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: write it with save_schedule or `fastdiff search`.")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err.__class__.__name__}: {err}); re-run the search that wrote it.") \
            from None
    if not isinstance(record, dict) or record.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{path} is not a fastdiff schedule (missing format={SCHEDULE_FORMAT!r}).")
    if record.get("version") != SCHEDULE_VERSION:
        raise ValueError(f"{path} has schedule version {record.get('version')}; "
                         f"this fastdiff reads {SCHEDULE_VERSION}.")
    if "timesteps" in record:
        record["timesteps"] = validate_timesteps(record["timesteps"])
    if "sigmas" in record:
        record["sigmas"] = [float(s) for s in validate_sigmas(record["sigmas"])]
    return record


# ---------------------------------------------------------------------------------------------- validation
def validate_timesteps(timesteps: Sequence[int] | np.ndarray | torch.Tensor, num_train_timesteps: int | None = None
                       ) -> list[int]:
    """Check custom timesteps: integers, strictly descending (hence distinct), within [0, num_train_timesteps)."""
    arr = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError("timesteps must be a non-empty 1-D list of integers, e.g. [999, 666, 333].")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise ValueError("timesteps must be integers; pass continuous noise levels as sigmas=[...] instead.")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"timesteps contain duplicates {arr.astype(int).tolist()}: pass distinct values.")
    if np.any(np.diff(arr) >= 0):
        raise ValueError("timesteps must be in descending order: pass sorted(timesteps, reverse=True).")
    if arr[-1] < 0 or (num_train_timesteps is not None and arr[0] >= num_train_timesteps):
        top = "num_train_timesteps - 1" if num_train_timesteps is None else num_train_timesteps - 1
        raise ValueError(f"timesteps must lie in [0, {top}], got {int(arr[0])}..{int(arr[-1])}.")
    return [int(t) for t in arr]


def validate_sigmas(sigmas: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Check custom sigmas~: N + 1 >= 2 finite values, strictly descending, positive except a final 0."""
    arr = np.asarray(sigmas.cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
    if arr.ndim != 1 or len(arr) < 2:
        raise ValueError("sigmas must list N + 1 >= 2 noise levels, the last one the final sigma (0 or sigma_min).")
    if not np.all(np.isfinite(arr)):
        raise ValueError("sigmas must be finite.")
    if np.any(np.diff(arr) >= 0):
        raise ValueError("sigmas must be strictly descending (no duplicates): pass sorted(sigmas, reverse=True).")
    if arr[-1] < 0 or np.any(arr[:-1] <= 0):
        raise ValueError("sigmas must be positive; only the final one may be 0.")
    return arr
