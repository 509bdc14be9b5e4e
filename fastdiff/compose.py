"""One door for every accelerator: `fastdiff.apply(pipe, *configs)` and `fastdiff.remove(pipe, ...)`.

This module is the only place that knows how accelerators combine:

- **the stacking order** (`ROLES`): on any module, hooks are registered innermost first in this order,
  whatever order the user applied the accelerators in (every apply / remove re-stacks them);
- **the refusals** (`check_pairs`, `check_call`): each with the reason a user would accept, raised as a
  `ValueError` before any UNet call.

Each accelerator module provides an `Attachment` (its hooks, per-call reset and release); this module
registers them through `diffusers.hooks.HookRegistry`, under a `StepClock` (`fastdiff.clock`) that is
the outermost hook of the UNet and the one source of "which step is this".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from fastdiff.clock import HOOK_NAME as CLOCK_NAME
from fastdiff.clock import StepClock, step_clock

# Innermost first. On a module that several accelerators hook, an earlier role runs closer to the module's own
# forward; later roles can short-circuit the earlier ones.
ROLES: tuple[str, ...] = (
    "patch_parallel.layers",  # band-aware computation: replaces the layer's forward, calls nothing inner
    "block_skip.layers",  # a skipped layer returns its shortcut (no band computation needed for it)
    "encoder_propagation.encoder",  # replayed encoder features skip every layer below them
    "encoder_propagation.controlnet",  # a replayed ControlNet output skips the ControlNet
    "encoder_propagation.unet",  # key / non-key steps; parallel decoding tiles the batch for what runs inside
    "patch_parallel.unet",  # split_cfg cuts the CFG batch before anything tiles it; bands ControlNet residuals
)

# config class name -> the module whose `make_attachment(pipe_or_unet, unet, config, clock, ...)` attaches it
FACTORIES: dict[str, str] = {
    "EncoderPropagationConfig": "fastdiff.hooks.encoder_propagation",
    "BlockSkipConfig": "fastdiff.hooks.block_skip",
    "PatchParallelConfig": "fastdiff.parallel.patch",
}

KINDS: dict[str, str] = {
    "EncoderPropagationConfig": "encoder_propagation",
    "BlockSkipConfig": "block_skip",
    "PatchParallelConfig": "patch_parallel",
}


@dataclass
class HookSpec:
    """One hook to register: its role (its place in `ROLES`), the module it goes on and the hook."""

    role: str
    module: torch.nn.Module
    hook: ModelHook


class Attachment:
    """One applied accelerator: its config, the hooks it needs, and what it does at a new pipeline call."""

    kind: str = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    def hooks(self) -> list[HookSpec]:
        raise NotImplementedError

    def on_new_call(self) -> None:
        """A new pipeline call starts (the clock saw new timesteps): forget per-call state."""

    def check_call(self, *, varying_batch: bool) -> None:
        """Raise ValueError if a loop whose UNet batch changes between steps (`varying_batch`) cannot be honoured."""

    def close(self) -> None:
        """Detached for good: release what the attachment holds (pending exchanges, caches)."""


def _kind(config: Any) -> str:
    name = type(config).__name__
    if name not in KINDS:
        raise ValueError(
            f"fastdiff.apply takes accelerator configs ({', '.join(KINDS)}), got {name}. Swap schedulers with "
            "pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config); SVDD runs as "
            "fastdiff.guidance.svdd_sample(pipe, ...)."
        )
    return KINDS[name]


def _unet(pipe_or_unet: Any) -> torch.nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "down_blocks"):
        raise ValueError(
            f"fastdiff accelerators attach to a diffusers pipeline with a UNet2DConditionModel as `pipe.unet`, or "
            f"to the UNet itself; got {type(pipe_or_unet).__name__}."
        )
    return unet


def _scheduler_of(pipe_or_unet: Any, unet: torch.nn.Module, scheduler: Any):
    """A getter of the scheduler driving the UNet: the pipeline's current one, or the one passed with a bare UNet."""
    if scheduler is not None:
        return lambda: scheduler
    if pipe_or_unet is not unet and hasattr(pipe_or_unet, "scheduler"):
        return lambda: pipe_or_unet.scheduler
    return None


def attachments(pipe_or_unet: Any) -> dict[str, Attachment]:
    """The accelerators applied to a pipeline's UNet, by kind (empty when none)."""
    clock = step_clock(_unet(pipe_or_unet))
    return dict(clock.attachments) if clock is not None else {}


def check_pairs(configs: dict[str, Any] | list[Any]) -> None:
    """Raise ValueError for accelerators that cannot run together, with the reason and the fix (configs by kind)."""
    if isinstance(configs, list):
        by_kind: dict[str, Any] = {}
        for config in configs:
            if _kind(config) in by_kind:
                raise ValueError(f"{_kind(config)} is given twice: give each accelerator once.")
            by_kind[_kind(config)] = config
        configs = by_kind
    ep, bs = configs.get("encoder_propagation"), configs.get("block_skip")
    if ep is not None and bs is not None and ep.parallel:
        raise ValueError(
            "block skipping cannot run with parallel decoding: the batched decoders of later steps run inside the "
            "key step's UNet call, where the key step's layer skips would apply to them. Use "
            "EncoderPropagationConfig(parallel=False) with block skipping."
        )


def check_call(pipe_or_unet: Any, *, varying_batch: bool = False) -> None:
    """Raise ValueError, before any UNet call, if the applied accelerators cannot serve a loop of this kind.

    Args:
        varying_batch: the loop calls the UNet on a batch that changes from step to step (SVDD-PM with M > 1).
    """
    for attachment in attachments(pipe_or_unet).values():
        attachment.check_call(varying_batch=varying_batch)


class Stack:
    """What one `fastdiff.apply` call attached; `remove()` detaches exactly that, and so does leaving a `with`."""

    def __init__(self, pipe_or_unet: Any, kinds: list[str]) -> None:
        self.pipe, self.kinds = pipe_or_unet, kinds

    def __getitem__(self, kind: str) -> Attachment:
        return attachments(self.pipe)[kind]

    def remove(self) -> None:
        remove(self.pipe, *self.kinds)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply(pipe_or_unet: Any, *configs: Any, scheduler: Any = None, group: Any = None) -> Stack:
    """fastdiff: attach accelerators to a pipeline (or a UNet with `scheduler=`) in the one canonical stack.

    Args:
        pipe_or_unet: a diffusers pipeline with `.unet` (and `.scheduler`, read at every call), or the
            `UNet2DConditionModel` itself together with `scheduler`.
        *configs: `EncoderPropagationConfig`, `BlockSkipConfig`, `PatchParallelConfig`, at most one of each.
        scheduler: the scheduler driving a bare UNet (with a pipeline, its current `.scheduler` is used).
        group: patch parallelism's process group (None: the default group), or a ready `Communicator`.

    Returns:
        A `Stack` handle: `handle.remove()`, or use it as a context manager; `handle["patch_parallel"]`.

    Raises:
        ValueError: before anything is attached, for an unknown config, an accelerator applied twice, or a pair
            that cannot run together (the message names the fix).

    Example:
        >>> from fastdiff.testing import tiny_sd_pipeline
        >>> from fastdiff.hooks import EncoderPropagationConfig, BlockSkipConfig
        >>> pipe = tiny_sd_pipeline()
        >>> with fastdiff.apply(pipe, EncoderPropagationConfig(key_steps=2), BlockSkipConfig(skips=[(1, 0)])):
        ...     image = pipe("a red cube", num_inference_steps=4, height=64, width=64).images[0]
    """
    unet = _unet(pipe_or_unet)
    clock = step_clock(unet)
    current = dict(clock.attachments) if clock is not None else {}
    wanted: dict[str, Any] = {}
    for config in configs:
        kind = _kind(config)
        if kind in wanted or kind in current:
            raise ValueError(f"{kind} is already applied: call fastdiff.remove(pipe, {kind!r}) first.")
        wanted[kind] = config
    check_pairs({**{k: a.config for k, a in current.items()}, **wanted})
    scheduler_of = _scheduler_of(pipe_or_unet, unet, scheduler)
    if scheduler_of is None and clock is None:
        raise ValueError("a bare UNet needs the scheduler that drives it: fastdiff.apply(unet, config, scheduler=...).")
    new_clock = clock or StepClock(scheduler_of)
    if scheduler_of is not None:
        new_clock.scheduler_of = scheduler_of
    made: dict[str, Attachment] = {}
    try:
        for kind, config in wanted.items():
            module = importlib.import_module(FACTORIES[type(config).__name__])
            options = {"group": group} if kind == "patch_parallel" else {}
            made[kind] = module.make_attachment(pipe_or_unet, unet, config, new_clock, **options)
    except BaseException:
        for attachment in made.values():
            attachment.close()
        raise
    new_clock.attachments.update(made)
    _restack(unet, new_clock)
    return Stack(pipe_or_unet, list(made))


def remove(pipe_or_unet: Any, *kinds: str | Any) -> None:
    """fastdiff: detach the named accelerators (kinds such as `"encoder_propagation"`, or their configs), or all.

    Removing everything restores the pipeline's UNet bit-identically (no hook of fastdiff is left).
    """
    unet = _unet(pipe_or_unet)
    clock = step_clock(unet)
    if clock is None:
        return
    names = [k if isinstance(k, str) else _kind(k) for k in kinds] or list(clock.attachments)
    unknown = [k for k in names if k not in KINDS.values()]
    if unknown:
        raise ValueError(f"unknown accelerator kind(s) {unknown}: use {sorted(KINDS.values())}.")
    removed = [clock.attachments.pop(kind) for kind in names if kind in clock.attachments]
    _restack(unet, clock)
    for attachment in removed:
        attachment.close()


def _strip(module: torch.nn.Module) -> list[tuple[str, ModelHook]]:
    """Take every hook off `module` (outermost first, so no removal happens mid-chain); return the foreign ones."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    order = list(registry._hook_order)
    foreign = [(name, registry.hooks[name]) for name in order if not name.startswith("fastdiff")]
    for name in reversed(order):
        registry.remove_hook(name, recurse=False)
    return foreign


def _restack(unet: torch.nn.Module, clock: StepClock) -> None:
    """Re-register every hook on the modules fastdiff touches: fastdiff's in `ROLES` order (the clock outermost of
    them), then the hooks others put there, in their own order, so that no fastdiff hook hides them."""
    specs: list[HookSpec] = []
    clock.listeners = []
    for attachment in clock.attachments.values():
        specs += attachment.hooks()
        clock.listeners.append(attachment.on_new_call)
    unknown = sorted({s.role for s in specs} - set(ROLES))
    if unknown:
        raise ValueError(f"hook roles {unknown} have no place in fastdiff.compose.ROLES.")
    specs.sort(key=lambda s: ROLES.index(s.role))
    if specs:
        specs.append(HookSpec("clock", unet, clock))
    modules = {id(m): m for m, _ in clock.registered}
    modules.update({id(spec.module): spec.module for spec in specs})
    foreign = {key: _strip(module) for key, module in modules.items()}
    clock.registered = []
    counts: dict[tuple[int, str], int] = {}
    for spec in specs:
        key = (id(spec.module), spec.role)
        counts[key] = counts.get(key, 0) + 1
        name = CLOCK_NAME if spec.role == "clock" else f"fastdiff.{spec.role}"
        name += f".{counts[key]}" if counts[key] > 1 else ""
        HookRegistry.check_if_exists_or_initialize(spec.module).register_hook(spec.hook, name)
        clock.registered.append((spec.module, name))
    for key, hooks in foreign.items():
        for name, hook in hooks:
            modules[key]._diffusers_hook.register_hook(hook, name)
    HookRegistry.check_if_exists_or_initialize(unet).invalidate_child_registries_cache()
    clock.forget()
