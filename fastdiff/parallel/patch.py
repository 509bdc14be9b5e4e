"""DistriFusion (arXiv 2402.19481) / PCPP (arXiv 2412.02962) patch parallelism as a `fastdiff.compose` attachment.

`make_attachment` (called by `fastdiff.apply(pipe, PatchParallelConfig(...), group=...)`) builds a
`PatchParallelAttachment` whose hooks are diffusers `ModelHook`s on the original modules:

- role "patch_parallel.layers" (innermost): one band-aware hook per Conv2d (kernel > 1), self-attention and
  GroupNorm of the UNet (`layers.py`); other accelerators' hooks on the same modules still run around it;
- role "patch_parallel.unet" (on the UNet, inside the step clock): with `split_cfg` (and an even number of
  ranks) it cuts the UNet batch in half for this rank's half of the ranks and, after the call, swaps outputs
  with its pair (`split_batch.py`); it checks that the latent height splits evenly at every level and slices
  ControlNet residuals into bands.

Which denoising step a call belongs to (warm-up vs asynchronous, byte accounting) comes from the step clock.
`enable_patch_parallel` / `disable_patch_parallel` are thin aliases of `fastdiff.apply` / `fastdiff.remove`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from fastdiff.compose import Attachment, HookSpec
from fastdiff.parallel.comm import Communicator
from fastdiff.parallel.config import PatchParallelConfig
from fastdiff.parallel.layers import (
    PatchConv2d,
    PatchGroupNorm,
    PatchLayer,
    PatchSelfAttention,
    PatchState,
    layer_plan,
)
from fastdiff.parallel.split_batch import gather_output, split_groups, split_inputs

_RESIDUAL_KWARGS = ("down_block_additional_residuals", "down_intrablock_additional_residuals")


def num_downsamples(unet: nn.Module) -> int:
    """How many times the UNet halves the resolution (its down blocks with a downsampler)."""
    return sum(1 for blk in unet.down_blocks if getattr(blk, "downsamplers", None))


def check_divisible(latent_height: int, world_size: int, num_down: int) -> None:
    """Raise ValueError unless every UNet level's height splits into `world_size` equal bands."""
    multiple = world_size * 2**num_down
    if latent_height % multiple:
        raise ValueError(
            f"patch parallelism over {world_size} ranks splits every UNet level into {world_size} equal row bands, "
            f"so the latent height must be a multiple of {world_size}*2^{num_down} = {multiple}; got {latent_height}. "
            f"Pick an image height whose latent is a multiple of {multiple} rows (or use fewer ranks)."
        )


class PatchParallelUNetHook(ModelHook):
    """DistriFusion (arXiv 2402.19481) UNet-level hook: batch split / output gather, input checks, ControlNet bands."""

    _is_stateful = True

    def __init__(self, state: PatchState, num_down: int) -> None:
        super().__init__()
        self.state, self.num_down = state, num_down

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        st.comm.step = st.step
        sample = args[0] if args else kwargs["sample"]
        check_divisible(sample.shape[-2], st.world_size, self.num_down)  # local checks before any communication
        if kwargs.get("attention_mask") is not None:
            raise ValueError("patch parallelism does not support a self-attention `attention_mask`: call the UNet "
                             "without one (or remove patch parallelism).")
        if not st.inputs_checked:  # first UNet call of a pipeline call: every rank must denoise the same latents
            st.comm.check_same(sample, "the latents", "every rank must start from the same noise; give each rank "
                               "the same generator seed (not a rank-dependent one) and the same inputs.")
            st.inputs_checked = True
        split = st.split is not None and sample.shape[0] % 2 == 0
        if split:
            st.split.pair.step = st.step
            args, kwargs = split_inputs(args, kwargs, sample.shape[0], st.split.index)
            sample = args[0] if args else kwargs["sample"]
        for key in _RESIDUAL_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(self._band(t) for t in kwargs[key])
        if kwargs.get("mid_block_additional_residual") is not None:
            kwargs["mid_block_additional_residual"] = self._band(kwargs["mid_block_additional_residual"])
        output = self.fn_ref.original_forward(*args, **kwargs)
        return gather_output(output, st.split) if split else output

    def _band(self, t: torch.Tensor) -> torch.Tensor:
        h = t.shape[2] // self.state.world_size
        return t[:, :, self.state.rank * h:(self.state.rank + 1) * h]

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module


class PatchParallelAttachment(Attachment):
    """DistriFusion (arXiv 2402.19481) / PCPP (arXiv 2412.02962) patch parallelism attached through `fastdiff.compose`.

    `state` is the `PatchState` (communicator, byte counts, `state.layers`: the layer hooks).
    """

    kind = "patch_parallel"

    def __init__(self, config: PatchParallelConfig, unet: nn.Module, state: PatchState,
                 modules: list[nn.Module]) -> None:
        super().__init__(config)
        self.unet, self.state, self.modules = unet, state, modules
        self.unet_hook = PatchParallelUNetHook(state, num_downsamples(unet))

    def hooks(self) -> list[HookSpec]:
        specs = [HookSpec("patch_parallel.layers", m, h) for m, h in zip(self.modules, self.state.layers)]
        return [*specs, HookSpec("patch_parallel.unet", self.unet, self.unet_hook)]

    def on_new_call(self) -> None:
        self.state.reset()
        self.state.reset_counts()

    def close(self) -> None:
        try:
            self.state.reset(drain=True)
        except Exception:  # a peer already died: nothing left to wait for, detach anyway
            self.state.reset(drain=False)


def make_attachment(pipe_or_unet: Any, unet: nn.Module, config: PatchParallelConfig, clock: Any,
                    group: Any = None) -> PatchParallelAttachment:
    """DistriFusion / PCPP: validate the UNet and the process group, build the layer hooks (nothing registered yet).

    Args:
        group: the process group of the ranks sharing this image (None: the default group), or a ready
            `Communicator` (e.g. an in-process simulator).

    Raises:
        ValueError: a layer that cannot be split by rows, no initialised process group (the message gives the
            launch command), or `split_cfg` with a ready Communicator.
    """
    if not isinstance(config, PatchParallelConfig):
        raise ValueError(f"patch parallelism takes a PatchParallelConfig, got {type(config).__name__}.")
    plan = layer_plan(unet)  # validates every layer before anything changes
    ready = isinstance(group, Communicator)  # e.g. the in-process simulator
    comm = group if ready else Communicator(group, config.timeout_s)
    split = None
    if config.split_cfg and comm.world_size % 2 == 0:
        if ready:
            raise ValueError("split_cfg=True needs a torch.distributed process group to split into halves; "
                             "pass `group` as a process group (or None), or use split_cfg=False.")
        patch_group, split = split_groups(group, config.timeout_s)
        comm = Communicator(patch_group, config.timeout_s)
    state = PatchState(config, comm, split, clock)
    named = dict(unet.named_modules())
    modules: list[nn.Module] = []
    for layer_id, spec in enumerate(plan if comm.world_size > 1 else []):  # one rank per half: no bands
        if spec.kind == "conv":
            layer: PatchLayer = PatchConv2d(state, layer_id, spec.role)
        elif spec.kind == "norm":
            layer = PatchGroupNorm(state, layer_id)
        else:
            layer = PatchSelfAttention(state, layer_id)
        modules.append(named[spec.name])
        state.layers.append(layer)
    return PatchParallelAttachment(config, unet, state, modules)


def enable_patch_parallel(pipe: Any, config: PatchParallelConfig | None = None, group: Any = None,
                          scheduler: Any = None) -> PatchState:
    """DistriFusion / PCPP patch parallelism: split the pipeline's UNet over the ranks of `group` by row bands.

    An alias of `fastdiff.apply(pipe, config, group=group)["patch_parallel"].state`. Every rank of `group`
    runs the same pipeline call with the same inputs and seeds; each computes one row band of every UNet
    activation and, after each UNet call, every rank holds the full output (so the scheduler, VAE and the
    final image are identical on all ranks; let only one rank write). The process group is the caller's
    (e.g. `torch.distributed.init_process_group()` under `torchrun --nproc_per_node 2 script.py`); pass a
    subgroup to run several images at once, one per group of ranks (data x patch parallel).

    Args:
        pipe: a diffusers pipeline with a `unet` (SD, SDXL, ControlNet, fastdiff's ReferencePipeline), or a UNet
            together with `scheduler`.
        config: `PatchParallelConfig` (default: DistriFusion async, 4 warm-up steps, full conditioning).
        group: the process group of the ranks sharing this image (None: the default group), or a ready
            `Communicator` (e.g. an in-process simulator).
        scheduler: the scheduler driving a bare UNet (its `timesteps` give the step of each call).

    Returns:
        The `PatchState`: step clock, the patch group's communicator with per-step received bytes
        and, with `split_cfg`, `state.split` (this rank's batch half and its pair's communicator).

    Example:
        >>> torch.distributed.init_process_group("gloo")  # launched with torchrun --nproc_per_node 2
        >>> enable_patch_parallel(pipe, PatchParallelConfig(mode="async", warmup_steps=4))
        >>> image = pipe("a red cube", generator=torch.Generator().manual_seed(0)).images[0]
        >>> disable_patch_parallel(pipe)
    """
    from fastdiff import compose

    stack = compose.apply(pipe, config or PatchParallelConfig(), scheduler=scheduler, group=group)
    return stack["patch_parallel"].state


def disable_patch_parallel(pipe: Any) -> None:
    """Undo `enable_patch_parallel` (`fastdiff.remove(pipe, "patch_parallel")`): drains exchanges, removes the hooks."""
    from fastdiff import compose

    compose.remove(pipe, "patch_parallel")


def patch_parallel_state(pipe: Any) -> PatchState | None:
    """The active `PatchState` of a pipeline (or UNet), or None when patch parallelism is off."""
    from fastdiff import compose

    attachment = compose.attachments(pipe).get("patch_parallel")
    return None if attachment is None else attachment.state


def reset_patch_parallel(pipe: Any) -> None:
    """Start a new pipeline call at the next UNet call (step 0: warm-up again) and forget the byte counts."""
    state = patch_parallel_state(pipe)
    if state is not None:
        state.reset()
        state.reset_counts()
        state.clock.forget()
