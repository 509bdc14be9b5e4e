"""AutoDiffusion (Li et al. 2023, arXiv 2309.10438): `search_timesteps`, the two-stage search, and `fastdiff search`.

Stage 1 searches which K timesteps to use with the full network. Stage 2 (optional) searches the timesteps
jointly with what to skip, at a fixed compute budget, so that every stage-2 candidate costs the same:

- `num_skips` (the paper's stage 2): which UNet layers (residual and attention blocks, see
  `fastdiff.hooks.skippable_layers`) to skip at which steps, exactly `num_skips` (step, layer) pairs and at
  most `max_skip_fraction` of the layers at any step (paper: `max_prun` = 0.1). The result applies as
  `fastdiff.hooks.apply_block_skip(pipe, result.block_skip_config())`.
- `num_key_steps` (new here): which steps are encoder-propagation key steps (Faster Diffusion, Li et al. 2023,
  arXiv 2312.09608), at a fixed number of key steps. The result applies as
  `fastdiff.hooks.EncoderPropagationConfig(key_steps=result.key_steps)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fastdiff.eval.metrics import FeatureStats
from fastdiff.schedulers.flow_check import refuse_flow_matching
from fastdiff.schedulers.schedules import load_schedule, save_schedule
from fastdiff.search.evolutionary import (
    Candidate,
    EvolutionState,
    SearchSpace,
    evolve,
    make_candidate,
    random_candidate,
)
from fastdiff.search.objectives import ExactObjective, FitnessCache, PipelineObjective, digit_reference, dpmsolver_for

ObjectiveName = Literal["fd", "kid", "exact"]
OBJECTIVES = ("fd", "kid", "exact")
CHECKPOINT_FORMAT = "fastdiff.search-checkpoint"


@dataclass
class SearchConfig:
    """Settings of one AutoDiffusion search (defaults sized for a CPU; the paper uses population 50, top 10).

    Args:
        seed: seeds the evolutionary search (not the images: see `image_seed`).
        population_size: candidates per generation.
        num_parents: size of the elitist parent pool (best so far, over all generations).
        mutation_prob: per-gene replacement probability of a mutation (paper: 0.25).
        init_mutation_prob: the same for the mutants of the uniform schedule in the first generation (paper: 0.1).
        num_mutations / num_crossovers: children per generation (default P // 2 and P // 4; the rest are random).
        max_evaluations: stage-1 budget, in objective evaluations (each = N images for 'fd').
        max_generations: optional cap on stage-1 generations.
        min_timestep / max_timestep: the search range (default: every training timestep).
        fix_first: start every schedule at max_timestep (the paper does not; see `SearchSpace`).
        num_samples: N images (or exact-objective samples) per evaluation, at seeds image_seed + i.
        image_seed: first seed of the fixed images (common random numbers across candidates).
        batch_size: images per pipeline call.
        pipe_kwargs: fixed pipeline arguments, e.g. {"guidance_scale": 2.0}.
        reference_stats: `.npz` reference stats for 'fd'/'kid' (default for the reference model: 4000 training
            digits, so that the held-out digits stay unseen by the search).
        extractor: name of the feature extractor the stats were computed with.
        num_key_steps: enables stage 2 with this many encoder key steps out of K.
        key_step_presets: starting key-step sets for stage 2 (e.g. a Faster Diffusion preset).
        num_skips: enables the paper's stage 2 with this many skipped (step, layer) pairs (not with num_key_steps).
        max_skip_fraction: the most layers skipped at one step, as a fraction of the UNet's skippable layers.
        stage2_evaluations: stage-2 budget in evaluations.
    """

    seed: int = 0
    population_size: int = 16
    num_parents: int = 6
    mutation_prob: float = 0.25
    init_mutation_prob: float = 0.1
    num_mutations: int | None = None
    num_crossovers: int | None = None
    max_evaluations: int = 80
    max_generations: int | None = None
    min_timestep: int = 0
    max_timestep: int | None = None
    fix_first: bool = False
    num_samples: int = 256
    image_seed: int = 0
    batch_size: int = 256
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)
    reference_stats: str | None = None
    extractor: str = "lenet"
    num_key_steps: int | None = None
    key_step_presets: list[list[int]] = field(default_factory=list)
    num_skips: int | None = None
    max_skip_fraction: float = 0.1
    stage2_evaluations: int = 40

    def __post_init__(self) -> None:
        if self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1 (the search budget), got {self.max_evaluations}.")
        if (self.num_key_steps is not None or self.num_skips is not None) and self.stage2_evaluations < 1:
            raise ValueError("stage2_evaluations must be >= 1 when num_key_steps or num_skips is set.")
        if self.num_key_steps is not None and self.num_skips is not None:
            raise ValueError("stage 2 searches either encoder key steps (num_key_steps) or layer skips (num_skips), "
                             "not both: set one of them.")
        if self.num_skips is not None and self.num_skips < 1:
            raise ValueError(f"num_skips must be >= 1 (or None for no layer skipping), got {self.num_skips}.")
        if not 0.0 < self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in (0, 1], got {self.max_skip_fraction}.")
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}.")
        if not 1 <= self.num_parents <= self.population_size:
            raise ValueError(f"num_parents must be in [1, population_size={self.population_size}], "
                             f"got {self.num_parents}.")
        for name in ("mutation_prob", "init_mutation_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.max_generations is not None and self.max_generations < 1:
            raise ValueError("max_generations must be >= 1 or None.")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {self.num_samples}.")
        if self.num_mutations is None:
            self.num_mutations = self.population_size // 2
        if self.num_crossovers is None:
            self.num_crossovers = self.population_size // 4
        if self.num_mutations < 0 or self.num_crossovers < 0:
            raise ValueError("num_mutations and num_crossovers must be >= 0.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SearchResult:
    """The best schedule found and how the search got there.

    `timesteps` go straight to `pipe(timesteps=...)`; `key_steps` (stage 2 only) to
    `EncoderPropagationConfig(key_steps=...)`; `skips` (stage 2 only) to `BlockSkipConfig(skips=...)`.
    `history` is the best fitness after each generation, `evaluations` the objective evaluations this run
    made (resumed ones excluded), `candidates` every evaluated candidate with its fitness.
    """

    timesteps: list[int]
    fitness: float
    history: list[float]
    evaluations: int
    wall_time_s: float
    config: dict[str, Any]
    objective: str
    key_steps: list[int] | None = None
    stage1_timesteps: list[int] | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    skips: list[list[int]] | None = None

    def block_skip_config(self):
        """`BlockSkipConfig(skips=self.skips)` (results of a search with `num_skips` only)."""
        if not self.skips:
            raise ValueError("this result has no layer skips: run the search with SearchConfig(num_skips=...).")
        from fastdiff.hooks import BlockSkipConfig

        return BlockSkipConfig(skips=[tuple(pair) for pair in self.skips])

    def encoder_propagation_config(self, **kwargs: Any):
        """`EncoderPropagationConfig(key_steps=self.key_steps, **kwargs)` (stage-2 results only)."""
        if not self.key_steps:
            raise ValueError("this result has no key steps: run the search with SearchConfig(num_key_steps=...).")
        from fastdiff.hooks import EncoderPropagationConfig

        return EncoderPropagationConfig(key_steps=list(self.key_steps), **kwargs)

    def save(self, path: str | Path) -> Path:
        """Write the schedule JSON (fastdiff.schedulers.schedules format) with the search record as metadata."""
        meta = {k: v for k, v in dataclasses.asdict(self).items() if k != "timesteps"}
        meta["method"] = "autodiffusion"
        return save_schedule(path, self.timesteps, **meta)

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        record = load_schedule(path)
        fields = dataclasses.fields(cls)
        if "fitness" not in record:
            raise ValueError(f"{path} is a schedule but not a search result (no 'fitness'); use load_schedule.")
        required = [f.name for f in fields if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in record]
        if missing:
            raise ValueError(f"{path} is an incomplete search result (no {', '.join(missing)}); re-run the search.")
        return cls(**{f.name: record[f.name] for f in fields if f.name in record})


# ------------------------------------------------------------------------------------------------ helpers
def _exact_model(pipe, required: bool):
    from fastdiff.testing import GaussianMixtureDenoiser

    for obj in (pipe, getattr(pipe, "unet", None)):
        if isinstance(obj, GaussianMixtureDenoiser):
            return obj
    if not required:
        return None
    raise ValueError("objective='exact' needs a GaussianMixtureDenoiser: pass it as `pipe` (or as `pipe.unet`).")


def _named_objective(pipe, metric: str, config: SearchConfig, features, reference) -> PipelineObjective:
    """FD/KID of `features` of N images against `reference` (label-conditioned pipelines get label i % 10).

    Without `features` and `reference`, a `ReferencePipeline` is scored with the built-in digit model's
    (`objectives.digit_reference`): the README's one-line search on the shipped model.
    """
    if features is None and reference is None:
        from fastdiff.models import ReferencePipeline

        if not isinstance(pipe, ReferencePipeline):
            raise ValueError(f"objective={metric!r} needs features= and reference= (FeatureStats) for this pipeline; "
                             "or pass objectives.PipelineObjective(pipe, features, reference, ...) as the objective.")
        features, reference = digit_reference(pipe.device, config.reference_stats)
    elif features is None or reference is None:
        raise ValueError("pass both features= (images -> features) and reference= (their FeatureStats).")
    params = inspect.signature(pipe.__call__).parameters
    per_image = {"class_labels": [i % 10 for i in range(config.num_samples)]} if "class_labels" in params else {}
    return PipelineObjective(pipe, features, reference, extractor=getattr(features, "name", None) or config.extractor,
                             metric=metric, num_samples=config.num_samples, seed=config.image_seed,  # type: ignore[arg-type]
                             pipe_kwargs=config.pipe_kwargs, per_image_kwargs=per_image, batch_size=config.batch_size)


def uniform_timesteps(scheduler, num_steps: int) -> list[int]:
    """The scheduler's own K-step schedule (its `timestep_spacing`), on a fresh copy of the scheduler."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_steps)
    return [int(t) for t in fresh.timesteps]


def default_key_step_presets(num_steps: int, num_key_steps: int) -> list[list[int]]:
    """Two stage-2 starting points: the first k steps (Faster Diffusion keys cluster early) and k evenly spaced."""
    early = list(range(num_key_steps))
    spaced = sorted({round(i * num_steps / num_key_steps) for i in range(num_key_steps)})
    return [early] + ([spaced] if spaced != early and len(spaced) == num_key_steps else [])


def _skip_space(pipe, model, num_steps: int, max_t: int, config: SearchConfig) -> SearchSpace:
    """The stage-2 space of layer skips for the pipeline's UNet."""
    from fastdiff.hooks import skippable_layers

    unet = getattr(pipe, "unet", None)
    if model is not None or unet is None:
        raise ValueError("num_skips needs a pipeline with a UNet2DConditionModel (.unet); the Gaussian mixture has "
                         "no layers to skip.")
    num_layers = len(skippable_layers(unet))
    return SearchSpace(num_steps, max_t, config.min_timestep, fix_first=config.fix_first, num_skips=config.num_skips,
                       num_layers=num_layers, max_skips_per_step=max(1, int(config.max_skip_fraction * num_layers)))


def _write_checkpoint(path: Path, header: dict[str, Any], cache: FitnessCache) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**header, "evaluated": cache.records()}))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ search
def _checkpointed(fn: Callable[[Candidate], float], header: dict[str, Any], checkpoint: str | Path | None):
    """(cache, evaluate): the memoised objective, resumed from `checkpoint` and written to it per evaluation."""
    cache = FitnessCache(fn)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        saved = json.loads(ckpt.read_text())
        if {k: saved.get(k) for k in header} != header:
            raise ValueError(f"checkpoint {ckpt} belongs to another search (different K, objective or config): "
                             "delete it or pass another path.")
        cache.preload(saved["evaluated"])

    def evaluate(c: Candidate) -> float:
        value = cache(c)
        if ckpt is not None:
            _write_checkpoint(ckpt, header, cache)
        return value

    return cache, evaluate


def _setup(pipe, num_steps: int, objective, config: SearchConfig, features, reference):
    """(fitness function, objective name, scheduler, stage-1 space, stage-2 space or None), validated."""
    if callable(objective) and not isinstance(objective, str):
        fn, name = objective, getattr(objective, "name", type(objective).__name__)
    elif objective in OBJECTIVES:
        fn, name = None, str(objective)
    else:
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES} or a callable(candidate) -> float.")
    model = _exact_model(pipe, required=name == "exact" and isinstance(objective, str))
    if model is not None:
        scheduler, num_train = dpmsolver_for(model), len(model.alphas_cumprod)
        if isinstance(objective, str):
            fn = ExactObjective(model, num_samples=config.num_samples, seed=config.image_seed, scheduler=scheduler)
    else:
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError("pipe has no scheduler: pass a diffusers pipeline (or, for 'exact', a mixture).")
        num_train = int(scheduler.config.num_train_timesteps)
    max_t = num_train - 1 if config.max_timestep is None else config.max_timestep
    if not (isinstance(num_steps, int) and 1 <= num_steps <= max_t - config.min_timestep + 1):
        raise ValueError(f"num_steps (K) must be an int in [1, {max_t - config.min_timestep + 1}] for timesteps "
                         f"{config.min_timestep}..{max_t}, got {num_steps!r}.")
    space = SearchSpace(num_steps, max_t, config.min_timestep, fix_first=config.fix_first)
    space2 = None
    if config.num_key_steps is not None:
        space2 = SearchSpace(num_steps, max_t, config.min_timestep, num_key_steps=config.num_key_steps,
                             fix_first=config.fix_first)
    elif config.num_skips is not None:
        space2 = _skip_space(pipe, model, num_steps, max_t, config)
    if isinstance(objective, str) and name in ("fd", "kid"):
        fn = _named_objective(pipe, name, config, features, reference)
    return fn, name, scheduler, space, space2


def _uniform_candidate(scheduler, space: SearchSpace) -> Candidate:
    """The scheduler's own K-step schedule within the search range (the first generation's anchor)."""
    lo, hi, k = space.min_timestep, space.max_timestep, space.num_steps
    return make_candidate([t for t in uniform_timesteps(scheduler, k) if lo <= t <= hi] or range(hi, hi - k, -1))


def _stage2_seeds(space2: SearchSpace, best1: Candidate, num_steps: int, config: SearchConfig,
                  generator: torch.Generator) -> list[Candidate]:
    """Stage 2 starts from the stage-1 schedule: with the key-step presets, or (the paper's) random skips."""
    if space2.num_key_steps is not None:
        presets = config.key_step_presets or default_key_step_presets(num_steps, space2.num_key_steps)
        seeds = [make_candidate(best1.timesteps, keys) for keys in presets]
        bad = [list(s.key_steps) for s in seeds if not space2.contains(s)]
        if bad:
            raise ValueError(f"key_step_presets {bad} must each hold {space2.num_key_steps} distinct step indices in "
                             f"[0, {num_steps - 1}] including 0.")
        return seeds
    return [make_candidate(best1.timesteps, (), random_candidate(space2, generator).skips) for _ in range(2)]


def search_timesteps(
    pipe,
    num_steps: int,
    objective: ObjectiveName | Callable[[Candidate], float] = "fd",
    config: SearchConfig | None = None,
    *,
    features: Callable | None = None,
    reference: FeatureStats | None = None,
    checkpoint: str | Path | None = None,
    on_evaluation: Callable[[Candidate, float, EvolutionState], None] | None = None,
) -> SearchResult:
    """AutoDiffusion: evolutionary search of a K-step schedule (and, optionally, of encoder key steps).

    Args:
        pipe: the pipeline whose scheduler (e.g. DPM-Solver++) samples the candidates; for
            objective='exact', a `GaussianMixtureDenoiser` (sampled with DPM-Solver++ 2M).
        num_steps: K, the number of steps (model evaluations) of the schedule.
        objective: 'fd' / 'kid' (of `features` of N images against `reference`), 'exact', or any callable
            Candidate -> fitness (lower is better).
        config: `SearchConfig`.
        features / reference: for 'fd' / 'kid', images (B, C, H, W) in [0, 1] -> features (B, d), and the
            `FeatureStats` of real images in that feature space (`meta["extractor"]` names it). Omitted for
            a `ReferencePipeline`: the digit classifier's features vs 4000 training digits (`digit_reference`).
        checkpoint: JSON file updated after every evaluation; an existing one (same search) is resumed.
        on_evaluation: called after each new evaluation (progress bars).

    Example:
        >>> result = search_timesteps(pipe, num_steps=4, objective="fd", config=SearchConfig(seed=0))
        >>> images = pipe(class_labels=[3], timesteps=result.timesteps).images
    """
    config = config or SearchConfig()
    refuse_flow_matching(pipe, "search_timesteps", "a search space of flow sigmas in [0, 1] (candidates here are "
                         "integer timesteps of a VP noise schedule) and flow-matching objectives")
    start = time.perf_counter()
    fn, name, scheduler, space, space2 = _setup(pipe, num_steps, objective, config, features, reference)
    header = {"format": CHECKPOINT_FORMAT, "num_steps": num_steps, "objective": name, "config": config.to_dict()}
    cache, evaluate = _checkpointed(fn, header, checkpoint)
    generator = torch.Generator().manual_seed(config.seed)
    common = dict(population_size=config.population_size, num_parents=config.num_parents,
                  num_mutations=config.num_mutations, num_crossovers=config.num_crossovers,
                  mutation_prob=config.mutation_prob, init_mutation_prob=config.init_mutation_prob,
                  generator=generator, on_evaluation=on_evaluation)
    state = evolve(evaluate, space, [_uniform_candidate(scheduler, space)], max_evaluations=config.max_evaluations,
                   max_generations=config.max_generations, **common)
    best1 = min((c for c in state.fitness if not c.key_steps), key=lambda c: (state.fitness[c], c))
    best = best1
    if space2 is not None:
        seeds = _stage2_seeds(space2, best1, num_steps, config, generator)
        state = evolve(evaluate, space2, seeds, max_evaluations=config.stage2_evaluations, max_generations=None,
                       state=state, **common)
        best = min((c for c in state.fitness if space2.contains(c)), key=lambda c: (state.fitness[c], c))
    return SearchResult(
        timesteps=list(best.timesteps), fitness=state.fitness[best], history=state.history,
        evaluations=cache.evaluations, wall_time_s=time.perf_counter() - start, config=config.to_dict(),
        objective=name, key_steps=list(best.key_steps) if best.key_steps else None,
        stage1_timesteps=list(best1.timesteps),
        candidates=[{**c.to_dict(), "fitness": f} for c, f in state.fitness.items()],
        skips=[list(pair) for pair in best.skips] if best.skips else None,
    )
