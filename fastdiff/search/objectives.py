"""AutoDiffusion (Li et al. 2023, arXiv 2309.10438) fitness functions: lower is better.

FD and KID are `fastdiff.eval.metrics`' (one implementation); reference statistics are its `FeatureStats`.

- `PipelineObjective`: FD (or KID) of N images sampled at fixed seeds against reference statistics. The seeds
  are the same for every candidate (common random numbers), so two schedules differ only by the schedule.
- `ExactObjective`: on a `GaussianMixtureDenoiser`, the Frechet distance between the moments of N samples
  (fixed initial noise) drawn with DPM-Solver++ 2M on the candidate schedule and the exact data moments.
- `FitnessCache`: a memo of fitness per candidate; it counts real evaluations and preloads a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from fastdiff.eval import metrics
from fastdiff.eval.metrics import FeatureStats
from fastdiff.search.evolutionary import Candidate, make_candidate

Metric = Literal["fd", "kid"]


def _as_candidate(c: Candidate | Sequence[int]) -> Candidate:
    return c if isinstance(c, Candidate) else make_candidate(c)


def _moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of samples (N, ...) flattened to (N, d), in float64."""
    stats = metrics.compute_stats(x.reshape(len(x), -1).to(torch.float64).cpu().numpy(), keep_features=False)
    return stats.mu, stats.sigma


# ------------------------------------------------------------------------------------------------ cache
class FitnessCache:
    """Memoised objective: `cache(candidate)` evaluates once, then answers from memory.

    `evaluations` counts calls of the wrapped objective (not cache hits); `preload` seeds the memo from a
    checkpoint so that a resumed search replays the finished part for free.
    """

    def __init__(self, objective: Callable[[Candidate], float]) -> None:
        self.objective = objective
        self.values: dict[Candidate, float] = {}
        self.evaluations = 0

    def preload(self, records: Sequence[Mapping[str, Any]]) -> None:
        for r in records:
            self.values[Candidate.from_dict(r)] = float(r["fitness"])

    def records(self) -> list[dict[str, Any]]:
        return [{**c.to_dict(), "fitness": f} for c, f in self.values.items()]

    def __call__(self, candidate: Candidate) -> float:
        if candidate not in self.values:
            self.values[candidate] = float(self.objective(candidate))
            self.evaluations += 1
        return self.values[candidate]


# ------------------------------------------------------------------------------------------------ exact
def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """beta_t = 1 - abar_t / abar_{t-1} (beta_0 = 1 - abar_0): the `trained_betas` of a given abar schedule."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return (1 - ac / prev).numpy()


def dpmsolver_for(model, **overrides: Any):
    """fastdiff's DPM-Solver++ 2M (diffusers' defaults) on the model's own abar schedule."""
    from fastdiff.schedulers import DPMSolverPlusPlusScheduler

    kwargs = dict(num_train_timesteps=len(model.alphas_cumprod), trained_betas=betas_from_alphas_cumprod(
        model.alphas_cumprod), algorithm_type="dpmsolver++", solver_order=2, prediction_type=model.prediction_type)
    kwargs.update(overrides)
    return DPMSolverPlusPlusScheduler(**kwargs)


class ExactObjective:
    """Frechet distance between DPM-Solver++ samples of a `GaussianMixtureDenoiser` and its exact data moments.

    Args:
        model: the exact mixture denoiser.
        num_samples: N initial noises, drawn once from `seed` (common random numbers for every candidate).
        seed: seed of the initial noise.
        scheduler: the sampler (default: DPM-Solver++ 2M on the model's schedule).
    """

    name = "exact"

    def __init__(self, model, num_samples: int = 2048, seed: int = 0, scheduler=None) -> None:
        if num_samples < 2:
            raise ValueError("num_samples must be >= 2 to estimate a covariance.")
        self.model = model
        self.scheduler = scheduler if scheduler is not None else dpmsolver_for(model)
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((num_samples, *model.means.shape[1:]), generator=gen, dtype=torch.float64)
        self.target = (model.data_mean().double().numpy(), model.data_covariance().double().numpy())

    def sample(self, timesteps: Sequence[int] | None = None, scheduler=None,
               num_inference_steps: int | None = None) -> torch.Tensor:
        """Samples on `timesteps` (or `num_inference_steps` of the scheduler's own spacing)."""
        sched = scheduler if scheduler is not None else self.scheduler
        if timesteps is not None:
            sched.set_timesteps(timesteps=[int(t) for t in timesteps])
        else:
            sched.set_timesteps(num_inference_steps)
        x = self.noise * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = self.model(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps, t, x).prev_sample
        return x

    def score(self, samples: torch.Tensor) -> float:
        return metrics.frechet_distance(*_moments(samples), *self.target)

    def __call__(self, candidate: Candidate | Sequence[int]) -> float:
        c = _as_candidate(candidate)
        if c.key_steps:
            raise ValueError("the exact objective has no UNet encoder: search key steps with objective='fd'.")
        return self.score(self.sample(c.timesteps))


# ------------------------------------------------------------------------------------------------ pipeline
class PipelineObjective:
    """FD or KID of `num_samples` images generated at seeds `seed..seed+N-1` against `reference`.

    Args:
        pipe: any diffusers pipeline taking `timesteps=`, `generator=` (a list, one per image) and
            `output_type="pt"` (images in [0, 1]).
        features: images (B, C, H, W) in [0, 1] -> features (B, d).
        reference: `fastdiff.eval.metrics.FeatureStats` of real images; `reference.meta["extractor"]` names the
            extractor they were computed with (`compute_stats(features, {"extractor": "lenet"})`, `load_stats`).
        extractor: name of `features` (default: `features.name`, e.g. a `fastdiff.eval.features` extractor); it
            must equal the reference's extractor (no silent mixing of feature spaces).
        metric: "fd" (Frechet distance) or "kid" (needs `reference.features`).
        pipe_kwargs: fixed keyword arguments of every call (e.g. guidance_scale).
        per_image_kwargs: lists of length N sliced per batch (e.g. class_labels, prompt).
        batch_size: images per pipeline call.
    """

    def __init__(self, pipe, features: Callable[[torch.Tensor], torch.Tensor], reference: FeatureStats, *,
                 extractor: str | None = None, metric: Metric = "fd", num_samples: int = 256, seed: int = 0,
                 pipe_kwargs: Mapping[str, Any] | None = None,
                 per_image_kwargs: Mapping[str, Sequence[Any]] | None = None, batch_size: int = 256) -> None:
        if metric not in ("fd", "kid"):
            raise ValueError(f"unknown metric {metric!r}: use 'fd' or 'kid'.")
        extractor = extractor or getattr(features, "name", None)
        if extractor is None:
            raise ValueError("name the feature extractor: pass extractor='lenet' (or a fastdiff.eval extractor).")
        ref_extractor = reference.meta.get("extractor")
        if ref_extractor is None:
            raise ValueError("the reference stats do not name their feature extractor (meta['extractor']): "
                             "recreate them with compute_stats(features, {'extractor': ...}) or `fastdiff eval ref`.")
        if ref_extractor != extractor:
            raise ValueError(f"reference stats were computed with extractor {ref_extractor!r} but the objective "
                             f"uses {extractor!r}: recompute them with the same extractor.")
        if metric == "kid" and reference.features is None:
            raise ValueError("metric='kid' needs reference features: keep them in compute_stats / save_stats.")
        if num_samples < 1 or batch_size < 1:
            raise ValueError("num_samples and batch_size must be >= 1 (and num_samples >= 2 to score).")
        if callable(getattr(features, "meta", None)):
            metrics.check_compatible(features.meta(), reference.meta)
        per_image = dict(per_image_kwargs or {})
        for key, values in per_image.items():
            if len(values) < num_samples:
                raise ValueError(f"per_image_kwargs[{key!r}] has {len(values)} entries for {num_samples} images.")
        self.pipe, self.features, self.reference = pipe, features, reference
        self.metric, self.num_samples, self.seed, self.batch_size = metric, num_samples, seed, batch_size
        self.pipe_kwargs, self.per_image_kwargs = dict(pipe_kwargs or {}), per_image
        self.name = metric

    @torch.no_grad()
    def generate(self, candidate: Candidate | Sequence[int]) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] of the candidate, one generator per image (seed + index)."""
        c = _as_candidate(candidate)
        out = []
        with _propagation(self.pipe, c.key_steps), _skipping(self.pipe, c.skips):
            for start in range(0, self.num_samples, self.batch_size):
                idx = range(start, min(start + self.batch_size, self.num_samples))
                gens = [torch.Generator(self.pipe.device).manual_seed(self.seed + i) for i in idx]
                kwargs = {k: [v[i] for i in idx] for k, v in self.per_image_kwargs.items()}
                images = self.pipe(timesteps=list(c.timesteps), generator=gens, output_type="pt",
                                   **self.pipe_kwargs, **kwargs).images
                out.append(images.float().cpu())
        return torch.cat(out)

    def score_images(self, images: torch.Tensor) -> float:
        with torch.no_grad():
            chunks = [self.features(images[i:i + 512]) for i in range(0, len(images), 512)]
        feats = torch.cat([torch.as_tensor(c).detach().cpu().double() for c in chunks])
        if feats.shape[1] != self.reference.mu.shape[0]:
            raise ValueError(f"features have dimension {feats.shape[1]} but the reference stats "
                             f"{self.reference.mu.shape[0]}: the stats were made with "
                             f"{self.reference.meta['extractor']!r}.")
        if self.metric == "kid":
            return metrics.kernel_distance(feats.numpy(), self.reference.features)[0]
        return metrics.frechet_distance(*_moments(feats), self.reference.mu, self.reference.sigma)

    def __call__(self, candidate: Candidate | Sequence[int]) -> float:
        return self.score_images(self.generate(candidate))


def _propagation(pipe, key_steps: Sequence[int]):
    """Encoder propagation with these key steps for the call (a no-op context when there are none)."""
    import contextlib

    if not key_steps:
        return contextlib.nullcontext()
    from fastdiff.hooks import EncoderPropagationConfig, encoder_propagation

    return encoder_propagation(pipe, EncoderPropagationConfig(key_steps=list(key_steps)))


def _skipping(pipe, skips: Sequence[tuple[int, int]]):
    """AutoDiffusion layer skips for the call (a no-op context when there are none)."""
    import contextlib

    if not skips:
        return contextlib.nullcontext()
    from fastdiff.hooks import BlockSkipConfig, block_skip

    return block_skip(pipe, BlockSkipConfig(skips=list(skips)))


def digit_reference(device: str | torch.device = "cpu", reference_stats: str | None = None):
    """The built-in model's search inputs: the shipped digit classifier's features (`lenet`) and reference stats.

    The stats are `reference_stats` (an `.npz`) or those of the first 4000 training digits, so that the
    held-out digits stay unseen by a search and can score its result. Returns (features, FeatureStats).
    """
    from fastdiff.models import load_digit_classifier

    clf = load_digit_classifier(device=str(device))
    if reference_stats is not None:
        return clf.features, metrics.load_stats(reference_stats)
    from fastdiff.models.data import load_digits

    images, _ = load_digits("train")
    with torch.no_grad():
        reference = metrics.compute_stats(clf.features(images[:4000].to(device)).cpu(), {"extractor": "lenet"})
    return clf.features, reference
