"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), multistep: orders 1-3, ODE and SDE, as a diffusers scheduler.

One step from s0 to t reuses the data predictions m0, m1, m2 at s0 and the previous points s1, s2
(h = lambda_t - lambda_s0, r_k = h_k / h). The exact solution of the data-prediction ODE is
x_t = (sigma_t / sigma_s0) x_s0 + alpha_t int_0^h e^{-(h-u)} x0(lambda_s0 + u) du; Taylor-expanding x0 in lambda
and replacing derivatives by divided differences of the history gives the updates (paper Eq. 9 and Alg. 2):

  order 1:   x_t = (sigma_t/sigma_s0) x - alpha_t phi1 m0,                 phi1 = e^{-h} - 1   (= DDIM, eta = 0)
  2M:        ... - alpha_t phi1 D1 / 2       (midpoint, Alg. 2)   or   + alpha_t (phi1/h + 1) D1   (heun / taylor)
  3M:        ... + alpha_t (phi1/h + 1) D1 - w alpha_t ((phi1 + h)/h^2 - 1/2) D2

with D1 = (m0 - m1)/r0 (2M), and for 3M D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1).
w = 1 reproduces the reference code and diffusers; since D2 ~ h^2 x0''/2, the Taylor-exact weight is w = 2
(`exact_third_order=True`), which is what makes 3M third order (see docs/schedulers.md).
The SDE variant (`sde-dpmsolver++`) solves the data-prediction SDE exactly in its linear part:
x_t = (sigma_t/sigma_s0) e^{-h} x + alpha_t (1 - e^{-2h}) m0 + ... + sigma_t sqrt(1 - e^{-2h}) z.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from fastdiff.schedulers._dpm_common import DPMSolverPlusPlusBase


class DPMSolverPlusPlusScheduler(DPMSolverPlusPlusBase, SchedulerMixin, ConfigMixin):
    """DPM-Solver++ multistep (Lu et al. 2022), a drop-in for diffusers' `DPMSolverMultistepScheduler`.

    The config uses diffusers' parameter names and defaults, so `from_config` swaps work both ways:

    >>> pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    >>> image = pipe(prompt, num_inference_steps=15).images[0]
    >>> image = pipe(prompt, timesteps=[999, 850, 736, 645, 545, 455, 343, 233, 124, 24]).images[0]

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            the training noise schedule (`"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"` betas).
        solver_order (`int`, 2): 1, 2 or 3; 2 for guided sampling, 3 for unconditional.
        prediction_type: `"epsilon"`, `"sample"`, `"v_prediction"` or `"flow_prediction"`.
        thresholding, dynamic_thresholding_ratio (0.995), sample_max_value (1.0): dynamic thresholding of x0
            (Imagen); for pixel-space models only. With `sample_max_value=1` it is clipping to [-1, 1].
        algorithm_type: `"dpmsolver++"` (ODE) or `"sde-dpmsolver++"` (SDE, needs noise: `generator` or
            `variance_noise` in `step`).
        solver_type: `"midpoint"` or `"heun"` for the second-order update.
        lower_order_final (`True`): orders 1 and 2 at the last two steps when fewer than 15 steps.
        euler_at_final (`False`): first order at the last step.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas: sigma schedules (at most one).
        final_sigmas_type: `"zero"` (the last step returns x0) or `"sigma_min"`.
        lambda_min_clipped: drop timesteps whose log-SNR is below this (cosine schedules).
        variance_type: `"learned"` / `"learned_range"` when the model also outputs a variance.
        timestep_spacing (`"linspace"`), steps_offset: how `num_inference_steps` picks the timesteps.
        exact_third_order (`False`): use the Taylor-exact weight on D2 in 3M (not in diffusers).
        use_flow_sigmas, flow_shift: flow-matching models (SD3, Flux; x_t = (1 - s) x0 + s eps), with
            `prediction_type="flow_prediction"` (velocity eps - x0): the grid s = shift u / (1 + (shift - 1) u),
            u uniform on [0, 1 - 1/T].
        use_dynamic_shifting, time_shift_type (`"exponential"`): `set_timesteps(n, mu=...)` uses shift = exp(mu).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["dpmsolver++", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Literal["learned", "learned_range"] | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        exact_third_order: bool = False,
    ) -> None:
        self._validate_config()
        self._init_noise_schedule()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Choose the sampling grid: `num_inference_steps`, or custom `timesteps`, or custom `sigmas`.

        Args:
            num_inference_steps: spaced by `timestep_spacing` or the configured sigma schedule.
            device: where `self.timesteps` lives.
            mu: dynamic shifting (Flux): flow_shift = exp(mu) for this grid; needs `use_dynamic_shifting=True`.
            timesteps: distinct integers in descending order, in [0, num_train_timesteps); the final sigma follows
                `final_sigmas_type`. Pass the N model timesteps without a trailing 0. With `use_flow_sigmas`,
                sigma = t / num_train_timesteps.
            sigmas: N + 1 descending sigma~ = sqrt((1 - alpha_bar) / alpha_bar) values, the last one being the final
                sigma (0 to finish on x0), as diffusers' EulerDiscreteScheduler takes them; the model timesteps are
                their log-sigma interpolation (fractional). With `use_flow_sigmas`, flow sigmas in [0, 1) and
                timesteps sigma * num_train_timesteps.
        """
        ts, s, final = self._schedule(num_inference_steps, timesteps, sigmas, mu)
        self._apply_schedule(ts, s, final, device)

    # --------------------------------------------------------------------------------------- the solver
    def _order_for_step(self, i: int) -> int:
        """Order used at step i: warm-up 1, 2, ...; lower orders at the end (diffusers' rules)."""
        c, n = self.config, len(self.timesteps)
        order = min(c.solver_order, self.lower_order_nums + 1)
        short = c.lower_order_final and n < 15
        if i == n - 1 and (c.euler_at_final or short or self._sigma64[-1] == 0.0):
            return 1
        if i == n - 2 and short:
            return min(order, 2)
        return order

    def _update(self, x: torch.Tensor, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        """One DPM-Solver++ step from point i to i + 1 (module docstring)."""
        i = self._step_index
        t, s0 = self._levels[i + 1], self._levels[i]
        h = t.lam - s0.lam
        if h == 0.0:  # zero-length step (e.g. karras sigma_min followed by final sigma_min): identity
            return x.clone()
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        m = self.model_outputs
        if sde:  # exact in the linear part; e^{-2h} replaces e^{-h}
            decay = math.exp(-h)  # sigma_t/sigma_s0 e^{-h}
            c_x = (t.sigma / s0.sigma) * decay if s0.sigma > 0 else 0.0
            e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            c0, c1 = t.alpha * e2, (t.alpha * (e2 / (-2.0 * h) + 1.0) if order > 1 else 0.0)
        else:
            phi1 = math.expm1(-h)  # e^{-h} - 1
            c_x = t.sigma / s0.sigma
            c0 = -t.alpha * phi1
        out = c_x * x + c0 * m[-1]
        if order == 1:
            pass
        elif order == 2:
            s1 = self._levels[i - 1]
            d1 = (m[-1] - m[-2]) * (h / (s0.lam - s1.lam))
            if self.config.solver_type == "midpoint":
                w1 = 0.5 * t.alpha * e2 if sde else -0.5 * t.alpha * phi1
            else:
                w1 = c1 if sde else t.alpha * (phi1 / h + 1.0)
            out = out + w1 * d1
        else:
            s1, s2 = self._levels[i - 1], self._levels[i - 2]
            r0, r1 = (s0.lam - s1.lam) / h, (s1.lam - s2.lam) / h
            d1_0, d1_1 = (m[-1] - m[-2]) / r0, (m[-2] - m[-3]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0''/2
            if sde:
                # Taylor-exact: alpha_t int_0^h 2 e^{-2v} (h - v)^2 dv / h^2 on D2 (diffusers' coefficient differs)
                w2 = t.alpha * (1.0 + (e2 - 2.0 * h) / (2.0 * h * h))
                out = out + c1 * d1 + w2 * d2
            else:
                w = 2.0 if self.config.exact_third_order else 1.0
                out = out + (t.alpha * (phi1 / h + 1.0)) * d1 - (w * t.alpha * ((phi1 + h) / (h * h) - 0.5)) * d2
        if noise is not None:
            out = out + (t.sigma * math.sqrt(e2)) * noise
        return out

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Advance `sample` from `timestep` to the next point of the schedule (one model evaluation per call).

        Args:
            model_output: the model's prediction (`prediction_type`) at `timestep`.
            timestep: the current timestep (its position is found once; later calls count steps).
            sample: the current x_t.
            generator: noise source of the SDE variant.
            variance_noise: the SDE noise itself (overrides `generator`), shape of `sample`.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(...) before step().")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError("the schedule is finished: call set_timesteps(...) again to sample anew.")
        work = self._work_dtype(sample)
        x = sample.to(work)
        x0 = self.convert_model_output(model_output.to(work), sample=x)
        self.model_outputs = self.model_outputs[1:] + [x0]
        order = self._order_for_step(self._step_index)
        noise = self._noise(x, generator, variance_noise, work)
        prev = self._update(x, order, noise).to(model_output.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
