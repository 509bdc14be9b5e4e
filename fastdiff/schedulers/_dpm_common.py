"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): the noise schedule, step bookkeeping and data prediction that
the multistep and singlestep schedulers share.

Notation (VP model): x_t = alpha_t x0 + sigma_t eps; sigma~ = sigma_t / alpha_t (diffusers' `sigmas`);
lambda = log(alpha_t / sigma_t) = -log sigma~. Solver coefficients are computed in float64 Python floats from a
float64 copy of the schedule; tensors are combined in float32 (or float64 when the sample is float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff.schedulers import schedules

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
# Names other diffusers schedulers store in the same config keys; diffusers maps them the same way on a swap.
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def _as_float32(sigmas: np.ndarray) -> np.ndarray:
    """A generated grid's sigmas as diffusers stores them (float32), kept in float64: two grid points that diffusers
    sees as equal stay equal (a zero-length step), instead of a step of h ~ 1e-8 whose coefficients differ."""
    return np.asarray(sigmas, dtype=np.float32).astype(np.float64)


@dataclass(frozen=True)
class NoiseLevel:
    """alpha_t, sigma_t and lambda_t of one point of the schedule (float64)."""

    alpha: float
    sigma: float
    lam: float

    @classmethod
    def from_sigma_tilde(cls, s: float) -> NoiseLevel:
        if s == 0.0:
            return cls(1.0, 0.0, math.inf)
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return cls(alpha, s * alpha, -math.log(s))

    @classmethod
    def from_flow_sigma(cls, s: float) -> NoiseLevel:
        """Rectified-flow path x_t = (1 - s) x0 + s eps: alpha_t = 1 - s, sigma_t = s (diffusers' flow sigmas)."""
        if s == 0.0:
            return cls(1.0, 0.0, math.inf)
        if s >= 1.0:
            return cls(0.0, 1.0, -math.inf)
        return cls(1.0 - s, s, math.log1p(-s) - math.log(s))


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), dynamic thresholding: per sample, s = quantile(|x0|, ratio) clamped to
    [1, max_value]; x0 -> clamp(x0, -s, s) / s. With max_value = 1 this is clipping to [-1, 1]."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    out = torch.maximum(torch.minimum(flat, s), -s) / s
    return out.reshape(x0.shape).to(dtype)


class DPMSolverPlusPlusBase:
    """Shared state and helpers; the subclasses are the diffusers-facing `SchedulerMixin, ConfigMixin` classes."""

    init_noise_sigma = 1.0
    _always_round_karras = False

    # --------------------------------------------------------------------------------- construction
    def _validate_config(self) -> None:
        given = self.config.algorithm_type
        if given in ALGORITHM_ALIASES and self.config.final_sigmas_type == "zero":
            # diffusers refuses this combination in the same way (it checks the name it was given)
            raise ValueError(
                f"final_sigmas_type='zero' is not supported for algorithm_type={given!r} (as in diffusers): pass "
                "final_sigmas_type='sigma_min', or algorithm_type='dpmsolver++', e.g. as a from_config override."
            )
        if given in ALGORITHM_ALIASES:
            self.register_to_config(algorithm_type=ALGORITHM_ALIASES[given])
        if self.config.solver_type in SOLVER_TYPE_ALIASES:
            self.register_to_config(solver_type=SOLVER_TYPE_ALIASES[self.config.solver_type])
        c = self.config  # read after register_to_config, which replaces the config object
        if c.algorithm_type not in ALGORITHMS:
            raise ValueError(
                f"algorithm_type={c.algorithm_type!r} is not supported: fastdiff implements DPM-Solver++ only, "
                "pass algorithm_type='dpmsolver++' or 'sde-dpmsolver++'."
            )
        if c.solver_type not in SOLVER_TYPES:
            raise ValueError(f"unknown solver_type {c.solver_type!r}: use 'midpoint' or 'heun'.")
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {c.prediction_type!r}: use 'epsilon', 'sample', 'v_prediction' or "
                "'flow_prediction'."
            )
        if not isinstance(c.solver_order, int) or not 1 <= c.solver_order <= 3:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {c.solver_order!r}.")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"unknown final_sigmas_type {c.final_sigmas_type!r}: use 'zero' or 'sigma_min'.")
        if c.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"unknown timestep_spacing {c.timestep_spacing!r}: "
                             "use 'linspace', 'leading' or 'trailing'.")
        # variance_type: only "learned" / "learned_range" change anything here (the model then also outputs a
        # variance); DDPM's "fixed_small" etc. arrive through from_config swaps and are ignored, as in diffusers.
        flags = [n for n in SIGMA_FLAGS if getattr(c, n, False)]
        if len(flags) > 1:
            raise ValueError(f"{flags} are mutually exclusive: set at most one of them to True.")
        if c.use_flow_sigmas and flags:
            raise ValueError(f"use_flow_sigmas=True cannot be combined with {flags[0]}=True: the flow-matching grid "
                             f"is set by flow_shift; set {flags[0]}=False.")
        if c.use_flow_sigmas and not c.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {c.flow_shift!r} (1.0 = no shift).")
        if c.time_shift_type != "exponential":
            raise ValueError(f"time_shift_type={c.time_shift_type!r} is not supported: use 'exponential' "
                             "(flow_shift = exp(mu)), as diffusers' DPM-Solver schedulers do.")
        if not 0.0 <= c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError("dynamic_thresholding_ratio must lie in [0, 1] (a quantile of |x0|).")
        if not c.sample_max_value > 0.0:
            raise ValueError("sample_max_value must be > 0 (1 = plain clipping to [-1, 1]).")

    def _init_noise_schedule(self) -> None:
        c = self.config
        betas = schedules.make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        if c.rescale_betas_zero_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if c.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # zero terminal SNR, kept finite (fp16's smallest subnormal)
        # sigma~ of the float32 training schedule (as diffusers computes it), kept in float64 from here on
        self._train_sigma = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).double().numpy()
        self.num_inference_steps = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._set_sigma_schedule(self._train_sigma[::-1].copy(), final=None)
        self._reset_state()

    def _set_sigma_schedule(self, sigmas: np.ndarray, final: float | None) -> None:
        s = np.asarray(sigmas, dtype=np.float64) if final is None else np.append(np.asarray(sigmas, np.float64), final)
        self._sigma64 = s
        level = NoiseLevel.from_flow_sigma if self.config.use_flow_sigmas else NoiseLevel.from_sigma_tilde
        self._levels = [level(float(v)) for v in s]
        self.sigmas = torch.from_numpy(s.astype(np.float32))

    def _reset_state(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------------------- set_timesteps
    def _schedule(self, num_inference_steps: int | None, timesteps, sigmas, mu: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
        """(timesteps, sigmas at them, final sigma): the grid the solver steps on. The sigmas are sigma~ of the VP
        model, or the flow-matching sigma in [0, 1] when `use_flow_sigmas`."""
        c = self.config
        sigma_flags = [n for n in SIGMA_FLAGS if getattr(c, n, False)]
        if mu is not None and not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
            raise ValueError("set_timesteps(mu=...) needs use_dynamic_shifting=True (and time_shift_type="
                             "'exponential'): pass use_dynamic_shifting=True in from_config, or drop mu.")
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas (got {given or 'none'}).")
        if (timesteps is not None or sigmas is not None) and sigma_flags:
            raise ValueError(f"custom {given[0]} cannot be combined with {sigma_flags[0]}=True: "
                             f"set {sigma_flags[0]}=False (e.g. in from_config) or pass num_inference_steps.")
        train = self._train_sigma
        # diffusers' "sigma_min" is the VP sigma~ at t = 0, also on the flow grid
        final = 0.0 if c.final_sigmas_type == "zero" else float(train[0])
        if c.use_flow_sigmas:
            return self._flow_schedule(num_inference_steps, timesteps, sigmas, mu, final)
        if timesteps is not None:
            ts = np.asarray(schedules.validate_timesteps(timesteps, c.num_train_timesteps), dtype=np.int64)
            return ts, train[ts], final
        if sigmas is not None:
            s = schedules.validate_sigmas(sigmas)
            return schedules.sigmas_to_timesteps(s[:-1], train), s[:-1], float(s[-1])
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        # lambda_min_clipped: drop the noisiest training steps whose log-SNR is below the clip
        lam_train = -np.log(train)
        last = c.num_train_timesteps - int(np.sum(lam_train < c.lambda_min_clipped))
        n = num_inference_steps
        if sigma_flags:
            lo, hi = float(train[0]), float(train[-1])
            kind = sigma_flags[0]
            if kind == "use_karras_sigmas":
                s = schedules.karras_sigmas(lo, hi, n)
            elif kind == "use_exponential_sigmas":
                s = schedules.exponential_sigmas(lo, hi, n)
            elif kind == "use_beta_sigmas":
                s = schedules.beta_sigmas(lo, hi, n)
            else:
                # uniform log-SNR between the float32 log-sigmas of the ends, as diffusers takes them
                log32 = np.log(train.astype(np.float32)).astype(np.float64)
                s = np.exp(np.linspace(log32[-1], log32[0], n))
            t = schedules.sigmas_to_timesteps(s, train, log_dtype=np.float32)
            # karras and lu round to integer steps, exponential and beta truncate (diffusers' conventions; its
            # multistep scheduler truncates karras / lu under squaredcos_cap_v2 too, its singlestep one rounds)
            if kind in ("use_karras_sigmas", "use_lu_lambdas") and (
                    c.beta_schedule != "squaredcos_cap_v2" or self._always_round_karras):
                t = np.round(t)
            return t.astype(np.int64), _as_float32(s), final
        ts = schedules.spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset, last)
        return ts, train[ts], final

    def _flow_schedule(self, n: int | None, timesteps, sigmas, mu: float | None, final: float
                       ) -> tuple[np.ndarray, np.ndarray, float]:
        """Flow-matching grid (Esser et al. 2024, SD3): sigma = shift u / (1 + (shift - 1) u) for N + 1 values of u
        uniform on [0, 1 - 1/T], descending, the last (0) dropped; timesteps = sigma T truncated to integers, as
        diffusers' DPM-Solver schedulers do; shift = exp(mu) when `mu` is given (dynamic shifting, Flux)."""
        num_train = self.config.num_train_timesteps
        if timesteps is not None:  # t = sigma T, the inverse of the grid's own timesteps
            ts = np.asarray(schedules.validate_timesteps(timesteps, num_train + 1), dtype=np.int64)
            if ts[0] > num_train or ts[-1] <= 0:
                raise ValueError(f"flow-matching timesteps must lie in [1, {num_train}] (sigma = t / {num_train}).")
            return ts, ts / num_train, final
        if sigmas is not None:
            s = schedules.validate_sigmas(sigmas)
            if s[0] >= 1.0:
                raise ValueError(f"flow-matching sigmas must lie in [0, 1), got {s[0]}: at sigma = 1 log-SNR is -inf; "
                                 f"start at most at 1 - 1/num_train_timesteps, as the use_flow_sigmas grid does.")
            return (s[:-1] * num_train).astype(np.float32), s[:-1], float(s[-1])
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}.")
        shift = math.exp(mu) if mu is not None else float(self.config.flow_shift)
        s = 1.0 - np.linspace(1.0, 1.0 / num_train, n + 1)
        s = np.flip(shift * s / (1.0 + (shift - 1.0) * s))[:-1].copy()
        return (s * num_train).astype(np.int64), _as_float32(s), final

    def _apply_schedule(self, ts: np.ndarray, s: np.ndarray, final: float, device) -> None:
        self._set_sigma_schedule(s, final)
        dtype = torch.int64 if np.issubdtype(np.asarray(ts).dtype, np.integer) else torch.float32
        self.timesteps = torch.as_tensor(np.asarray(ts)).to(device=device, dtype=dtype)
        self.num_inference_steps = len(ts)
        self._reset_state()

    # ----------------------------------------------------------------------------- step bookkeeping
    @property
    def step_index(self) -> int | None:
        """Index of the current timestep; +1 after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index, set by pipelines through `set_begin_index` (img2img, inpainting)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at `timesteps[begin_index]` (call before the first `step`)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of `timestep` in the schedule; a repeated value resolves to its second occurrence (diffusers'
        convention, so that starting mid-schedule does not skip a sigma)."""
        sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = (sched == torch.as_tensor(timestep).to(sched.device)).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError(f"timestep {timestep} is not in scheduler.timesteps: call set_timesteps first, or "
                             "set_begin_index for a schedule that starts part-way.")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    # ----------------------------------------------------------------------------- data prediction
    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs
                             ) -> torch.Tensor:
        """x0 prediction (DPM-Solver++ integrates the data-prediction model, Lu et al. 2022 Sec. 4.1)."""
        if sample is None:
            if not args:
                raise ValueError("convert_model_output needs sample=...")
            sample = args[-1]
        c = self.config
        if c.variance_type in ("learned", "learned_range") and model_output.shape[1] != sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]  # keep the mean half, drop the variance channels
        lvl = self._levels[self._step_index]
        if c.prediction_type == "epsilon":
            x0 = (sample - lvl.sigma * model_output) / lvl.alpha
        elif c.prediction_type == "sample":
            x0 = model_output
        elif c.prediction_type == "flow_prediction":  # v = eps - x0 on x = (1 - s) x0 + s eps  =>  x0 = x - s v
            x0 = sample - float(self._sigma64[self._step_index]) * model_output
        else:  # v = alpha eps - sigma x0  =>  x0 = alpha x - sigma v
            x0 = lvl.alpha * sample - lvl.sigma * model_output
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return x0

    @staticmethod
    def _work_dtype(sample: torch.Tensor) -> torch.dtype:
        return torch.promote_types(sample.dtype, torch.float32)

    def _noise(self, like: torch.Tensor, generator, variance_noise, dtype) -> torch.Tensor | None:
        if self.config.algorithm_type != "sde-dpmsolver++":
            return None
        if variance_noise is not None:
            return variance_noise.to(device=like.device, dtype=dtype)
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=dtype)

    # ------------------------------------------------------------------------------------- pipeline API
    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity: DPM-Solver++ works on the unscaled VP sample."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) at `timesteps` of the current schedule (img2img / inpainting)."""
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timesteps.reshape(-1)]
        else:
            start = self._step_index if self._step_index is not None else self._begin_index
            idx = [start] * timesteps.reshape(-1).shape[0]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        lv = [self._levels[i] for i in idx]
        a = torch.tensor([v.alpha for v in lv], dtype=torch.float64, device=original_samples.device).reshape(shape)
        sg = torch.tensor([v.sigma for v in lv], dtype=torch.float64, device=original_samples.device).reshape(shape)
        return (a * original_samples + sg * noise).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
