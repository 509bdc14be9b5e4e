"""SVDD (Li et al. 2024, arXiv 2408.08252): soft value-based decoding, derivative-free reward-guided sampling.

At every denoising step each image's state x_t is replicated M times and the pipeline's own scheduler
draws M stochastic children x_{t-1}; each child gets a soft value -- SVDD-PM: the reward of the decoded
posterior mean x0_hat(x_{t-1}) (one guided UNet call per child), SVDD-MC: a learned value network
v(x_{t-1}, t-1) -- and one child is kept, by argmax (alpha = 0, what the released code does) or sampled
with probability proportional to exp(value / alpha). The chosen child's UNet output is the next step's
model output, so SVDD-PM costs 1 + (T - 1) * M UNet evaluations per image and SVDD-MC costs T.
At the last step the children are final samples and are scored with the reward itself.

Works on `fastdiff.models.ReferencePipeline`, `StableDiffusionPipeline` and `StableDiffusionXLPipeline`
with any stochastic scheduler that has `alphas_cumprod` (DDPM, DDIM with eta > 0,
DPM-Solver++ with `algorithm_type="sde-dpmsolver++"`), using each pipeline's own components.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.utils import BaseOutput

from fastdiff.clock import end_call, pinned_step
from fastdiff.compose import check_call
from fastdiff.guidance.rewards import validate_reward
from fastdiff.schedulers.flow_check import refuse_flow_matching

__all__ = ["SVDDConfig", "SVDDOutput", "svdd_sample", "select_candidates", "predict_x0", "decode_latents"]

RewardFn = Callable[[torch.Tensor], torch.Tensor]
ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Scheduler attributes holding per-sample multistep history (diffusers' DPMSolverMultistep / UniPC, and
# fastdiff's DPMSolverPlusPlusScheduler): re-indexed to the chosen candidates after every selection.
HISTORY_ATTRIBUTES = ("model_outputs", "last_sample")


@dataclass
class SVDDConfig:
    """Settings of SVDD (Li et al. 2024, arXiv 2408.08252).

    Args:
        num_candidates: M, stochastic children drawn per image and step (M = 1 is the plain pipeline).
        alpha: temperature; 0 keeps the child of highest value, alpha > 0 samples one ~ exp(value / alpha).
        variant: "pm" (value = reward of the decoded posterior mean, training-free) or "mc" (a learned
            `value_fn(latents, timesteps) -> (n,)`, see `fastdiff.guidance.value`).
        value_fn: the value network for variant "mc".
        max_batch: at most this many latents per UNet / reward call (None: all B * M at once).
        generator: randomness of the alpha > 0 selection (None: torch's global generator).
        show_progress: show the pipeline's progress bar.
    """

    num_candidates: int = 8
    alpha: float = 0.0
    variant: Literal["pm", "mc"] = "pm"
    value_fn: ValueFn | None = None
    max_batch: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_candidates, bool) or not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise ValueError(
                f"num_candidates must be an int >= 1 (M = 1 is the plain pipeline), got {self.num_candidates!r}."
            )
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0 (0 = argmax selection), got {self.alpha!r}.")
        if self.variant not in ("pm", "mc"):
            raise ValueError(f"variant must be 'pm' or 'mc', got {self.variant!r}.")
        if self.variant == "mc" and self.value_fn is None:
            raise ValueError(
                "variant='mc' needs value_fn=... (train one with fastdiff.guidance.value.train_value_function)."
            )
        if self.value_fn is not None and not callable(self.value_fn):
            raise ValueError("value_fn must be callable: (latents, timesteps) -> tensor (n,).")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ValueError(f"max_batch must be None or an int >= 1, got {self.max_batch!r}.")


@dataclass
class SVDDOutput(BaseOutput):
    """Result of `svdd_sample`.

    images: as the pipeline's `output_type` ("pt" default: (B, C, H, W) in [0, 1]).
    rewards: (B,) reward of the final images.
    reward_trace: (T, B) value of the kept child at each step (the last row is the final reward).
    candidate_values: (T, B, M) values of all children.  choices: (T, B) index of the kept child.
    unet_calls: UNet forward passes made (a CFG pair is one pass).
    nfe: guided UNet evaluations per image: 1 + (T - 1) * M for "pm", T for "mc".
    """

    images: Any
    rewards: torch.Tensor
    reward_trace: torch.Tensor
    candidate_values: torch.Tensor
    choices: torch.Tensor
    unet_calls: int
    nfe: float


def select_candidates(values: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """SVDD selection: per row of values (B, M), argmax (alpha = 0) or a draw from softmax(values / alpha)."""
    if values.ndim != 2:
        raise ValueError(f"values must have shape (B, M), got {tuple(values.shape)}.")
    if alpha == 0:
        return values.argmax(dim=1)
    probs = torch.softmax(values.double() / alpha, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def predict_x0(scheduler, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
    """Posterior mean (Tweedie) x0_hat from a model output at `timestep`, with the scheduler's x0 clipping."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no alphas_cumprod: use DDPMScheduler, DDIMScheduler (eta > 0) "
            "or DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')."
        )
    a = alphas_cumprod[int(timestep)].to(device=sample.device, dtype=torch.float32)
    x, out = sample.float(), model_output.float()
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}.")
    if scheduler.config.get("clip_sample", False):
        limit = scheduler.config.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-limit, limit)
    return x0.to(sample.dtype)


def _chunks(n: int, size: int | None):
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _GuidedDenoiser:
    """The pipeline's UNet with classifier-free guidance on rows that each belong to one image (`owner`).

    Conditioning is stored once per image (B rows); for a batch of candidate latents the CFG input is
    [uncond[owner]; cond[owner]] against [latents; latents], the layout of the plain pipelines.
    """

    def __init__(self, unet, scheduler, guidance_scale: float, cond: dict, uncond: dict | None, added: tuple = ()):
        self.unet, self.scheduler, self.guidance_scale = unet, scheduler, guidance_scale
        self.cond, self.uncond, self.added = cond, uncond, added
        self.calls = 0

    def _unet_kwargs(self, owner: torch.Tensor) -> dict:
        rows = {k: v[owner.to(v.device)] for k, v in self.cond.items()}
        if self.uncond is not None:
            rows = {k: torch.cat([self.uncond[k][owner.to(v.device)], v]) for k, v in rows.items()}
        kwargs = {k: v for k, v in rows.items() if k not in self.added}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: rows[k] for k in self.added}
        return kwargs

    def __call__(self, latents: torch.Tensor, step: int, t, owner: torch.Tensor, max_batch: int | None) -> torch.Tensor:
        """Guided model output at denoising `step` (timestep `t`); each chunk of rows is its own pinned UNet call."""
        outs = []
        for sl in _chunks(len(latents), max_batch):
            x = latents[sl]
            model_in = torch.cat([x] * 2) if self.uncond is not None else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            with pinned_step(self.unet, step, chunk=sl.start):
                out = self.unet(model_in, t, **self._unet_kwargs(owner[sl]), return_dict=False)[0]
            self.calls += 1
            if self.uncond is not None:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
            outs.append(out)
        return torch.cat(outs)


@dataclass
class _Prepared:
    denoiser: _GuidedDenoiser
    latents: torch.Tensor
    timesteps: torch.Tensor
    generator: Any
    eta: float
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> images (B, C, H, W) in [0, 1]


_LABEL_KWARGS = {"class_labels", "guidance_scale", "num_inference_steps", "timesteps", "generator", "latents",
                     "batch_size", "eta"}
_SD_KWARGS = {"prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "height", "width",
              "num_inference_steps", "timesteps", "guidance_scale", "generator", "latents", "eta",
              "num_images_per_prompt", "clip_skip"}
_SDXL_KWARGS = _SD_KWARGS | {"prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                             "original_size", "target_size", "crops_coords_top_left"}


def _check_kwargs(kind: str, kwargs: dict, allowed: set) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"svdd_sample does not support {unknown} for a {kind} pipeline; supported: {sorted(allowed)}.")


def _timesteps(pipe, num_inference_steps, timesteps, device):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    steps, _ = retrieve_timesteps(pipe.scheduler, None if timesteps is not None else num_inference_steps, device,
                                  timesteps=timesteps)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    return steps


def _call_default(pipe, name: str):
    """The pipeline's own default for a `__call__` argument, so SVDD with M = 1 is the plain call."""
    return inspect.signature(pipe.__call__).parameters[name].default


def _prepare_labelled(pipe, kw: dict) -> _Prepared:
    """A class-label pipeline (e.g. `ReferencePipeline`) through its adapter methods: `check_labels`,
    `label_conditioning`, `latents_to_images` and `null_label`."""
    from diffusers.utils.torch_utils import randn_tensor

    _check_kwargs(type(pipe).__name__, kw, _LABEL_KWARGS)
    generator = kw.get("generator")
    labels = pipe.check_labels(kw.get("class_labels"), kw.get("batch_size"), generator)
    n = len(labels)
    if isinstance(generator, list) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} images: pass one per image.")
    device, dtype = pipe._execution_device, pipe.unet.dtype
    steps = kw.get("num_inference_steps", _call_default(pipe, "num_inference_steps"))
    timesteps = _timesteps(pipe, steps, kw.get("timesteps"), device)
    cfg = pipe.unet.config
    latents = kw.get("latents")
    if latents is None:
        latents = randn_tensor((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                               device=device, dtype=dtype)
    latents = latents.to(device=device, dtype=dtype) * pipe.scheduler.init_noise_sigma
    cond = pipe.label_conditioning(labels, dtype, device)
    guidance_scale = kw.get("guidance_scale", _call_default(pipe, "guidance_scale"))
    uncond = None
    if guidance_scale != 1.0:
        uncond = pipe.label_conditioning(torch.full_like(labels, pipe.null_label), dtype, device)
    denoiser = _GuidedDenoiser(pipe.unet, pipe.scheduler, guidance_scale, cond, uncond)
    return _Prepared(denoiser, latents, timesteps, generator, kw.get("eta", 0.0), pipe.latents_to_images)


def _prepare_stable_diffusion(pipe, kw: dict, xl: bool) -> _Prepared:
    _check_kwargs("StableDiffusionXL" if xl else "StableDiffusion", kw, _SDXL_KWARGS if xl else _SD_KWARGS)
    device = pipe._execution_device
    guidance_scale = kw.get("guidance_scale", _call_default(pipe, "guidance_scale"))
    do_cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = kw.get("height") or default, kw.get("width") or default
    per_prompt = kw.get("num_images_per_prompt", 1)
    common = dict(device=device, num_images_per_prompt=per_prompt, do_classifier_free_guidance=do_cfg,
                  negative_prompt=kw.get("negative_prompt"), prompt_embeds=kw.get("prompt_embeds"),
                  negative_prompt_embeds=kw.get("negative_prompt_embeds"), clip_skip=kw.get("clip_skip"))
    added: tuple = ()
    if xl:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=kw.get("prompt"), prompt_2=kw.get("prompt_2"), negative_prompt_2=kw.get("negative_prompt_2"),
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), **common)
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(
            tuple(kw.get("original_size") or (height, width)), tuple(kw.get("crops_coords_top_left") or (0, 0)),
            tuple(kw.get("target_size") or (height, width)), dtype=embeds.dtype,
            text_encoder_projection_dim=projection_dim).to(device).repeat(len(embeds), 1)
        cond = {"encoder_hidden_states": embeds.to(device), "text_embeds": pooled.to(device), "time_ids": time_ids}
        uncond = ({"encoder_hidden_states": neg.to(device), "text_embeds": neg_pooled.to(device), "time_ids": time_ids}
                  if do_cfg else None)
        added = ("text_embeds", "time_ids")
    else:
        embeds, neg = pipe.encode_prompt(prompt=kw.get("prompt"), **common)
        cond = {"encoder_hidden_states": embeds.to(device)}
        uncond = {"encoder_hidden_states": neg.to(device)} if do_cfg else None
    steps = kw.get("num_inference_steps", _call_default(pipe, "num_inference_steps"))
    timesteps = _timesteps(pipe, steps, kw.get("timesteps"), device)
    generator = kw.get("generator")
    latents = pipe.prepare_latents(len(embeds), pipe.unet.config.in_channels, height, width, embeds.dtype, device,
                                   generator, kw.get("latents"))

    denoiser = _GuidedDenoiser(pipe.unet, pipe.scheduler, guidance_scale, cond, uncond, added)
    return _Prepared(denoiser, latents, timesteps, generator, kw.get("eta", 0.0), lambda x: _vae_decode(pipe, x))


def _is_labelled(pipe) -> bool:
    """A class-label pipeline with the adapter methods SVDD drives (fastdiff's `ReferencePipeline` has them)."""
    return all(hasattr(pipe, name) for name in ("check_labels", "label_conditioning", "latents_to_images"))


def _prepare(pipe, kw: dict) -> _Prepared:
    if _is_labelled(pipe):
        return _prepare_labelled(pipe, kw)
    if hasattr(pipe, "controlnet"):
        raise TypeError("svdd_sample does not support ControlNet pipelines yet: use the SD / SDXL pipeline.")
    if hasattr(pipe, "encode_prompt") and hasattr(pipe, "vae") and hasattr(pipe, "unet"):
        xl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
        return _prepare_stable_diffusion(pipe, kw, xl)
    raise TypeError(
        f"svdd_sample supports ReferencePipeline and StableDiffusion(XL)Pipeline, not {type(pipe).__name__}."
    )


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's own decode: latents -> images (B, C, H, W) in [0, 1] (pixel shuffle or VAE)."""
    if _is_labelled(pipe):
        return pipe.latents_to_images(latents)
    return _vae_decode(pipe, latents)


def _vae_decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _step_kwargs(scheduler, generator, eta: float, num_candidates: int) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in params:
        # one generator per image: image b's M children are the next M draws of b's own generator
        kwargs["generator"] = ([g for g in generator for _ in range(num_candidates)]
                               if isinstance(generator, list) else generator)
    if "eta" in params:
        kwargs["eta"] = eta
    return kwargs


def _reindex_history(scheduler, rows: torch.Tensor, size: int) -> None:
    """Gather the scheduler's per-sample history (`HISTORY_ATTRIBUTES`) to `rows` (a (B * M,) index)."""
    for name in HISTORY_ATTRIBUTES:
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and len(value) == size:
            setattr(scheduler, name, value[rows.to(value.device)])
        elif isinstance(value, list):
            setattr(scheduler, name, [v[rows.to(v.device)] if isinstance(v, torch.Tensor) and len(v) == size else v
                                      for v in value])


def _warn_if_identical(children: torch.Tensor, batch: int, num_candidates: int) -> None:
    grouped = children.reshape(batch, num_candidates, -1)
    if num_candidates > 1 and torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        warnings.warn(
            "SVDD: all candidates are identical, so the scheduler is deterministic (e.g. DDIM with eta=0) and SVDD "
            "is the plain pipeline at M times the cost. Use DDPMScheduler, DDIM with eta > 0 (pass eta=1.0) or "
            "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++').",
            UserWarning,
            stacklevel=3,
        )


def _to_output_type(images: torch.Tensor, latents: torch.Tensor, output_type: str):
    from diffusers.image_processor import VaeImageProcessor

    if output_type == "latent":
        return latents
    if output_type == "pt":
        return images
    arr = VaeImageProcessor.pt_to_numpy(images.cpu())
    return arr if output_type == "np" else VaeImageProcessor.numpy_to_pil(arr)


@torch.no_grad()
def svdd_sample(pipe, reward_fn: RewardFn, config: SVDDConfig | None = None, **pipe_kwargs) -> SVDDOutput:
    """SVDD (Li et al. 2024, arXiv 2408.08252): sample `pipe` steered towards high `reward_fn`, no gradients.

    Args:
        pipe: a `ReferencePipeline`, `StableDiffusionPipeline` or `StableDiffusionXLPipeline` with a
            stochastic scheduler (DDPM, DDIM with `eta` > 0, SDE-DPM-Solver++).
        reward_fn: images (n, C, H, W) in [0, 1] -> tensor (n,), higher is better (see `rewards`).
        config: `SVDDConfig` (M, alpha, variant, value_fn, max_batch).
        **pipe_kwargs: the pipeline's own arguments (prompt / class_labels, guidance_scale,
            num_inference_steps or timesteps, generator (one per image reproduces the plain pipeline
            exactly at M = 1), latents, eta, output_type ("pt" default)).

    Returns:
        `SVDDOutput` with images, final rewards, per-step reward traces and the UNet call counts.

    Example:
        >>> pipe = load_reference_pipeline()
        >>> pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        >>> out = svdd_sample(pipe, rewards.ClassifierReward(7), SVDDConfig(num_candidates=8),
        ...                   batch_size=4, num_inference_steps=25,
        ...                   generator=[torch.Generator().manual_seed(i) for i in range(4)])
        >>> out.images.shape, out.nfe
        (torch.Size([4, 1, 32, 32]), 193.0)

    Long by design: the paper's Algorithm 1 as one loop (M children, their soft values, keep one per image),
    so that each numbered step below maps to a line of the algorithm.
    """
    config = config or SVDDConfig()
    refuse_flow_matching(pipe, "svdd_sample", "a stochastic flow-matching step and x0 from velocity predictions "
                         "(svdd_sample drives a UNet with DDPM / DDIM / SDE-DPM-Solver++ steps)")
    output_type = pipe_kwargs.pop("output_type", "pt")
    if output_type not in ("pt", "np", "pil", "latent"):
        raise ValueError("output_type must be 'pt', 'np', 'pil' or 'latent'.")
    prep = _prepare(pipe, pipe_kwargs)
    scheduler, denoiser = pipe.scheduler, prep.denoiser
    m, max_batch = config.num_candidates, config.max_batch
    latents, timesteps = prep.latents, prep.timesteps
    batch, num_steps = len(latents), len(timesteps)
    check_call(pipe, varying_batch=config.variant == "pm" and m > 1)  # accelerators refuse before any UNet call
    step_kwargs = _step_kwargs(scheduler, prep.generator, prep.eta, m)
    owner = torch.arange(batch, device=latents.device)
    owner_children = owner.repeat_interleave(m)

    def reward_of(latents: torch.Tensor) -> torch.Tensor:
        values = []
        for sl in _chunks(len(latents), max_batch):
            chunk = latents[sl]
            values.append(validate_reward(reward_fn(prep.decode(chunk)), len(chunk)))
        return torch.cat(values)

    def value_of(latents: torch.Tensor, t) -> torch.Tensor:
        values = []
        for sl in _chunks(len(latents), max_batch):
            chunk = latents[sl]
            ts = torch.full((len(chunk),), int(t), dtype=torch.long, device=chunk.device)
            values.append(validate_reward(config.value_fn(chunk, ts), len(chunk), name="value_fn"))
        return torch.cat(values)

    evaluations = 0
    model_output = denoiser(latents, 0, timesteps[0], owner, max_batch)
    evaluations += batch
    candidate_values, choices = [], []
    if config.show_progress:
        bar = pipe.progress_bar(total=num_steps)
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, disable=True)
    with bar:
        for i, t in enumerate(timesteps):
            last = i == num_steps - 1
            # 1. M stochastic children per image, in one scheduler step on the B * M batch
            children = scheduler.step(model_output.repeat_interleave(m, 0), t, latents.repeat_interleave(m, 0),
                                      **step_kwargs, return_dict=False)[0]
            if i == 0:
                _warn_if_identical(children, batch, m)
            # 2. soft value of each child
            child_outputs = None
            if last:
                values = reward_of(children)
            elif config.variant == "pm":
                t_next = timesteps[i + 1]
                child_outputs = denoiser(children, i + 1, t_next, owner_children, max_batch)
                evaluations += len(children)
                values = reward_of(predict_x0(scheduler, child_outputs, children, t_next))
            else:
                values = value_of(children, timesteps[i + 1])
            # 3. keep one child per image
            values = values.reshape(batch, m)
            choice = select_candidates(values, config.alpha, config.generator).to(latents.device)
            rows = owner * m + choice
            latents = children[rows]
            if m > 1:
                _reindex_history(scheduler, rows.repeat_interleave(m), batch * m)
            if not last:
                if child_outputs is not None:
                    model_output = child_outputs[rows]  # reused: no extra UNet call
                else:
                    model_output = denoiser(latents, i + 1, timesteps[i + 1], owner, max_batch)
                    evaluations += batch
            candidate_values.append(values.cpu())
            choices.append(choice.cpu())
            bar.update()

    end_call(pipe)
    pipe.maybe_free_model_hooks()
    candidate_values = torch.stack(candidate_values)
    choices = torch.stack(choices)
    trace = candidate_values.gather(2, choices.unsqueeze(2)).squeeze(2)
    images = prep.decode(latents) if output_type != "latent" else None
    return SVDDOutput(
        images=_to_output_type(images, latents, output_type),
        rewards=trace[-1].clone(),
        reward_trace=trace,
        candidate_values=candidate_values,
        choices=choices,
        unet_calls=denoiser.calls,
        nfe=evaluations / batch,
    )
