"""Faster Diffusion (Li et al. 2023, arXiv 2312.09608): encoder propagation, parallel decoding, noise injection.

Attached to an unchanged diffusers pipeline through `diffusers.hooks.HookRegistry`:

- a stateful hook on the `UNet2DConditionModel` counts the UNet calls of one pipeline call (one call per
  denoising step: CFG batches both halves in one call) and decides, per step, key or non-key;
- hooks on `conv_in`, every `down_blocks[i]` and `mid_block` (the "encoder") record their outputs at key
  steps and return the recorded outputs at non-key steps, so that `UNet2DConditionModel.forward` itself runs
  only the time/condition embeddings, the up blocks, `conv_norm_out` and `conv_out` there. ControlNet
  residuals seen at the key step are re-fed at the non-key steps, so the decoder reads the skip features
  "after ControlNet residuals are added", as in the paper;
- a hook on the pipeline's ControlNet returns its key-step output at non-key steps without running.

Shallow recompute (`recompute_shallow=k`): at non-key steps `conv_in` and the first k layers of the encoder
ladder (`encoder_layers`: one layer per resnet(+attention) pair, one per downsampler, the mid block last) run
on the current latent; only the deeper layers' outputs are replayed from the last key step.

Deep-branch reuse (`reuse_decoder=True`, DeepCache's cache, Ma et al. 2024, arXiv 2312.00858): at non-key steps
the decoder layers that read only replayed skip features are replayed too (`decoder_layers`), so a non-key step
runs `conv_in`, the first k encoder layers and the k + 1 decoder layers that read their skips, and nothing
deeper. With an interval `key_steps=I` and `recompute_shallow=k` this is DeepCache's uniform 1:I schedule with
its skip branch at skip feature k; calibrated key steps place the full steps where the model needs them.

Parallel decoding: non-key decoders never read the latent, so at a key step the decoders of the whole
following non-key group run as one batched UNet call (per-sample timesteps from `scheduler.timesteps`,
chunked by `max_parallel_batch`), and the following steps are served from that batch.

Prior noise injection (paper: before each step with t < tau, ``z <- z + alpha * z_T``, z_T the initial
latent) is carried inside the normal loop: the UNet sees ``x + alpha * z_T`` and its output is shifted by
``alpha * z_T * c`` with ``c = a_prev / (a_t * s_prev - a_prev * s_t)`` (``a = sqrt(alphas_cumprod)``,
``s = sqrt(1 - alphas_cumprod)``, prev = the next timestep of the schedule), which makes the scheduler's
update equal to the paper's update of the injected latent for any first-order solver of the form
``z_prev = (a_prev / a_t) z + (s_prev - a_prev s_t / a_t) eps`` (deterministic DDIM, and the first-order
step of DPM-Solver(++)); see `injection_eps_coefficient` and docs/encoder_propagation.md.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.hooks import ModelHook

from fastdiff.clock import StepClock
from fastdiff.compose import Attachment, HookSpec, Stack

# preset -> (the step count it was written for, its key step indices); Faster Diffusion's key steps.
PRESETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "fd50": (50, (0, 1, 2, 3, 5, 10, 15, 25, 35)),
    "fd20": (20, (0, 1, 2, 3, 5, 10, 15)),
}

Variant = tuple[int, bool]  # (recompute_shallow, reuse_decoder): what a non-key step recomputes
_RESIDUAL_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual")
JSON_FORMAT = "fastdiff.encoder_propagation"


@dataclass
class EncoderPropagationConfig:
    """Faster Diffusion (arXiv 2312.09608) encoder propagation settings.

    Args:
        key_steps (`list[int]`, `int` or `"fd50"` / `"fd20"`):
            step indices (0 = noisiest) at which the whole UNet runs; an int k means every k-th step
            (0, k, 2k, ...); a preset is the paper's list for 50 (`"fd50"`) or 20 (`"fd20"`) steps and, at
            another step count N, becomes ``{floor(k * N / N_preset + 1/2)}`` (see `key_step_indices`).
        parallel (`bool`, defaults to `False`):
            decode each key step's following non-key steps in one batched pass (parallel decoding).
        noise_injection_alpha (`float`, defaults to `0.0`):
            prior noise injection strength alpha (paper: 0.003); 0 disables it.
        noise_injection_tau (`float`, defaults to `500`):
            inject while the timestep t < tau (training-timestep units, paper: 500).
        max_parallel_batch (`int`, *optional*):
            the most non-key steps decoded in one batched pass (the pass's batch is this times the UNet's
            batch); `None` decodes a whole group at once.
        recompute_shallow (`int`, defaults to `0`):
            at non-key steps, recompute `conv_in` and the first k layers of `encoder_layers(unet)` on the current
            latent and replay only the deeper ones; 0 replays the whole encoder, `len(encoder_layers(unet))`
            recomputes all of it. Needs `parallel=False` (recomputed layers read the current latent).
        reuse_decoder (`bool`, defaults to `False`):
            at non-key steps also replay the decoder layers deeper than the recomputed skips (DeepCache's deep
            branch): `conv_in` always runs then, and `recompute_shallow=k` runs skip features 0..k and the k + 1
            decoder layers that read them (`decoder_layers`). Needs `parallel=False`.
    """

    key_steps: list[int] | int | Literal["fd50", "fd20"]
    parallel: bool = False
    noise_injection_alpha: float = 0.0
    noise_injection_tau: float = 500
    max_parallel_batch: int | None = None
    recompute_shallow: int = 0
    reuse_decoder: bool = False

    def __post_init__(self) -> None:
        ks = self.key_steps
        if isinstance(ks, str):
            if ks not in PRESETS:
                raise ValueError(f"key_steps preset {ks!r} is unknown: use one of {sorted(PRESETS)}, an int or a list.")
        elif isinstance(ks, bool) or not isinstance(ks, (int, list, tuple)):
            raise ValueError("key_steps must be a list of step indices, an int k (every k-th step) or 'fd50'/'fd20'.")
        elif isinstance(ks, int):
            if ks < 1:
                raise ValueError(f"key_steps={ks}: an int key_steps is the interval k and must be >= 1.")
        else:
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
                raise ValueError("key_steps must hold ints (step indices, 0 = first step).")
            if any(k < 0 for k in ks):
                raise ValueError(f"key_steps {list(ks)} has a negative index: step indices start at 0.")
            if 0 not in ks:
                raise ValueError(f"key_steps {list(ks)} must include step 0: the first step has no cached encoder.")
            self.key_steps = sorted(set(ks))
        if not isinstance(self.noise_injection_alpha, (int, float)) or self.noise_injection_alpha < 0:
            raise ValueError(f"noise_injection_alpha={self.noise_injection_alpha} must be >= 0 (paper: 0.003).")
        if self.noise_injection_tau < 0:
            raise ValueError(f"noise_injection_tau={self.noise_injection_tau} must be >= 0 (paper: 500).")
        if self.max_parallel_batch is not None and (
            not isinstance(self.max_parallel_batch, int) or self.max_parallel_batch < 1
        ):
            raise ValueError(f"max_parallel_batch={self.max_parallel_batch} must be None or an int >= 1.")
        k = self.recompute_shallow
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"recompute_shallow={k!r} must be an int >= 0 (0 = replay the whole encoder).")
        if k > 0 and self.parallel:
            raise ValueError(
                f"recompute_shallow={k} cannot run with parallel decoding: the recomputed layers read the current "
                "latent, which a key step's batched pass does not have for the later steps. Use parallel=False, "
                "or recompute_shallow=0."
            )
        if not isinstance(self.reuse_decoder, bool):
            raise ValueError(f"reuse_decoder={self.reuse_decoder!r} must be True or False.")
        if self.reuse_decoder and self.parallel:
            raise ValueError(
                "reuse_decoder=True cannot run with parallel decoding: a non-key step then runs conv_in and the "
                "shallow decoder on the current latent, which a key step's batched pass does not have. Use "
                "parallel=False, or reuse_decoder=False."
            )

    def to_json(self, path: str | Path, **metadata: Any) -> Path:
        """Write this config (and `metadata`, e.g. what a calibration measured) as JSON; return the path."""
        data = {"format": JSON_FORMAT, "version": 1, "config": asdict(self), **metadata}
        path = Path(path)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderPropagationConfig:
        """A config written by `to_json` (or `fastdiff calibrate`), or a plain JSON object of its fields."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"encoder propagation config {path} does not exist (write one with `fastdiff calibrate`).")
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "format" in data:
            if data["format"] != JSON_FORMAT or data.get("version") != 1:
                raise ValueError(f"{path} is not a version-1 {JSON_FORMAT} file (format {data['format']!r}).")
            data = data.get("config")
        allowed = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= allowed or "key_steps" not in data:
            raise ValueError(f"{path} must hold an object with key_steps and any of {sorted(allowed)}.")
        return cls(**data)

    def check_steps(self, num_steps: int) -> None:
        """Refuse key steps past a `num_steps`-step call (indices 0..num_steps-1)."""
        key_step_indices(self.key_steps, num_steps)


def key_step_indices(key_steps: Sequence[int] | int | str, num_steps: int) -> tuple[int, ...]:
    """Faster Diffusion key steps: the sorted key step indices of a `num_steps`-step run (pure function).

    A list is checked against the range; an int k gives 0, k, 2k, ...; a preset written for N_p steps
    gives ``floor(k * num_steps / N_p + 1/2)`` for each of its indices k (duplicates merged).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    if isinstance(key_steps, str):
        base, indices = PRESETS[key_steps]
        return tuple(sorted({min(num_steps - 1, math.floor(k * num_steps / base + 0.5)) for k in indices}))
    if isinstance(key_steps, int):
        return tuple(range(0, num_steps, key_steps))
    bad = [k for k in key_steps if k >= num_steps]
    if bad:
        raise ValueError(f"key steps {bad} are out of range for {num_steps} steps (indices 0-{num_steps - 1}).")
    return tuple(sorted(set(key_steps)))


def injection_eps_coefficient(alpha_bar_t: float, alpha_bar_prev: float) -> float:
    """Faster Diffusion prior noise injection carried by the epsilon prediction (pure function).

    Returns c such that adding ``c * delta`` to the epsilon prediction makes the first-order update
    ``z_prev = (a_prev / a_t) z + (s_prev - a_prev s_t / a_t) eps`` of the latent z equal to the same update
    of the injected latent ``z + delta`` (with eps evaluated at ``z + delta``): ``c = a_prev / (a_t s_prev -
    a_prev s_t)``, where ``a = sqrt(alpha_bar)`` and ``s = sqrt(1 - alpha_bar)``.
    """
    a_t, s_t = math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t)
    a_p, s_p = math.sqrt(alpha_bar_prev), math.sqrt(1.0 - alpha_bar_prev)
    return a_p / (a_t * s_p - a_p * s_t)


def injection_v_coefficient(alpha_bar_t: float, alpha_bar_prev: float) -> float:
    """Faster Diffusion prior noise injection carried by a v prediction (Salimans & Ho 2022 parametrisation).

    The scheduler reads epsilon = s_t z + a_t v, so the epsilon shift ``c * delta`` of
    `injection_eps_coefficient` plus the ``s_t * delta`` that the injected latent adds to that epsilon
    become the v shift ``(s_t + c) / a_t * delta``.
    """
    a_t, s_t = math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t)
    return (s_t + injection_eps_coefficient(alpha_bar_t, alpha_bar_prev)) / a_t


def encoder_layers(unet: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """Faster Diffusion encoder as the ladder of `recompute_shallow`: its skip-producing layers, in order.

    Each down block gives one layer per resnet (with its attention, if the block has them) and one for its
    downsampler(s); the mid block is the last layer. Layer i's output is skip feature i + 1 (conv_in's is
    skip 0), so `recompute_shallow=k` refreshes the first k + 1 skip features.
    """
    layers: list[tuple[str, list[torch.nn.Module]]] = []
    for i, block in enumerate(unet.down_blocks):
        resnets = getattr(block, "resnets", None)
        attentions = getattr(block, "attentions", None) or [None] * len(resnets or [])
        if resnets is None or len(attentions) != len(resnets):
            raise ValueError(
                f"down_blocks.{i} ({type(block).__name__}) is not a resnet(+attention) block: recompute_shallow "
                "needs diffusers' down blocks; use recompute_shallow=0."
            )
        for j, (resnet, attention) in enumerate(zip(resnets, attentions)):
            layers.append((f"down_blocks.{i}.layers.{j}", [m for m in (resnet, attention) if m is not None]))
        if getattr(block, "downsamplers", None):
            layers.append((f"down_blocks.{i}.downsamplers", list(block.downsamplers)))
    if unet.mid_block is not None:
        layers.append(("mid_block", [unet.mid_block]))
    return layers


def decoder_layers(unet: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module], int]]:
    """DeepCache's deep branch on the decoder side: each up-block resnet(+attention) with the skip feature it reads.

    Returns (name, modules, skip) in decoder order; skip 0 is conv_in's output and skip i + 1 the output of
    `encoder_layers(unet)[i]`, so the decoder layer reading skip j runs at a `reuse_decoder` non-key step
    exactly when j <= `recompute_shallow`.
    """
    skips = 1 + sum(1 for name, _ in encoder_layers(unet) if name != "mid_block")
    layers: list[tuple[str, list[torch.nn.Module], int]] = []
    for i, block in enumerate(unet.up_blocks):
        resnets = getattr(block, "resnets", None)
        attentions = getattr(block, "attentions", None) or [None] * len(resnets or [])
        if resnets is None or len(attentions) != len(resnets):
            raise ValueError(f"up_blocks.{i} ({type(block).__name__}) is not a resnet(+attention) block: "
                             "reuse_decoder needs diffusers' up blocks; use reuse_decoder=False.")
        for j, (resnet, attention) in enumerate(zip(resnets, attentions)):
            skips -= 1
            layers.append((f"up_blocks.{i}.layers.{j}", [m for m in (resnet, attention) if m is not None], skips))
    if skips != 0:
        raise ValueError("this UNet's up blocks do not read one skip feature per resnet: use reuse_decoder=False.")
    return layers


def _tile(value: Any, m: int) -> Any:
    """Repeat every tensor in `value` (a tensor, or nested tuples/lists/dicts) m times along dim 0."""
    if torch.is_tensor(value):
        return value.repeat(m, *([1] * (value.ndim - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, m) for v in value)
    if isinstance(value, dict):
        return {k: _tile(v, m) for k, v in value.items()}
    return value


def _tile_batch(value: Any, batch: int, m: int) -> Any:
    """Like `_tile`, but only for tensors whose dim 0 is the UNet batch (others are left as they are)."""
    if torch.is_tensor(value):
        return _tile(value, m) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_tile_batch(v, batch, m) for v in value)
    if isinstance(value, dict):
        return {k: _tile_batch(v, batch, m) for k, v in value.items()}
    return value


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` (a UNet2DConditionOutput or a tuple) with its sample replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


class _ChunkCache:
    """What one row chunk of the running call keeps between its steps (one chunk unless a loop pins several)."""

    def __init__(self) -> None:
        self.features: dict[str, Any] = {}
        self.residuals: dict[str, Any] = {}
        self.decoded: dict[int, tuple[float, torch.Tensor]] = {}
        self.z_T: torch.Tensor | None = None
        self.controlnet_output: Any = None


class _PropagationState:
    """Per-pipeline-call state shared by the UNet, encoder-part and ControlNet hooks; steps come from the clock."""

    def __init__(self, config: EncoderPropagationConfig, clock: StepClock) -> None:
        self.config = config
        self.clock = clock
        self.depth = config.recompute_shallow  # layers of `encoder_layers` recomputed at non-key steps
        self.reuse_decoder = config.reuse_decoder  # replay the decoder layers that read replayed skips
        self.probe: tuple[tuple[Variant, ...], Callable[[int, dict[Variant, torch.Tensor], torch.Tensor], None]] | None
        self.probe = None
        self.reset()

    def reset(self) -> None:
        """Forget everything the running call cached."""
        self.keys: frozenset[int] = frozenset()
        self.mode: Literal["off", "record", "serve", "tile"] = "off"
        self.repeat = 1
        self.chunks: dict[Any, _ChunkCache] = {}

    def on_new_call(self) -> None:
        """A pipeline call starts: its key steps for its step count (raises ValueError before any UNet call)."""
        self.reset()
        self.keys = frozenset(key_step_indices(self.config.key_steps, self.clock.num_steps))

    @property
    def cache(self) -> _ChunkCache:
        """The cache of the row chunk the clock says is running."""
        return self.chunks.setdefault(self.clock.chunk, _ChunkCache())

    def injection(self, step: int, timestep) -> float | None:
        """The model-output coefficient of noise injection at this step, or None when it does not apply."""
        alpha = self.config.noise_injection_alpha
        if alpha == 0 or float(timestep) >= self.config.noise_injection_tau:
            return None
        clock = self.clock
        scheduler = clock.scheduler
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(
                f"noise injection needs a variance-preserving scheduler with alphas_cumprod (DDIM, DPM-Solver, ...); "
                f"{type(scheduler).__name__} is not one: set noise_injection_alpha=0."
            )
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"noise injection is implemented for epsilon and v prediction, not {prediction!r}: "
                             "set noise_injection_alpha=0.")
        alpha_bar_t = float(alphas_cumprod[int(timestep)])
        if step + 1 < clock.num_steps:
            alpha_bar_prev = float(alphas_cumprod[int(clock.timesteps[step + 1])])
        else:
            alpha_bar_prev = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        coefficient = injection_eps_coefficient if prediction == "epsilon" else injection_v_coefficient
        return alpha * coefficient(alpha_bar_t, alpha_bar_prev)


class _PartHook(ModelHook):
    """A UNet part whose output is recorded at key steps and returned at non-key steps when `replays()` says so."""

    def __init__(self, state: _PropagationState, slot: str) -> None:
        super().__init__()
        self.state = state
        self.slot = slot

    def replays(self) -> bool:
        raise NotImplementedError

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.state
        if state.mode == "serve" and self.replays():
            return state.cache.features[self.slot]
        if state.mode == "tile":
            return _tile(state.cache.features[self.slot], state.repeat)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if state.mode == "record":
            state.cache.features[self.slot] = output
        return output


class EncoderPartHook(_PartHook):
    """Faster Diffusion encoder part (conv_in, a block, a layer): record at key steps, replay otherwise.

    `first_layer` is the index in `encoder_layers` of the part's first layer (conv_in: 0): at a non-key step
    the part is replayed when that layer is not recomputed (index >= the recompute depth), and runs otherwise
    (a down block that holds recomputed layers runs, and its own layer hooks replay the deeper ones). With
    `reuse_decoder` conv_in always runs: the shallow decoder reads its output.
    """

    def __init__(self, state: _PropagationState, slot: str, first_layer: int = 0) -> None:
        super().__init__(state, slot)
        self.first_layer = first_layer

    def replays(self) -> bool:
        state = self.state
        return self.first_layer >= state.depth and not (self.slot == "conv_in" and state.reuse_decoder)


class DecoderPartHook(_PartHook):
    """DeepCache's deep branch: a decoder part (layer, upsampler, up block) recorded at key steps and replayed at
    `reuse_decoder` non-key steps when the shallowest skip feature it reads is deeper than the recompute depth.
    (Parallel decoding, the "tile" mode, is refused with `reuse_decoder`.)"""

    def __init__(self, state: _PropagationState, slot: str, skip: int) -> None:
        super().__init__(state, slot)
        self.skip = skip

    def replays(self) -> bool:
        return self.state.reuse_decoder and self.skip > self.state.depth


class _StateHook(ModelHook):
    """A hook on a whole model (UNet or ControlNet) sharing the propagation state; knows the model's signature."""

    def __init__(self, state: _PropagationState) -> None:
        super().__init__()
        self.state = state
        self.signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(module.forward)
        return module


class EncoderPropagationHook(_StateHook):
    """Faster Diffusion encoder propagation on a UNet2DConditionModel: key / non-key forwards at the clock's step."""

    def _run(self, mode: str, call: dict[str, Any], repeat: int = 1):
        self.state.mode, self.state.repeat = mode, repeat
        try:
            return self.fn_ref.original_forward(**call)
        finally:
            self.state.mode, self.state.repeat = "off", 1

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.state
        step = state.clock.step
        cache = state.cache
        call = dict(self.signature.bind(*args, **kwargs).arguments)
        sample, timestep = call["sample"], call["timestep"]
        if step == 0:
            cache.z_T = sample.detach().clone()
        coefficient = state.injection(step, timestep)
        if coefficient is not None:
            if cache.z_T is None or cache.z_T.shape != sample.shape:
                raise ValueError("noise injection needs the same UNet batch at every step of a call.")
            call["sample"] = sample + state.config.noise_injection_alpha * cache.z_T

        if state.depth and call.get("down_intrablock_additional_residuals") is not None:
            raise ValueError(
                "recompute_shallow > 0 cannot replay T2I-adapter residuals into the recomputed down blocks: use "
                "EncoderPropagationConfig(recompute_shallow=0) with adapters."
            )

        if step in state.keys or not cache.features:
            probed = self._probe(call) if state.probe is not None and cache.features else None
            cache.residuals = {k: call.get(k) for k in _RESIDUAL_KEYS}
            output = self._run("record", call)
            if probed is not None:
                state.probe[1](step, probed, output[0])
            if state.config.parallel:
                self._decode_group(call, step)
        elif step in cache.decoded and cache.decoded[step][0] == float(timestep):
            output = _with_sample(self._output_template(call), cache.decoded.pop(step)[1])
        else:
            output = self._serve(call)

        if coefficient is not None:
            output = _with_sample(output, output[0] + coefficient * cache.z_T)
        return output

    def _serve(self, call: dict[str, Any]):
        """A non-key forward: the recorded encoder features (and ControlNet residuals) of the last key step."""
        call = {**call, **self.state.cache.residuals}
        if "down_intrablock_additional_residuals" in call:
            call["down_intrablock_additional_residuals"] = None  # already inside the recorded features
        return self._run("serve", call)

    def _probe(self, call: dict[str, Any]) -> dict[Variant, torch.Tensor]:
        """Calibration: this step's UNet output for each probed variant, served from the previous step's features."""
        state = self.state
        variants, _ = state.probe
        outputs = {}
        try:
            for depth, reuse_decoder in variants:
                state.depth, state.reuse_decoder = depth, reuse_decoder
                outputs[(depth, reuse_decoder)] = self._serve(call)[0]
        finally:
            state.depth, state.reuse_decoder = state.config.recompute_shallow, state.config.reuse_decoder
        return outputs

    @staticmethod
    def _output_template(call: dict[str, Any]):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return (None,) if not call.get("return_dict", True) else UNet2DConditionOutput(sample=None)

    def _decode_group(self, call: dict[str, Any], key: int) -> None:
        """Run the decoders of the non-key steps after `key` in batched passes; keep their outputs by step."""
        state = self.state
        cache = state.cache
        group = []
        for j in range(key + 1, state.clock.num_steps):
            if j in state.keys:
                break
            group.append(j)
        chunk = state.config.max_parallel_batch or max(1, len(group))
        sample = call["sample"]
        batch = sample.shape[0]
        for start in range(0, len(group), chunk):
            steps = group[start : start + chunk]
            m = len(steps)
            timesteps = state.clock.timesteps[steps].to(sample.device)
            tiled = {k: _tile_batch(v, batch, m) for k, v in call.items() if k not in ("sample", "timestep")}
            tiled.update({k: _tile(v, m) for k, v in cache.residuals.items()})
            tiled["sample"] = sample[:1].expand(m * batch, *sample.shape[1:])  # never read: the encoder is replayed
            tiled["timestep"] = timesteps.repeat_interleave(batch)
            tiled["return_dict"] = False
            if "down_intrablock_additional_residuals" in tiled:
                tiled["down_intrablock_additional_residuals"] = None
            out = self._run("tile", tiled, repeat=m)[0]
            for j, t, piece in zip(steps, timesteps.tolist(), out.chunk(m)):
                cache.decoded[j] = (float(t), piece)


class ControlNetPropagationHook(_StateHook):
    """Faster Diffusion for ControlNet: run the ControlNet at key steps only, replay its residuals otherwise."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.state
        step = state.clock.sync()  # the ControlNet runs before the UNet call of its step
        cache = state.cache
        if step not in state.keys and cache.controlnet_output is not None:
            return cache.controlnet_output
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if cache.z_T is not None and state.injection(step, timestep) is not None:
            call = dict(self.signature.bind(*args, **kwargs).arguments)
            sample = call["sample"]
            call["sample"] = sample + state.config.noise_injection_alpha * cache.z_T[: sample.shape[0]]
            args, kwargs = (), call
        cache.controlnet_output = self.fn_ref.original_forward(*args, **kwargs)
        return cache.controlnet_output


class EncoderPropagationAttachment(Attachment):
    """Faster Diffusion encoder propagation as attached by `fastdiff.apply`: its hooks and per-call state."""

    kind = "encoder_propagation"

    def __init__(self, config: EncoderPropagationConfig, unet: torch.nn.Module, controlnet, clock: StepClock) -> None:
        super().__init__(config)
        self.unet, self.controlnet = unet, controlnet
        self.state = _PropagationState(config, clock)
        self.layers = encoder_layers(unet) if config.recompute_shallow or config.reuse_decoder else []
        self.decoder = decoder_layers(unet) if config.reuse_decoder else []
        if config.recompute_shallow > len(self.layers):
            raise ValueError(
                f"recompute_shallow={config.recompute_shallow}, but this UNet's encoder has {len(self.layers)} layers "
                f"(fastdiff.hooks.encoder_layers): use 0-{len(self.layers)}."
            )

    def set_probe(self, variants: Sequence[Variant],
                  callback: Callable[[int, dict[Variant, torch.Tensor], torch.Tensor], None] | None) -> None:
        """Calibration: at every key step after the first, also run the UNet with the previous step's features for each
        (recompute depth, reuse_decoder) in `variants` and pass (step, {variant: output}, full output) to `callback`
        (None: stop)."""
        if callback is not None:
            if max((d for d, _ in variants), default=0) > len(self.layers):
                raise ValueError(f"probe depths {list(variants)} exceed the {len(self.layers)} layers hooked.")
            if any(r for _, r in variants) and not self.decoder:
                raise ValueError("probing reuse_decoder variants needs a config with reuse_decoder=True.")
        self.state.probe = None if callback is None else (tuple(variants), callback)

    def hooks(self) -> list[HookSpec]:
        unet, state = self.unet, self.state
        role = "encoder_propagation.encoder"
        first: dict[str, int] = {}  # block -> index of its first layer in `encoder_layers`
        layer_specs = []
        for index, (name, modules) in enumerate(self.layers):
            block = ".".join(name.split(".")[:2])
            first.setdefault(block, index)
            if block != "mid_block":
                layer_specs += [HookSpec(role, m, EncoderPartHook(state, f"{name}.{k}", index))
                                for k, m in enumerate(modules)]
        parts = [("conv_in", unet.conv_in)]
        parts += [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            parts.append(("mid_block", unet.mid_block))
        specs = [HookSpec(role, module, EncoderPartHook(state, slot, first.get(slot, 0))) for slot, module in parts]
        specs += layer_specs
        specs += self._decoder_specs()
        specs.append(HookSpec("encoder_propagation.unet", unet, EncoderPropagationHook(state)))
        if self.controlnet is not None:
            specs.append(HookSpec("encoder_propagation.controlnet", self.controlnet, ControlNetPropagationHook(state)))
        return specs

    def _decoder_specs(self) -> list[HookSpec]:
        """`reuse_decoder`: a hook on every decoder layer's modules, each upsampler and each up block, tagged with
        the shallowest skip feature the part reads (an upsampler or a block follows its block's last layer)."""
        if not self.decoder:
            return []
        role, state, specs = "encoder_propagation.encoder", self.state, []
        shallowest: dict[str, int] = {}
        for name, modules, skip in self.decoder:
            block = ".".join(name.split(".")[:2])
            shallowest[block] = min(skip, shallowest.get(block, skip))
            specs += [HookSpec(role, m, DecoderPartHook(state, f"{name}.{k}", skip)) for k, m in enumerate(modules)]
        for i, block in enumerate(self.unet.up_blocks):
            skip = shallowest[f"up_blocks.{i}"]
            specs.append(HookSpec(role, block, DecoderPartHook(state, f"up_blocks.{i}", skip)))
            for k, upsampler in enumerate(getattr(block, "upsamplers", None) or []):
                specs.append(HookSpec(role, upsampler, DecoderPartHook(state, f"up_blocks.{i}.upsamplers.{k}", skip)))
        return specs

    def on_new_call(self) -> None:
        self.state.on_new_call()

    def check_call(self, *, varying_batch: bool) -> None:
        if varying_batch:
            raise ValueError(
                "encoder propagation replays each image's encoder features at later steps, but this loop changes "
                "the UNet batch between steps (SVDD-PM with M > 1 runs the UNet on the B*M candidates): use "
                "SVDDConfig(variant='mc') or num_candidates=1, or fastdiff.remove(pipe, 'encoder_propagation') first."
            )

    def close(self) -> None:
        self.state.reset()


def make_attachment(pipe_or_unet, unet: torch.nn.Module, config: EncoderPropagationConfig,
                    clock: StepClock) -> EncoderPropagationAttachment:
    """Faster Diffusion encoder propagation for `fastdiff.apply`: validate the UNet, find the ControlNet."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(
            f"encoder propagation handles diffusers' UNet2DConditionModel (or a pipeline with one as .unet); "
            f"got {type(unet).__name__}. Apply it before torch.compile."
        )
    controlnet = getattr(pipe_or_unet, "controlnet", None) if pipe_or_unet is not unet else None
    return EncoderPropagationAttachment(config, unet, controlnet, clock)


def apply_encoder_propagation(pipe_or_unet, config: EncoderPropagationConfig, scheduler=None) -> Stack:
    """Faster Diffusion (arXiv 2312.09608) encoder propagation: `fastdiff.apply(pipe_or_unet, config)`.

    Args:
        pipe_or_unet: a pipeline with `.unet` (a `UNet2DConditionModel`) and `.scheduler` (and optionally
            `.controlnet`, hooked too), or a `UNet2DConditionModel` together with `scheduler`.
        config (`EncoderPropagationConfig`): key steps, parallel decoding and noise injection.
        scheduler: the scheduler driving a bare UNet; with a pipeline, its current `.scheduler` is read at every call.

    Example:
        >>> from fastdiff.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps="fd50", parallel=True))
        >>> image = pipe("a red cube", num_inference_steps=50, height=64, width=64).images[0]
        >>> remove_encoder_propagation(pipe)
    """
    from fastdiff.compose import apply

    if not isinstance(config, EncoderPropagationConfig):
        raise ValueError("config must be an EncoderPropagationConfig.")
    return apply(pipe_or_unet, config, scheduler=scheduler)


def remove_encoder_propagation(pipe_or_unet) -> None:
    """Faster Diffusion encoder propagation: `fastdiff.remove(pipe_or_unet, "encoder_propagation")`."""
    from fastdiff.compose import remove

    remove(pipe_or_unet, "encoder_propagation")


def encoder_propagation(pipe_or_unet, config: EncoderPropagationConfig, scheduler=None) -> Stack:
    """Faster Diffusion encoder propagation inside a `with` block; removed on exit (also on error).

    The handle `fastdiff.apply` returns is the context manager."""
    return apply_encoder_propagation(pipe_or_unet, config, scheduler=scheduler)
