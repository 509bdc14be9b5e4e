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
import functools
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_scheduler_kwargs(method: str, cls: type, kwargs: Any) -> None:
    """`from_config` silently drops keys the scheduler does not take: refuse them, naming the close match."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"method {method!r}: scheduler_kwargs must be a table of keyword arguments.")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name != "self"]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes: {', '.join(known)}."
            raise ValueError(f"method {method!r}: {cls.__name__} has no option {key!r}{hint}")


def _dry_run(scheduler: Any) -> None:
    """Every step of `scheduler` on a one-element latent and a zero model output: what diffusers schedulers
    only refuse while sampling (a timestep past the training range, an unsupported solver order) fails here."""
    import torch

    sample = torch.zeros(1, 1, 1, 1) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(torch.zeros_like(model_input), t, sample, return_dict=False, **extra)[0]
    if not torch.isfinite(sample).all():
        raise ValueError("its steps give non-finite values on a zero model output")


def _reward(name: Any, args: Any, rewards: Any) -> Callable[..., Any]:
    """SVDD's reward from a method table: a name in `fastdiff.guidance.rewards` or `"module:attribute"`, with
    `reward_args` given to a reward class (e.g. `ClassifierReward`) or bound to a reward function."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"svdd needs reward = <one of fastdiff.guidance.rewards' or 'module:function'>, got {name!r}")
    if not isinstance(args, dict):
        raise ValueError(f"reward_args must be a table of keyword arguments, got {args!r}")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr, None)
        except ImportError as err:
            raise ValueError(f"reward {name!r}: cannot import {module_name!r} ({err}).") from None
    else:
        obj = getattr(rewards, name) if name in rewards.REWARDS else None
    if not callable(obj):
        raise ValueError(f"reward {name!r} is not a reward; use {', '.join(rewards.REWARDS)} or 'module:function'.")
    try:
        if isinstance(obj, type):
            return obj(**args)  # e.g. ClassifierReward(target_class=7)
        if args:
            inspect.signature(obj).bind(None, **args)  # the images, then the options
            return functools.partial(obj, **args)
    except TypeError as err:
        raise ValueError(f"reward {name!r} with reward_args {args}: {err}; see its signature "
                         f"{name.rpartition(':')[2]}{inspect.signature(obj)}.") from None
    except ValueError as err:
        raise ValueError(f"reward {name!r}: {err}") from None
    return obj


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
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ValueError(f"method {self.name!r}: steps must be a positive int, got {self.steps!r}.")
        if self.timesteps is not None:
            ts = [int(t) for t in self.timesteps]
            if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
                raise ValueError(f"method {self.name!r}: timesteps must be a non-empty decreasing list of ints >= 0.")
            self.timesteps = ts
        if self.schedule is not None:
            _load_schedule_timesteps(Path(self.schedule))
        for key in ("guidance", "eta"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"method {self.name!r}: {key} must be a number >= 0, got {value!r}.")
        cls = scheduler_class(self.scheduler)
        _check_scheduler_kwargs(self.name, cls, self.scheduler_kwargs)
        if self.eta is not None and "eta" not in inspect.signature(cls.step).parameters:
            raise ValueError(f"method {self.name!r}: {self.scheduler}.step takes no eta; drop it or use DDIMScheduler.")
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
        if self.svdd is not None:
            self._accelerator_config("svdd")  # the reward and its arguments too
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

    def check(self, pipe) -> None:
        """What depends on the model, checked without running it (before reference statistics or images):
        the scheduler built from `pipe`'s config with `scheduler_kwargs` and given its steps or timesteps, the
        accelerators' step indices against that step count, and their layers attached to `pipe` and removed."""
        try:
            scheduler = scheduler_class(self.scheduler).from_config(pipe.scheduler.config, **self.scheduler_kwargs)
            timesteps = self.sampling_timesteps()
            if timesteps is None:
                scheduler.set_timesteps(self.steps)
            else:
                train_steps = scheduler.config.get("num_train_timesteps")
                if train_steps is not None and max(timesteps) >= train_steps:
                    raise ValueError(f"timesteps must lie in [0, {train_steps - 1}], got {max(timesteps)}")
                scheduler.set_timesteps(timesteps=timesteps)
            _dry_run(scheduler)
        except (ValueError, NotImplementedError, TypeError, IndexError, KeyError, RuntimeError) as err:
            raise ValueError(f"method {self.name!r}: {self.scheduler} on this model: {err}") from None
        num_steps = len(scheduler.timesteps)
        # patch parallelism needs the process group: `fastdiff.apply` checks it when the method is sampled
        configs = [self._accelerator_config(key) for key in self._attached() if key != "patch_parallel"]
        try:
            for config in configs:
                if hasattr(config, "check_steps"):  # encoder propagation's key steps, block skipping's steps
                    config.check_steps(num_steps)
            if configs:
                from fastdiff.compose import apply

                apply(pipe, *configs).remove()  # layer ids and pairs against this model's UNet
        except ValueError as err:
            raise ValueError(f"method {self.name!r}: {err}") from None

    def _attached(self) -> list[str]:
        return [key for key in self.accelerators if key != "svdd"]

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
            reward = _reward(options.pop("reward", None), options.pop("reward_args", {}), module.rewards)
            return reward, module.SVDDConfig(**options)
        except TypeError as err:
            raise ValueError(f"method {self.name!r}: bad {key} options {options}: {err}.") from err

    def accelerator_configs(self) -> list[Any]:
        """The configs that `fastdiff.apply` attaches (every accelerator but SVDD, which is a sampling loop)."""
        return [self._accelerator_config(key) for key in self._attached()]

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
