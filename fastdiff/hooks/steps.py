"""The denoising step of a running pipeline call, for hooks that act per step (encoder propagation, block skips).

Hooks see UNet calls, not steps: `StepCounter` counts the UNet calls of one pipeline call against
`scheduler.timesteps` (one call per step; CFG batches both halves in one call). A new pipeline call is
recognised when `scheduler.timesteps` is a new object (every `set_timesteps` makes one), so an interrupted
call cannot leak its count into the next. Steps are counted, never looked up from timestep values.
"""

from __future__ import annotations


class StepCounter:
    """Step index of the running pipeline call: `sync()` before a UNet call, `advance()` after it."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.forget()

    def forget(self) -> None:
        """Drop the running call (the next `sync` starts a new one)."""
        self.timesteps = None  # the scheduler.timesteps object of the running call
        self.num_steps = 0
        self.step = 0

    def sync(self) -> bool:
        """Read the scheduler; True when a new pipeline call starts (the step is then 0)."""
        timesteps = self.scheduler.timesteps
        if timesteps is None:
            raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(...) before the UNet.")
        if timesteps is self.timesteps:
            return False
        self.timesteps, self.num_steps, self.step = timesteps, len(timesteps), 0
        return True

    def advance(self) -> bool:
        """Count one finished UNet call; True when it was the call's last step (the call is then forgotten)."""
        self.step += 1
        if self.step < self.num_steps:
            return False
        self.forget()
        return True
