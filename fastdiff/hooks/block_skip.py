"""AutoDiffusion (Li et al. 2023, arXiv 2309.10438) stage 2: skip chosen UNet layers at chosen denoising steps.

The paper's dynamic UNet gives every residual block and attention block a layer id; a skipped residual block
returns its shortcut (identity, or the 1x1 convolution when the channels change) and a skipped attention
block returns its input. Here the layers are diffusers' `ResnetBlock2D` and `Transformer2DModel` modules of
a `UNet2DConditionModel`'s down, mid and up blocks, numbered in forward order (`skippable_layers`):

- a skipped `ResnetBlock2D` returns ``conv_shortcut(resample(x)) / output_scale_factor`` (its residual branch,
  norm-conv-norm-conv, is dropped; the up/down-sampling of the shortcut path is kept);
- a skipped `Transformer2DModel` returns its input hidden states.

Attached through `diffusers.hooks.HookRegistry`: a stateful hook on the UNet counts the UNet calls of one
pipeline call (one call per step, as in encoder propagation), and a hook on each listed layer returns the
shortcut at the steps that skip it. Nothing assigns `forward`; removal restores the model exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from fastdiff.clock import StepClock
from fastdiff.compose import Attachment, HookSpec, Stack


def skippable_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """AutoDiffusion layer ids: (name, module) of every ResnetBlock2D / Transformer2DModel in forward order.

    Down blocks, then the mid block, then the up blocks; inside a block its resnets and attentions
    interleave as the block runs them (resnet i, then attention i).
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"block skipping handles diffusers' UNet2DConditionModel, got {type(unet).__name__}.")
    layers: list[tuple[str, torch.nn.Module]] = []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in blocks:
        resnets = list(getattr(block, "resnets", []))
        attentions = list(getattr(block, "attentions", None) or [])  # UNetMidBlock2D may hold None entries
        if prefix == "mid_block":  # the mid block runs resnet 0, then (attention i, resnet i + 1)
            order = [("resnets.0", resnets[0])]
            for i, attention in enumerate(attentions):
                order += [(f"attentions.{i}", attention), (f"resnets.{i + 1}", resnets[i + 1])]
        else:
            order = []
            for i, resnet in enumerate(resnets):
                order.append((f"resnets.{i}", resnet))
                if i < len(attentions):
                    order.append((f"attentions.{i}", attentions[i]))
        layers += [(f"{prefix}.{name}", module) for name, module in order if module is not None]
    return layers


@dataclass
class BlockSkipConfig:
    """AutoDiffusion (arXiv 2309.10438) per-step layer skips.

    Args:
        skips: the (step index, layer id) pairs to skip, 0 = noisiest step, layer ids from `skippable_layers`;
            a mapping {step: [layer ids]} is accepted too.
    """

    skips: Sequence[tuple[int, int]] | Mapping[int, Sequence[int]]

    def __post_init__(self) -> None:
        pairs: Iterable = self.skips
        if isinstance(self.skips, Mapping):
            pairs = [(step, layer) for step, layers in self.skips.items() for layer in layers]
        try:
            normal = sorted({(int(s), int(layer)) for s, layer in pairs})
        except (TypeError, ValueError):
            raise ValueError("skips must be (step, layer) pairs of ints or a mapping {step: [layer ids]}.") from None
        if any(s < 0 or layer < 0 for s, layer in normal):
            raise ValueError(f"skips {normal} hold a negative step or layer id: both count from 0.")
        self.skips = tuple(normal)

    def steps_by_layer(self) -> dict[int, frozenset[int]]:
        """Layer id -> the steps that skip it."""
        out: dict[int, set[int]] = {}
        for step, layer in self.skips:
            out.setdefault(layer, set()).add(step)
        return {layer: frozenset(steps) for layer, steps in out.items()}

    def check_steps(self, num_steps: int) -> None:
        """Refuse skip steps past a `num_steps`-step call (indices 0..num_steps-1)."""
        late = sorted({s for s, _ in self.skips if s >= num_steps})
        if late:
            raise ValueError(f"skip steps {late} are out of range for {num_steps} steps (indices 0-{num_steps - 1}).")


class _LayerSkipHook(ModelHook):
    """AutoDiffusion layer skip: at the chosen steps, the layer's shortcut instead of the layer."""

    def __init__(self, clock: StepClock, steps: frozenset[int]) -> None:
        super().__init__()
        self.clock = clock
        self.steps = steps  # the steps that skip this layer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.clock.step not in self.steps:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = args[0] if args else kwargs.get("input_tensor", kwargs.get("hidden_states"))
        if hasattr(module, "conv_shortcut"):  # ResnetBlock2D
            return resnet_shortcut(module, hidden)
        if kwargs.get("return_dict", True):
            return Transformer2DModelOutput(sample=hidden)
        return (hidden,)


def resnet_shortcut(resnet: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A diffusers ResnetBlock2D with its residual branch dropped: the shortcut path of its forward."""
    if resnet.upsample is not None:
        x = resnet.upsample(x)
    elif resnet.downsample is not None:
        x = resnet.downsample(x)
    if resnet.conv_shortcut is not None:
        x = resnet.conv_shortcut(x)
    return x / resnet.output_scale_factor


class BlockSkipAttachment(Attachment):
    """AutoDiffusion block skipping as attached by `fastdiff.apply`: one hook per listed layer, steps from the clock."""

    kind = "block_skip"

    def __init__(self, config: BlockSkipConfig, layers: list[tuple[str, torch.nn.Module]], clock: StepClock) -> None:
        super().__init__(config)
        self.layers, self.clock = layers, clock

    def hooks(self) -> list[HookSpec]:
        return [HookSpec("block_skip.layers", self.layers[layer][1], _LayerSkipHook(self.clock, steps))
                for layer, steps in self.config.steps_by_layer().items()]

    def on_new_call(self) -> None:
        self.config.check_steps(self.clock.num_steps)


def make_attachment(pipe_or_unet, unet: torch.nn.Module, config: BlockSkipConfig,
                    clock: StepClock) -> BlockSkipAttachment:
    """AutoDiffusion block skipping for `fastdiff.apply`: check the layer ids against this UNet."""
    layers = skippable_layers(unet)
    bad = sorted({layer for _, layer in config.skips if layer >= len(layers)})
    if bad:
        raise ValueError(f"layer ids {bad} are out of range: this UNet has {len(layers)} skippable layers "
                         f"(0-{len(layers) - 1}, see skippable_layers).")
    return BlockSkipAttachment(config, layers, clock)


def apply_block_skip(pipe_or_unet, config: BlockSkipConfig, scheduler=None) -> Stack:
    """AutoDiffusion (arXiv 2309.10438) stage 2: skip `config.skips` layers at their steps; `fastdiff.apply`.

    Args:
        pipe_or_unet: a pipeline with `.unet` (a `UNet2DConditionModel`) and `.scheduler`, or the UNet with
            `scheduler`.
        config (`BlockSkipConfig`): the (step, layer id) pairs; layer ids index `skippable_layers(unet)`.
        scheduler: the scheduler driving a bare UNet; with a pipeline, its current `.scheduler` is read at every call.

    Example:
        >>> from fastdiff.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> apply_block_skip(pipe, BlockSkipConfig(skips={3: [0, 5], 4: [2]}))
        >>> image = pipe("a red cube", num_inference_steps=5, height=64, width=64).images[0]
        >>> remove_block_skip(pipe)
    """
    from fastdiff.compose import apply

    if not isinstance(config, BlockSkipConfig):
        raise ValueError("config must be a BlockSkipConfig.")
    return apply(pipe_or_unet, config, scheduler=scheduler)


def remove_block_skip(pipe_or_unet) -> None:
    """AutoDiffusion block skipping: `fastdiff.remove(pipe_or_unet, "block_skip")`."""
    from fastdiff.compose import remove

    remove(pipe_or_unet, "block_skip")


def block_skip(pipe_or_unet, config: BlockSkipConfig, scheduler=None) -> Stack:
    """AutoDiffusion block skipping inside a `with` block; removed on exit (also on error).

    The handle `fastdiff.apply` returns is the context manager."""
    return apply_block_skip(pipe_or_unet, config, scheduler=scheduler)
