"""Exact denoiser of a Gaussian-mixture data distribution: ground truth for checking sampler maths.

Data: x0 ~ sum_k w_k N(mean_k, std_k^2 I). Forward process (any DDPM-style schedule):
x_t = a_t x0 + s_t eps with a_t = sqrt(alphas_cumprod[t]), s_t = sqrt(1 - alphas_cumprod[t]); or, for
`prediction_type="flow_prediction"`, the rectified-flow path (Liu et al. 2022; Esser et al. 2024, SD3)
x_t = (1 - s) x0 + s eps with s = t / num_train_timesteps, whose target is the velocity eps - x0.
Then x_t | k ~ N(a_t mean_k, (a_t^2 std_k^2 + s_t^2) I), so the posterior mean E[x0 | x_t] is the
responsibility-weighted sum of per-component linear denoisers, in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow_prediction"]


@dataclass
class DenoiserOutput:
    """Mirrors `UNet2DOutput`: the prediction sits in `.sample`."""

    sample: torch.Tensor


class _Config(dict):
    """A read-only dict with attribute access, like diffusers' FrozenDict on `model.config`."""

    __getattr__ = dict.__getitem__


class GaussianMixtureDenoiser(nn.Module):
    """Exact Gaussian-mixture denoiser: the optimal epsilon / x0 / v prediction, called like `UNet2DModel`.

    Args:
        means: (K, *shape) component means.
        stds: (K,) isotropic component standard deviations (> 0).
        weights: (K,) mixture weights (default uniform); normalised.
        alphas_cumprod: (T,) cumulative alphas of a DDPM-style schedule; integer timesteps index it,
            fractional ones interpolate it linearly.
        prediction_type: what `forward` returns; `"flow_prediction"` switches to the rectified-flow path
            x_t = (1 - s) x0 + s eps (alphas_cumprod is then unused) and returns the velocity eps - x0.
        num_train_timesteps: flow path only: timestep t means s = t / num_train_timesteps (SD3's convention).

    The prediction is computed in the dtype of the input sample (fp32 or fp64).
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        prediction_type: PredictionType = "epsilon",
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if means.ndim < 2 or means.shape[0] != stds.shape[0]:
            raise ValueError("means must be (K, *shape) and stds (K,) with the same K.")
        if (stds <= 0).any():
            raise ValueError("stds must be positive.")
        weights = torch.ones(len(stds), dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64
        )
        if weights.shape != stds.shape or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be (K,) non-negative with a positive sum.")
        if alphas_cumprod is None:
            betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError("prediction_type must be 'epsilon', 'sample', 'v_prediction' or 'flow_prediction'.")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        shape = tuple(means.shape[1:])
        self.config = _Config(
            sample_size=shape[-1] if len(shape) == 3 and shape[-1] == shape[-2] else list(shape[1:]),
            in_channels=shape[0],
            out_channels=shape[0],
            prediction_type=prediction_type,
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.means.device

    # ----------------------------------------------------------------- schedule
    def alpha_sigma(self, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) in fp64 for integer or fractional timesteps (linear interpolation of alphas_cumprod), or
        (1 - s, s) with s = t / num_train_timesteps on the flow path."""
        t = torch.as_tensor(timestep, dtype=torch.float64, device=self.alphas_cumprod.device)
        if self.prediction_type == "flow_prediction":
            s = (t / self.num_train_timesteps).clamp(0.0, 1.0)
            return 1.0 - s, s
        t = t.clamp(0, len(self.alphas_cumprod) - 1)
        lo = t.floor().long()
        hi = torch.clamp(lo + 1, max=len(self.alphas_cumprod) - 1)
        frac = t - lo
        ac = self.alphas_cumprod[lo] * (1 - frac) + self.alphas_cumprod[hi] * frac
        return ac.sqrt(), (1 - ac).sqrt()

    # ----------------------------------------------------------- exact posterior
    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] for x_t = alpha x0 + sigma eps; alpha, sigma broadcast per batch element (fp64)."""
        b = x.shape[0]
        xf = x.reshape(b, 1, -1).to(torch.float64)
        mu = self.means.reshape(1, len(self.stds), -1).to(xf.device)
        d = xf.shape[-1]
        a = alpha.reshape(-1, 1, 1).to(xf)
        s = sigma.reshape(-1, 1, 1).to(xf)
        var0 = (self.stds**2).reshape(1, -1, 1).to(xf)
        var_t = a**2 * var0 + s**2  # (B, K, 1) marginal variance of x_t given k
        diff = xf - a * mu
        log_r = (
            torch.log(self.weights.to(xf)).reshape(1, -1)
            - 0.5 * (diff**2).sum(-1) / var_t[..., 0]
            - 0.5 * d * torch.log(var_t[..., 0])
        )
        resp = torch.softmax(log_r, dim=1).unsqueeze(-1)  # (B, K, 1)
        comp_mean = mu + a * var0 / var_t * diff
        return (resp * comp_mean).sum(1).reshape(x.shape)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, return_dict: bool = True, **_):
        """Exact prediction at `timestep` (scalar or (B,)); returns `DenoiserOutput(sample=...)`."""
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        alpha, sigma = self.alpha_sigma(t)
        x = sample.to(torch.float64)
        x0 = self.posterior_mean(x, alpha, sigma)
        a = alpha.reshape(-1, *[1] * (x.ndim - 1))
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        if self.prediction_type == "sample":
            out = x0
        else:
            eps = (x - a * x0) / s
            if self.prediction_type == "flow_prediction":
                out = eps - x0  # d x_t / d s on x_t = (1 - s) x0 + s eps
            else:
                out = eps if self.prediction_type == "epsilon" else a * eps - s * x0
        out = out.to(sample.dtype)
        return DenoiserOutput(sample=out) if return_dict else (out,)

    # ------------------------------------------------------------ ground truth
    def data_mean(self) -> torch.Tensor:
        """Exact mean of the data distribution, flattened (D,)."""
        return (self.weights[:, None] * self.means.reshape(len(self.stds), -1)).sum(0)

    def data_covariance(self) -> torch.Tensor:
        """Exact covariance of the data distribution, flattened (D, D)."""
        mu = self.means.reshape(len(self.stds), -1)
        mean = self.data_mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, mu, mu)
        iso = (self.weights * self.stds**2).sum() * torch.eye(mu.shape[1], dtype=mu.dtype)
        return second + iso - torch.outer(mean, mean)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from the data distribution (fp64), using `generator`."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].reshape(-1, *[1] * (noise.ndim - 1)) * noise

    def exact_ode_solution(
        self,
        x: torch.Tensor,
        t_from: float,
        t_to: float | None,
        method: Literal["auto", "closed", "numeric"] = "auto",
        rtol: float = 1e-10,
        atol: float = 1e-12,
    ) -> torch.Tensor:
        """Probability-flow ODE solution from timestep `t_from` to `t_to` (None: to the data, sigma = 0); on the
        flow path this is the rectified-flow ODE dx/ds = E[eps - x0 | x_s], the same ODE in y and sigma~.

        Solved in the scaled variable y = x / a_t, whose ODE in sigma~ = s_t / a_t is
        dy/dsigma~ = eps_hat (Karras et al. 2022, Eq. 4 in these units). A single Gaussian has the closed form
        y_to = mean + sqrt(std^2 + sigma~_to^2) / sqrt(std^2 + sigma~_from^2) (y_from - mean); a mixture is
        integrated with scipy's DOP853 in log sigma~ (i.e. in log-SNR).
        """
        a0, s0 = self.alpha_sigma(t_from)
        sig_from = float(s0 / a0)
        if t_to is None:
            sig_to = 0.0
        else:
            a1, s1 = self.alpha_sigma(t_to)
            sig_to = float(s1 / a1)
        y = x.to(torch.float64) / a0
        if method == "auto":
            method = "closed" if len(self.stds) == 1 else "numeric"
        if method == "closed":
            if len(self.stds) != 1:
                raise ValueError("the closed form holds for a single Gaussian only; use method='numeric'.")
            std2 = float(self.stds[0]) ** 2
            mu = self.means[0].to(y)
            y_to = mu + math.sqrt(std2 + sig_to**2) / math.sqrt(std2 + sig_from**2) * (y - mu)
        else:
            y_to = self._integrate(y, sig_from, sig_to, rtol, atol)
        a_to = 1.0 if t_to is None else float(self.alpha_sigma(t_to)[0])
        return (y_to * a_to).to(x.dtype)

    def _eps_scaled(self, y: torch.Tensor, sig: float) -> torch.Tensor:
        """eps_hat as a function of the scaled state y = x / a at sigma~ = sig."""
        a = 1.0 / math.sqrt(1.0 + sig**2)
        alpha = torch.full((y.shape[0],), a, dtype=torch.float64)
        sigma = torch.full((y.shape[0],), sig * a, dtype=torch.float64)
        x0 = self.posterior_mean(y * a, alpha, sigma)
        return (y - x0) / sig

    def _integrate(self, y: torch.Tensor, sig_from: float, sig_to: float, rtol: float, atol: float) -> torch.Tensor:
        from scipy.integrate import solve_ivp  # scipy stays out of `import fastdiff`

        shape = y.shape
        tail = 1e-7  # below this sigma~ the remaining drift is O(sigma~^2): finish with one Euler step
        end = max(sig_to, tail)

        def rhs(u: float, flat: np.ndarray) -> np.ndarray:
            sig = math.exp(u)
            yy = torch.from_numpy(flat).reshape(shape)
            return (sig * self._eps_scaled(yy, sig)).reshape(-1).numpy()  # dy/du = sig * dy/dsig

        if sig_from == end:
            out = y
        else:
            sol = solve_ivp(rhs, (math.log(sig_from), math.log(end)), y.reshape(-1).numpy(), method="DOP853",
                            rtol=rtol, atol=atol)
            if not sol.success:
                raise RuntimeError(f"ODE reference failed: {sol.message}")
            out = torch.from_numpy(sol.y[:, -1]).reshape(shape)
        if sig_to < end:
            out = out + (sig_to - end) * self._eps_scaled(out, end)
        return out
