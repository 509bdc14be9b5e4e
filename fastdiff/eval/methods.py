"""Sampling method specs for the eval harness: scheduler + steps/timesteps + guidance + accelerators, validated.

A method is one row of a sweep (`[[methods]]` in a sweep TOML, or flags of `fastdiff sample`):

    name = "DPM++-10"                      # label in tables and plots
    scheduler = "DPMSolverMultistepScheduler"   # any diffusers scheduler class, or fastdiff's
                                           # DPMSolverPlusPlusScheduler / DPMSolverPlusPlusSinglestepScheduler
    scheduler_kwargs = { solver_order = 2 }     # passed to `from_config(pipe.scheduler.config, **kwargs)`
    steps = 10                             # or: timesteps = [999, 749, ...]   or: schedule = "schedule.json"
    guidance = 1.0                         # classifier-free guidance scale (default: the model's)
    eta = 0.0                              # DDIM eta, passed when the scheduler's `step` takes it
    encoder_propagation = { key_steps = "fd50", parallel = true }   # fastdiff.hooks (Faster Diffusion)
    encoder_propagation = "calibrated.json"                         # or a config file (`fastdiff calibrate`)
    block_skip = { skips = [[3, 5], [4, 2]] }                       # fastdiff.hooks (AutoDiffusion stage 2)
    patch_parallel = { mode = "async", warmup_steps = 4 }           # fastdiff.parallel (DistriFusion / PCPP)
    svdd = { reward = "jpeg_compressibility", num_candidates = 8 }  # fastdiff.guidance (SVDD)

Accelerator tables become their configs when the method is read (so a bad option, a refused pair or a
patch-parallel row outside torchrun fails before any work), and `MethodSpec.apply` attaches them all with
the one door, `fastdiff.apply`, which holds the stacking order and the refusals (fastdiff/compose.py).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["MethodSpec", "method_from_dict", "scheduler_class", "FASTDIFF_SCHEDULERS"]

FASTDIFF_SCHEDULERS = ("DPMSolverPlusPlusScheduler", "DPMSolverPlusPlusSinglestepScheduler")

# method key -> (module, config class); svdd is a sampling loop, the others attach through fastdiff.apply
ACCELERATORS: dict[str, tuple[str, str]] = {
    "encoder_propagation": ("fastdiff.hooks", "EncoderPropagationConfig"),
    "block_skip": ("fastdiff.hooks", "BlockSkipConfig"),
    "patch_parallel": ("fastdiff.parallel", "PatchParallelConfig"),
    "svdd": ("fastdiff.guidance", "SVDDConfig"),
}


def _world_size() -> int:
    """Processes of this run: torchrun's WORLD_SIZE, or an initialised process group's size."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def scheduler_class(name: str):
    """The scheduler class called `name`: fastdiff's DPM-Solver++ schedulers or any diffusers scheduler."""
    if name in FASTDIFF_SCHEDULERS:
        return getattr(importlib.import_module("fastdiff.schedulers"), name)
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = [n for n in dir(diffusers) if n.endswith("Scheduler")] + list(FASTDIFF_SCHEDULERS)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Use a diffusers scheduler class name."
        raise ValueError(f"unknown scheduler {name!r}.{hint}")
    return cls


def _load_schedule_timesteps(path: Path) -> list[int]:
    """Timesteps of a schedule file: a fastdiff schedule (`save_schedule`), or plain JSON {"timesteps": [...]}."""
    if not path.is_file():
        raise ValueError(f"schedule file {path} does not exist.")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "format" in data:
        from fastdiff.schedulers.schedules import load_schedule

        data = load_schedule(path)  # checks format and version
    loaded = data.get("timesteps") if isinstance(data, dict) else data
    if not isinstance(loaded, (list, tuple)) or not loaded:
        raise ValueError(f"schedule file {path} has no 'timesteps' list.")
    return [int(t) for t in loaded]


@dataclass
class MethodSpec:
    """One sampling method: scheduler, step count or explicit timesteps, guidance and accelerator options."""

    name: str
    scheduler: str = "DDIMScheduler"
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    timesteps: list[int] | None = None
    schedule: str | None = None
    guidance: float | None = None
    eta: float | None = None
    encoder_propagation: dict[str, Any] | str | None = None
    block_skip: dict[str, Any] | None = None
    patch_parallel: dict[str, Any] | None = None
    svdd: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a method needs a non-empty `name`.")
        given = [k for k in ("steps", "timesteps", "schedule") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"method {self.name!r}: give exactly one of steps, timesteps, schedule (got {given}).")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"method {self.name!r}: steps must be a positive int, got {self.steps!r}.")
        if self.timesteps is not None:
            ts = [int(t) for t in self.timesteps]
            if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
                raise ValueError(f"method {self.name!r}: timesteps must be a non-empty decreasing list of ints >= 0.")
            self.timesteps = ts
        if self.schedule is not None:
            _load_schedule_timesteps(Path(self.schedule))
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"method {self.name!r}: guidance must be >= 0.")
        if not isinstance(self.scheduler_kwargs, dict):
            raise ValueError(f"method {self.name!r}: scheduler_kwargs must be a table of keyword arguments.")
        cls = scheduler_class(self.scheduler)
        if self.steps is None and "timesteps" not in inspect.signature(cls.set_timesteps).parameters:
            raise ValueError(
                f"method {self.name!r}: {self.scheduler}.set_timesteps takes no custom timesteps; use steps, or a "
                "scheduler that does (DDPMScheduler, DPMSolverMultistepScheduler, fastdiff's DPM-Solver++)."
            )
        if isinstance(self.encoder_propagation, str):  # a config file: its fields, so the row records what ran
            module_name, class_name = ACCELERATORS["encoder_propagation"]
            config_class = getattr(importlib.import_module(module_name), class_name)
            self.encoder_propagation = asdict(config_class.from_json(self.encoder_propagation))
        for key in self.accelerators:
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"method {self.name!r}: {key} must be a table of options.")
        configs = self.accelerator_configs()  # builds and validates every option now
        from fastdiff.compose import check_pairs

        try:
            check_pairs(configs)
        except ValueError as err:
            raise ValueError(f"method {self.name!r}: {err}") from None
        if self.patch_parallel is not None and _world_size() < 2:
            raise ValueError(
                f"method {self.name!r} uses patch_parallel, which splits each image over several processes: launch "
                "with `torchrun --nproc_per_node 2 -m fastdiff.cli -- eval sweep ...` (or drop patch_parallel)."
            )

    # -- what the sampler needs ------------------------------------------------------------------
    def sampling_timesteps(self) -> list[int] | None:
        """Explicit timesteps (from `timesteps` or the schedule file), or None when `steps` is used."""
        if self.schedule is not None:
            return _load_schedule_timesteps(Path(self.schedule))
        return self.timesteps

    def num_steps(self) -> int:
        ts = self.sampling_timesteps()
        return len(ts) if ts is not None else int(self.steps)

    @property
    def accelerators(self) -> list[str]:
        return [k for k in ACCELERATORS if getattr(self, k) is not None]

    def _accelerator_config(self, key: str):
        module_name, class_name = ACCELERATORS[key]
        module = importlib.import_module(module_name)
        options = dict(getattr(self, key))
        try:
            if key != "svdd":
                return getattr(module, class_name)(**options)
            reward = options.pop("reward", None)
            if not isinstance(reward, str) or not callable(getattr(module.rewards, reward, None)):
                raise ValueError(
                    f"svdd needs reward = <name of a function in fastdiff.guidance.rewards>, got {reward!r}"
                )
            return getattr(module.rewards, reward), module.SVDDConfig(**options)
        except TypeError as err:
            raise ValueError(f"method {self.name!r}: bad {key} options {options}: {err}.") from err

    def accelerator_configs(self) -> list[Any]:
        """The configs that `fastdiff.apply` attaches (every accelerator but SVDD, which is a sampling loop)."""
        return [self._accelerator_config(key) for key in self.accelerators if key != "svdd"]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, {})}

    @contextlib.contextmanager
    def apply(self, pipe) -> Iterator[Callable[..., Any]]:
        """Install the method on `pipe` (scheduler, accelerators); yield `sample(**pipe_kwargs)`; undo it all.

        `sample` calls `pipe(...)` (or `svdd_sample(pipe, ...)`) with the method's steps or timesteps,
        guidance and eta added to the given keyword arguments.
        """
        from fastdiff.compose import apply

        original = pipe.scheduler
        pipe.scheduler = scheduler_class(self.scheduler).from_config(original.config, **self.scheduler_kwargs)
        try:
            configs = self.accelerator_configs()
            with apply(pipe, *configs) if configs else contextlib.nullcontext():
                yield self._sampler(pipe)
        finally:
            pipe.scheduler = original

    def _sampler(self, pipe) -> Callable[..., Any]:
        accepted = set(inspect.signature(pipe.__call__).parameters)
        extra: dict[str, Any] = {}
        timesteps = self.sampling_timesteps()
        if timesteps is not None:
            extra["timesteps"] = timesteps
        else:
            extra["num_inference_steps"] = self.steps
        if self.guidance is not None:
            extra["guidance_scale"] = self.guidance
        if self.eta is not None:
            if "eta" not in accepted:
                raise ValueError(f"method {self.name!r}: this pipeline's __call__ takes no `eta`.")
            extra["eta"] = self.eta
        if self.svdd is None:
            return lambda **kwargs: pipe(**kwargs, **extra)
        guidance = importlib.import_module("fastdiff.guidance")
        reward_fn, config = self._accelerator_config("svdd")
        return lambda **kwargs: guidance.svdd_sample(pipe, reward_fn=reward_fn, config=config, **kwargs, **extra)


def method_from_dict(data: dict[str, Any]) -> MethodSpec:
    """A `MethodSpec` from a TOML/JSON table; unknown keys are rejected, naming the allowed ones."""
    if not isinstance(data, dict):
        raise ValueError(f"a method must be a table, got {type(data).__name__}.")
    allowed = [f.name for f in fields(MethodSpec)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(
            f"method {data.get('name', '?')!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}."
        )
    if "name" not in data:
        raise ValueError(f"method {data}: missing `name`.")
    return MethodSpec(**data)
