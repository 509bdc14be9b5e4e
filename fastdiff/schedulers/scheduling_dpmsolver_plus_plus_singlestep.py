"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), singlestep (2S / 3S, paper Alg. 1), as a diffusers scheduler.

A singlestep solver of order k spends k consecutive model evaluations on one step from the anchor s (the first
point of the group) to t; the intermediate points of the group are the schedule's own points. With
h = lambda_t - lambda_s and r_j = (lambda_{s_j} - lambda_s) / h for the intermediate points:

  order 1:  x_t = (sigma_t/sigma_s) x_s - alpha_t phi1 m_s,                 phi1 = e^{-h} - 1
  order 2:  ... - alpha_t phi1 D1 / 2 (midpoint)  or  + alpha_t (phi1/h + 1) D1 (heun),   D1 = (m_1 - m_s) / r_1
  order 3:  midpoint: ... + alpha_t (phi1/h + 1) (m_2 - m_s)/r_2
            heun:     ... + alpha_t (phi1/h + 1) D1 - alpha_t ((phi1 + h)/h^2 - 1/2) D2,
            D1 = (r_2 D1_1 - r_1 D1_2)/(r_2 - r_1), D2 = 2 (D1_2 - D1_1)/(r_2 - r_1), D1_j = (m_j - m_s)/r_j.

Every call of `step` is one model evaluation; `get_order_list` says which order each call completes.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from fastdiff.schedulers._dpm_common import DPMSolverPlusPlusBase


class DPMSolverPlusPlusSinglestepScheduler(DPMSolverPlusPlusBase, SchedulerMixin, ConfigMixin):
    """DPM-Solver++ singlestep (Lu et al. 2022, Alg. 1), a drop-in for diffusers' `DPMSolverSinglestepScheduler`.

    Same arguments as `DPMSolverPlusPlusScheduler` (diffusers' singlestep names and defaults, e.g.
    `lower_order_final=False`), plus `timestep_spacing`, `steps_offset`, `use_lu_lambdas`, `euler_at_final` and
    `rescale_betas_zero_snr`, which diffusers' singlestep scheduler lacks.

    >>> pipe.scheduler = DPMSolverPlusPlusSinglestepScheduler.from_config(pipe.scheduler.config)
    >>> image = pipe(prompt, num_inference_steps=20).images[0]
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _always_round_karras = True

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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Literal["learned", "learned_range"] | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        use_lu_lambdas: bool = False,
        euler_at_final: bool = False,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._validate_config()
        self._init_noise_schedule()
        self.order_list = self.get_order_list(num_train_timesteps)

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """Order completed by each of the N calls: groups [1], [1, 2] or [1, 2, 3]; shorter groups at the end when
        `lower_order_final` (forced when N is not a multiple of the order or the final sigma is 0)."""
        n, k = num_inference_steps, self.config.solver_order
        final_zero = self._sigma64[-1] == 0.0 if self.num_inference_steps is not None else (
            self.config.final_sigmas_type == "zero")
        lower_final = self.config.lower_order_final or n % k != 0 or final_zero
        group = list(range(1, k + 1))
        if not lower_final:
            orders = group * (n // k)
        elif k == 1:
            orders = [1] * n
        elif k == 2:
            orders = group * (n // 2 - 1) + [1, 1] if n % 2 == 0 else group * (n // 2) + [1]
        else:
            tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
            orders = group * ((n - len(tail)) // 3) + tail
        if final_zero or self.config.euler_at_final:
            orders[-1] = 1
        return orders

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Choose the sampling grid: `num_inference_steps` (with `mu` for dynamic shifting), custom `timesteps` or
        custom `sigmas` (N + 1 values, the last one the final sigma); see `DPMSolverPlusPlusScheduler.set_timesteps`."""
        ts, s, final = self._schedule(num_inference_steps, timesteps, sigmas, mu)
        self._apply_schedule(ts, s, final, device)
        self.sample = None
        self.order_list = self.get_order_list(len(ts))

    def _update(self, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        """The step of `order` from the group's anchor (step i + 1 - order) to point i + 1."""
        i = self._step_index
        t, s = self._levels[i + 1], self._levels[i + 1 - order]
        h = t.lam - s.lam
        x, m = self.sample, self.model_outputs
        if h == 0.0:  # zero-length step (karras sigma_min followed by final sigma_min): identity
            return x.clone()
        ms = m[-order]
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        if sde:
            e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            out = ((t.sigma / s.sigma) * math.exp(-h)) * x + (t.alpha * e2) * ms
            w1 = t.alpha * (e2 / (-2.0 * h) + 1.0) if order > 1 else 0.0
        else:
            phi1 = math.expm1(-h)
            out = (t.sigma / s.sigma) * x - (t.alpha * phi1) * ms
            w1 = t.alpha * (phi1 / h + 1.0) if order > 1 else 0.0
        if order == 2:
            r1 = (self._levels[i].lam - s.lam) / h
            d1 = (m[-1] - ms) / r1
            if self.config.solver_type == "midpoint":
                out = out + ((0.5 * t.alpha * e2) if sde else (-0.5 * t.alpha * phi1)) * d1
            else:
                out = out + w1 * d1
        elif order == 3:
            r1 = (self._levels[i - 1].lam - s.lam) / h
            r2 = (self._levels[i].lam - s.lam) / h
            d1_1, d1_2 = (m[-2] - ms) / r1, (m[-1] - ms) / r2
            if self.config.solver_type == "midpoint":
                out = out + w1 * d1_2
            else:
                d1 = (r2 * d1_1 - r1 * d1_2) / (r2 - r1)
                d2 = 2.0 * (d1_2 - d1_1) / (r2 - r1)  # ~ h^2 x0''
                if sde:  # Taylor-exact weight: alpha_t int_0^h e^{-2v} (h - v)^2 dv / h^2
                    w2 = t.alpha * (0.5 + (e2 - 2.0 * h) / (4.0 * h * h))
                    out = out + w1 * d1 + w2 * d2
                else:
                    out = out + w1 * d1 - (t.alpha * ((phi1 + h) / (h * h) - 0.5)) * d2
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
        """One model evaluation: store x0 at `timestep`; complete the group's step of order `order_list[i]`.

        Args:
            model_output: the model's prediction (`prediction_type`) at `timestep`.
            timestep: the current timestep.
            sample: the current x_t.
            generator / variance_noise: the SDE noise source, or the noise itself.
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
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:  # started mid-group (img2img): fall back to what we have
            order -= 1
        if order == 1:
            self.sample = x  # the anchor of this group
        noise = self._noise(x, generator, variance_noise, model_output.dtype if model_output.dtype in (
            torch.float32, torch.float64) else work)
        prev = self._update(order, None if noise is None else noise.to(work)).to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
