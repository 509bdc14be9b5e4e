"""Align Your Steps (Sabour et al. 2024, arXiv 2404.14507) and GITS (Chen et al. 2024, arXiv 2405.11326), small.

Both compute a K-step schedule for a given pipeline from its own denoiser, as baselines for the searched one:

- `ays_timesteps` ("AYS-style"): coordinate-wise minimisation of a Monte-Carlo estimate of the KL upper bound
  KLUB = sum_i int_{s_{i+1}}^{s_i} E ||D(x0 + s eps, s) - D(x0 + s_i eps, s_i)||^2 / s^3 ds (EDM units,
  s = sigma~), with real data x0, one shared noise eps per datum and a few log-spaced quadrature points per
  interval; each interior point moves over a grid between its neighbours, a few sweeps (AYS Alg. 1, reduced).
  The last point is the smallest training sigma; the sampler's final step then goes to sigma = 0 instead.
- `gits_timesteps` ("GITS-style"): a teacher trajectory (DPM-Solver++ 2M) on a fine Karras grid from a
  few warm-up noises, cost[i][j] = mean ||one first-order (DDIM) jump from grid point i to j - teacher at j||^2,
  then dynamic programming V_k(i) = min_j cost[i][j] + coeff V_{k-1}(j) over K jumps to sigma = 0.

The denoiser is the pipeline itself: one DPM-Solver++ step from timestep t to sigma = 0 returns the model's
x0 prediction (with the pipeline's guidance and the scheduler's thresholding), so any pipeline taking
`latents=` and `timesteps=` works. Reduced sizes (warm-up samples, grid, sweeps) are stated in the arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _schedule(pipe) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) of the pipeline's training schedule (VP), float64, indexed by integer timestep."""
    ac = np.asarray(pipe.scheduler.alphas_cumprod, dtype=np.float64)
    return np.sqrt(ac), np.sqrt(1 - ac)


def pipeline_denoiser(pipe, pipe_kwargs: Mapping[str, Any] | None = None
                      ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """x0-prediction D(x_t, t) of `pipe` (latents in, latents out), via one DPM-Solver++ step to sigma = 0."""
    from diffusers import DPMSolverMultistepScheduler

    kwargs = dict(pipe_kwargs or {})
    config = dict(pipe.scheduler.config)
    one_step = DPMSolverMultistepScheduler.from_config(config, final_sigmas_type="zero", algorithm_type="dpmsolver++")

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        original = pipe.scheduler
        pipe.scheduler = one_step
        try:
            return pipe(latents=x, timesteps=[int(t)], output_type="latent", **kwargs).images.double()
        finally:
            pipe.scheduler = original

    return denoise


def _nearest_timestep(sigma_tilde: float, table: np.ndarray) -> int:
    return int(np.argmin(np.abs(np.log(table) - np.log(sigma_tilde))))


def ays_timesteps(pipe, num_steps: int, data: torch.Tensor, pipe_kwargs: Mapping[str, Any] | None = None,
                  num_quadrature: int = 3, grid_size: int = 9, sweeps: int = 2, seed: int = 0,
                  init: Sequence[int] | None = None) -> list[int]:
    """AYS-style schedule of `num_steps` timesteps (descending) for `pipe`, from real latents `data` (B, ...).

    `pipe_kwargs` must describe the same B images as `data` (e.g. their class labels).
    """
    alpha, sigma = _schedule(pipe)
    table = sigma / alpha  # sigma~ per timestep
    top, denoise = len(table) - 1, pipeline_denoiser(pipe, pipe_kwargs)
    eps = torch.randn(data.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x0 = data.double()
    cache: dict[int, torch.Tensor] = {}

    def d_at(t: int) -> torch.Tensor:
        if t not in cache:
            cache[t] = denoise((alpha[t] * x0 + sigma[t] * eps).float(), t)
        return cache[t]

    def klub(t_hi: int, t_lo: int) -> float:
        """int_{s_lo}^{s_hi} E||D(s) - D(s_hi)||^2 / s^3 ds, midpoint rule in log s."""
        if t_hi <= t_lo:
            return float("inf")
        log_hi, log_lo = np.log(table[t_hi]), np.log(table[t_lo])
        width = (log_hi - log_lo) / num_quadrature
        total, start = 0.0, d_at(t_hi)
        for q in range(num_quadrature):
            t = _nearest_timestep(np.exp(log_lo + (q + 0.5) * width), table)
            s = table[t]
            err = ((d_at(t) - start) ** 2).reshape(len(x0), -1).sum(1).mean().item()
            total += err / s**3 * s * width
        return total

    # start: uniform in log sigma~ (the logSNR schedule), endpoints fixed at the largest and smallest sigma~
    if init is None:
        logs = np.linspace(np.log(table[top]), np.log(table[0]), num_steps + 1)
        points = [_nearest_timestep(np.exp(v), table) for v in logs]
    else:
        points = [int(t) for t in init] + [0]
    for _ in range(sweeps):
        for i in range(1, num_steps):
            hi, lo = points[i - 1], points[i + 1]
            options = sorted({int(round(v)) for v in np.linspace(lo + 1, hi - 1, grid_size)} | {points[i]})
            options = [t for t in options if lo < t < hi]
            if not options:
                continue
            points[i] = min(options, key=lambda t: (klub(hi, t) + klub(t, lo), t))
    return points[:num_steps]


def gits_timesteps(pipe, num_steps: int, noise: torch.Tensor, pipe_kwargs: Mapping[str, Any] | None = None,
                   grid_size: int = 40, coeff: float = 1.15) -> list[int]:
    """GITS-style schedule of `num_steps` timesteps (descending) for `pipe`, from warm-up `noise` (B, ...).

    `pipe_kwargs` must describe the same B images as `noise`. The teacher is DPM-Solver++ 2M on a
    `grid_size`-step Karras grid (GITS: iPNDM teacher, 61 points).
    """
    from diffusers import DPMSolverMultistepScheduler

    alpha, sigma = _schedule(pipe)
    denoise = pipeline_denoiser(pipe, pipe_kwargs)
    grid_sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    grid_sched.set_timesteps(grid_size)
    grid = sorted({int(t) for t in grid_sched.timesteps}, reverse=True)
    if len(grid) < num_steps:
        raise ValueError(f"the grid has {len(grid)} timesteps, fewer than num_steps={num_steps}: raise grid_size.")
    a = np.array([alpha[t] for t in grid] + [1.0])
    s = np.array([sigma[t] for t in grid] + [0.0])
    lam = np.log(a[:-1] / s[:-1])

    def ddim(x: torch.Tensor, m: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """First-order DPM-Solver++ (= DDIM, eta 0) from grid point i to j (j = len(grid): sigma 0)."""
        return s[j] / s[i] * x + (a[j] - s[j] / s[i] * a[i]) * m

    # teacher trajectory: DPM-Solver++ 2M (midpoint form) over the grid, x0 predictions kept
    states, preds = [noise.double()], []
    for i, t in enumerate(grid):
        preds.append(denoise(states[i].float(), t))
        j = i + 1
        if i == 0 or j == len(grid):
            states.append(ddim(states[i], preds[i], i, j))
            continue
        h, h0 = lam[j] - lam[i], lam[i] - lam[i - 1]
        d1 = (preds[i] - preds[i - 1]) / (h0 / h)
        states.append(ddim(states[i], preds[i], i, j) - 0.5 * a[j] * np.expm1(-h) * d1)
    n = len(grid)
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            cost[i, j] = ((ddim(states[i], preds[i], i, j) - states[j]) ** 2).reshape(len(noise), -1).sum(1).mean()
    # V[k][i]: cheapest way from grid point i to sigma 0 in k jumps; later errors weighted by coeff
    value = np.full((num_steps + 1, n + 1), np.inf)
    choice = np.zeros((num_steps + 1, n + 1), dtype=int)
    value[0, n] = 0.0
    for k in range(1, num_steps + 1):
        for i in range(n):
            totals = cost[i, i + 1:] + coeff * value[k - 1, i + 1:]
            best = int(np.argmin(totals))
            value[k, i], choice[k, i] = totals[best], i + 1 + best
    path, i = [0], 0
    for k in range(num_steps, 1, -1):
        i = choice[k, i]
        path.append(i)
    return [grid[p] for p in path]
