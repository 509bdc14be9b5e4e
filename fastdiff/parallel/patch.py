"""DistriFusion (arXiv 2402.19481) / PCPP (arXiv 2412.02962) patch parallelism: enable / disable on a pipeline.

`enable_patch_parallel` swaps the UNet's Conv2d (kernel > 1), self-attention and GroupNorm children for
band-aware wrappers (`layers.py`) that keep the originals inside, and attaches one diffusers `ModelHook`
to the UNet that counts UNet calls (warm-up vs asynchronous), resets at each new pipeline call, checks
that the latent height splits evenly at every level and slices ControlNet residuals into bands.
With `split_cfg` (and an even number of ranks) the same hook first cuts the UNet batch in half for this
rank's half of the ranks and, after the call, swaps outputs with its pair (`split_batch.py`).
`disable_patch_parallel` puts the original layers back and removes the hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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

HOOK_NAME = "fastdiff_patch_parallel"
_ATTR = "_fastdiff_patch_parallel"
_RESIDUAL_KWARGS = ("down_block_additional_residuals", "down_intrablock_additional_residuals")


def _unet(pipe_or_unet: Any) -> nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, nn.Module) or not hasattr(unet, "down_blocks"):
        raise ValueError("patch parallelism needs a diffusers pipeline with a `unet` (or a UNet2DConditionModel).")
    return unet


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


class _PatchParallelHook:
    """diffusers ModelHook on the UNet: per-call step counting, reset per pipeline call, input checks."""

    _is_stateful = True

    def __init__(self, state: PatchState, unet: nn.Module, pipe: Any) -> None:
        self.state, self.pipe = state, pipe
        self.num_down = num_downsamples(unet)
        self._timesteps_seen: Any = None
        self._split_now = False

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        st = self.state
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None and timesteps is not self._timesteps_seen:
            # set_timesteps() runs once per pipeline call and makes a new tensor: a new call has started
            self._timesteps_seen = timesteps
            st.reset()
            st.reset_counts()
        st.comm.step = st.step
        sample = args[0] if args else kwargs["sample"]
        self._split_now = st.split is not None and sample.shape[0] % 2 == 0
        if self._split_now:
            st.split.pair.step = st.step
            args, kwargs = split_inputs(args, kwargs, sample.shape[0], st.split.index)
            sample = args[0] if args else kwargs["sample"]
        check_divisible(sample.shape[-2], st.world_size, self.num_down)
        if kwargs.get("attention_mask") is not None:
            raise ValueError("patch parallelism does not support a self-attention `attention_mask`.")
        for key in _RESIDUAL_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(self._band(t) for t in kwargs[key])
        if kwargs.get("mid_block_additional_residual") is not None:
            kwargs["mid_block_additional_residual"] = self._band(kwargs["mid_block_additional_residual"])
        return args, kwargs

    def _band(self, t: torch.Tensor) -> torch.Tensor:
        h = t.shape[2] // self.state.world_size
        return t[:, :, self.state.rank * h:(self.state.rank + 1) * h]

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self._split_now:
            output = gather_output(output, self.state.split)
        self.state.step += 1
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module


def _model_hook(state: PatchState, unet: nn.Module, pipe: Any):
    from diffusers.hooks import ModelHook

    class PatchParallelHook(_PatchParallelHook, ModelHook):
        def __init__(self) -> None:
            ModelHook.__init__(self)
            _PatchParallelHook.__init__(self, state, unet, pipe)

    return PatchParallelHook()


def enable_patch_parallel(pipe: Any, config: PatchParallelConfig | None = None, group: Any = None) -> PatchState:
    """DistriFusion / PCPP patch parallelism: split the pipeline's UNet over the ranks of `group` by row bands.

    Every rank of `group` runs the same pipeline call with the same inputs and seeds; each computes one
    row band of every UNet activation and, after each UNet call, every rank holds the full output (so
    the scheduler, VAE and the final image are identical on all ranks; let only one rank write).
    The process group is the caller's (e.g. `torch.distributed.init_process_group()` under torchrun);
    pass a subgroup to run several images at once, one per group of ranks (data x patch parallel).

    Args:
        pipe: a diffusers pipeline with a `unet` (SD, SDXL, ControlNet, fastdiff's ReferencePipeline), or a UNet.
        config: `PatchParallelConfig` (default: DistriFusion async, 4 warm-up steps, full conditioning).
        group: the process group of the ranks sharing this image (None: the default group), or a ready
            `Communicator` (e.g. an in-process simulator).

    Returns:
        The `PatchState`: step counter, the patch group's communicator with per-step received bytes
        and, with `split_cfg`, `state.split` (this rank's batch half and its pair's communicator).

    Example:
        >>> torch.distributed.init_process_group("gloo")  # launched with torchrun --nproc_per_node 2
        >>> enable_patch_parallel(pipe, PatchParallelConfig(mode="async", warmup_steps=4))
        >>> image = pipe("a red cube", generator=torch.Generator().manual_seed(0)).images[0]
        >>> disable_patch_parallel(pipe)
    """
    from diffusers.hooks import HookRegistry

    config = config or PatchParallelConfig()
    unet = _unet(pipe)
    if hasattr(unet, _ATTR):
        raise ValueError("patch parallelism is already enabled on this UNet: call disable_patch_parallel first.")
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
    state = PatchState(config, comm, split)
    modules = dict(unet.named_modules())
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for layer_id, spec in enumerate(plan if comm.world_size > 1 else []):  # one rank per half: no bands
        parent_name, _, child = spec.name.rpartition(".")
        parent = modules[parent_name] if parent_name else unet
        original = modules[spec.name]
        if spec.kind == "conv":
            wrapper: PatchLayer = PatchConv2d(original, state, layer_id, spec.role)
        elif spec.kind == "norm":
            wrapper = PatchGroupNorm(original, state, layer_id)
        else:
            wrapper = PatchSelfAttention(original, state, layer_id)
        setattr(parent, child, wrapper)
        swapped.append((parent, child, original))
        state.layers.append(wrapper)
    hook = _model_hook(state, unet, pipe if pipe is not unet else None)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, HOOK_NAME)
    setattr(unet, _ATTR, (state, swapped))
    return state


def disable_patch_parallel(pipe: Any) -> None:
    """Undo `enable_patch_parallel`: the original layers go back in place and the UNet hook is removed."""
    unet = _unet(pipe)
    entry = getattr(unet, _ATTR, None)
    if entry is None:
        return
    state, swapped = entry
    try:
        state.reset(drain=True)
    except Exception:  # a peer already died: nothing left to wait for, restore anyway
        state.reset(drain=False)
    for parent, child, original in reversed(swapped):
        setattr(parent, child, original)
    unet._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    delattr(unet, _ATTR)


def patch_parallel_state(pipe: Any) -> PatchState | None:
    """The active `PatchState` of a pipeline (or UNet), or None when patch parallelism is off."""
    entry = getattr(_unet(pipe), _ATTR, None)
    return None if entry is None else entry[0]


def reset_patch_parallel(pipe: Any) -> None:
    """Start counting UNet calls from 0 again (automatic at each pipeline call; needed for bare UNet calls)."""
    state = patch_parallel_state(pipe)
    if state is not None:
        state.reset()
        state.reset_counts()
