"""The step clock: which denoising step (and which chunk of it) a UNet call belongs to, for every accelerator.

Hooks see UNet calls, not steps. One `StepClock` per UNet, attached by `fastdiff.apply` as the outermost
hook, is the single source of "which step is this" for encoder propagation, block skipping and patch
parallelism's warm-up:

- it reads the pipeline's *current* scheduler at every call (`scheduler_of()`), so a scheduler swapped in
  after applying is followed;
- a new pipeline call is recognised when `scheduler.timesteps` is a new object (every `set_timesteps` makes
  one), so an interrupted call cannot leak its count into the next; listeners (`on_new_call`) then reset
  their per-call state;
- in a plain pipeline loop each UNet call is one step (CFG batches both halves in one call; ControlNet is a
  different module and is not counted); a loop that calls the UNet several times per step (SVDD's candidate
  and chunked calls) says which step and chunk it is in with `pinned(step, chunk)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "fastdiff_step_clock"


class StepClock(ModelHook):
    """Step index and chunk key of the running pipeline call, read from the current scheduler."""

    _is_stateful = True

    def __init__(self, scheduler_of: Callable[[], Any]) -> None:
        super().__init__()
        self.scheduler_of = scheduler_of
        self.listeners: list[Callable[[], None]] = []
        self.attachments: dict[str, Any] = {}  # kind -> Attachment, kept by fastdiff.compose
        self.registered: list[tuple[Any, str]] = []  # (module, hook name) that fastdiff.compose registered
        self._pin: tuple[int, Hashable] | None = None
        self.forget()

    @property
    def scheduler(self) -> Any:
        """The scheduler driving the UNet now (the pipeline's current one)."""
        return self.scheduler_of()

    def forget(self) -> None:
        """Drop the running call (the next `sync` starts a new one)."""
        self.timesteps = None  # the scheduler.timesteps object of the running call
        self.num_steps = 0
        self.step = 0
        self.chunk: Hashable = 0

    def sync(self) -> int:
        """Read the scheduler before a UNet (or ControlNet) call; start a new call if needed; return the step."""
        scheduler = self.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(...) before the UNet.")
        if timesteps is not self.timesteps:
            self.timesteps, self.num_steps, self.step, self.chunk = timesteps, len(timesteps), 0, 0
            try:
                for listener in self.listeners:
                    listener()
            except BaseException:
                self.forget()
                raise
        if self._pin is not None:
            self.step, self.chunk = self._pin
        return self.step

    def advance(self) -> None:
        """Count one finished UNet call of an unpinned loop; after the last step the call is forgotten."""
        if self._pin is not None:
            return
        self.step += 1
        if self.step >= self.num_steps:
            self.timesteps = None

    @contextlib.contextmanager
    def pinned(self, step: int, chunk: Hashable = 0) -> Iterator[None]:
        """UNet calls inside the block belong to `step`, rows `chunk` (a loop with several calls per step)."""
        previous, self._pin = self._pin, (int(step), chunk)
        try:
            yield
        finally:
            self._pin = previous

    def new_forward(self, module, *args, **kwargs):
        self.sync()
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.advance()

    def reset_state(self, module):
        self.forget()
        return module


def step_clock(unet) -> StepClock | None:
    """The step clock `fastdiff.apply` attached to `unet` (or to a pipeline's `.unet`), or None."""
    unet = getattr(unet, "unet", unet)
    registry = getattr(unet, "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if isinstance(registry, HookRegistry) else None


@contextlib.contextmanager
def pinned_step(pipe_or_unet, step: int, chunk: Hashable = 0) -> Iterator[None]:
    """UNet calls inside the block belong to denoising `step` and row chunk `chunk`; a no-op without accelerators."""
    clock = step_clock(pipe_or_unet)
    if clock is None:
        yield
        return
    with clock.pinned(step, chunk):
        yield


def end_call(pipe_or_unet) -> None:
    """Tell the clock that a pinned loop finished its pipeline call (the next UNet call starts a new one)."""
    clock = step_clock(pipe_or_unet)
    if clock is not None:
        clock.forget()
