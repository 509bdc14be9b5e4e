"""Seeded, sharded, resumable image generation (EDM-style per-seed sampling, Karras et al. 2022) for FD sweeps.

Image i always uses seed `base_seed + i` through its own `torch.Generator` (on CPU, so the noise is the
same on every device), and the class label `i % 10` (reference model) or prompt `i % len(prompts)`.
Indices are cut into fixed chunks of `batch_size` ([0, B), [B, 2B), ...) and chunk c goes to rank
`c % world_size`, so every image is computed in the same batch whatever the number of processes: one
process and two `torchrun` processes give bit-identical PNGs when each uses the same number of torch threads
(recorded as `torch_threads` in the folder's record).

Files are `{index:06d}.png`, written atomically (temporary file + `os.replace`). A re-run recomputes
only the chunks that hold a missing or unreadable file and rewrites only those files, so a killed run
finished later equals an uninterrupted one. `generation.json` in the folder records the method, seed
and batch size (a different method in the same folder is an error) and the timing of the run.

Scale-out is torch.distributed as is: `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu
--num_processes N` (both set WORLD_SIZE/RANK; gloo on CPU, NCCL on GPU). On CPU, `accelerate launch
--cpu` starts one process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastdiff.eval.distributed import barrier, gather_objects, init_distributed
from fastdiff.eval.methods import MethodSpec
from fastdiff.eval.progress import Progress

__all__ = [
    "GenerationResult",
    "generate_images",
    "sample_images",
    "Samples",
    "sharded_features",
    "load_pipeline",
    "index_chunks",
    "image_path",
    "is_valid_image",
    "asked_images",
    "check_out_dir",
    "hardware_description",
]

RECORD = "generation.json"


# -- files --------------------------------------------------------------------------------------------
def image_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.png"


def is_valid_image(path: Path) -> bool:
    """True when `path` exists and decodes completely."""
    import PIL.Image

    if not path.is_file():
        return False
    try:
        with PIL.Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def _write_png_atomic(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _to_pil(images) -> list:
    """Pipeline output images (PIL list, array (B, H, W, C) or tensor (B, C, H, W) in [0, 1]) -> PIL list."""
    import PIL.Image

    if isinstance(images, list) and images and isinstance(images[0], PIL.Image.Image):
        return images
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().permute(0, 2, 3, 1).numpy()
    arr = (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def index_chunks(n: int, batch_size: int) -> list[list[int]]:
    """The fixed chunks [0, B), [B, 2B), ... of range(n)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


# -- pipelines ----------------------------------------------------------------------------------------
def load_pipeline(model: str = "reference", device: str = "cpu"):
    """`reference` (the shipped digit model) or any diffusers model id / folder (offline if not cached)."""
    if model == "reference":
        from fastdiff.models import load_reference_pipeline

        pipe = load_reference_pipeline(device=device)
    else:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # offline, diffusers warns "Couldn't connect to the Hub" first
        try:
            pipe = DiffusionPipeline.from_pretrained(model).to(device)
        except OSError as err:
            where = "a folder" if Path(model).exists() else "a model id"
            raise ValueError(
                f"cannot load {where} {model!r} ({str(err).splitlines()[0][:160]}): offline (HF_HUB_OFFLINE=1) only "
                "models already in the Hugging Face cache load; download it where the hub is reachable "
                f"(`huggingface-cli download {model}`), or pass a local folder saved with `save_pretrained`."
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioning(pipe, prompts: Sequence[str] | None = None) -> Callable[[list[int]], dict]:
    """index list -> pipeline kwargs: class label i % 10 (label-conditioned pipelines) or prompt i % P."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    if prompts:
        prompts = list(prompts)
        return lambda idx: {"prompt": [prompts[i % len(prompts)] for i in idx]}
    if "class_labels" in params:
        return lambda idx: {"class_labels": [i % 10 for i in idx]}
    if "prompt" in params:
        raise ValueError("this pipeline takes prompts: give a prompts file (one prompt per line).")
    return lambda idx: {"batch_size": len(idx)} if "batch_size" in params else {}


def hardware_description() -> str:
    """CPU model and core count, or the CUDA device names."""
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


class _CallCounter:
    """A diffusers ModelHook (via HookRegistry) that counts forward calls of the denoiser."""

    NAME = "fastdiff_eval_call_counter"

    def __init__(self, module) -> None:
        from diffusers.hooks import HookRegistry, ModelHook

        counter = self

        class _Hook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                counter.calls += 1
                if counter.on_call is not None:
                    counter.on_call()
                sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                counter.rows += int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0
                return args, kwargs

        self.calls = 0
        self.rows = 0
        self.on_call: Callable[[], None] | None = None
        self.module = module
        if module is not None:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_Hook(), self.NAME)

    def remove(self) -> None:
        if self.module is not None:
            self.module._diffusers_hook.remove_hook(self.NAME, recurse=False)


# -- generation ---------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What one `generate_images` call did: counts, timing (whole world), NFE, denoiser calls, memory."""

    folder: str
    n: int
    computed: int  # images computed by this run (whole chunks), all ranks
    written: int  # files (re)written by this run, all ranks
    wall_s: float  # wall time of the generation loop (slowest rank)
    s_per_image: float | None  # wall_s / computed, or the earlier run's when nothing was computed
    images_per_s: float | None
    nfe: int
    unet_calls: float | None  # denoiser forward calls per sampling call (one batch)
    unet_rows_per_image: float | None  # batch rows through the denoiser per image (CFG: x2, SVDD: x M, ...)
    peak_mem_mb: float
    peak_mem_kind: str
    world_size: int
    batch_size: int
    hardware: str


def model_fingerprint(pipe) -> str | None:
    """Short hash of the denoiser's weights (per-tensor name, shape, sum and sum of squares in float64).

    Stored with generated images, so that a resumed run never mixes images of two different models
    under the same method name. Cheap: one pass over the weights, no copy of the whole model.
    """
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        return None
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach().double()
            digest.update(f"{name}{tuple(t.shape)}{float(t.sum()):.12e}{float((t * t).sum()):.12e}".encode())
    return digest.hexdigest()[:16]


def _identity(method: MethodSpec, base_seed: int, batch_size: int, prompts, model: str | None = None,
              pipe_kwargs: dict | None = None) -> dict:
    identity = {
        "model": model,
        "method": method.to_dict(),
        "base_seed": base_seed,
        "batch_size": batch_size,
        "prompts": list(prompts) if prompts else None,
    }
    values = {k: v for k, v in (pipe_kwargs or {}).items() if not callable(v)}  # not callbacks (e.g. progress)
    if values:  # they can replace the label or the size: part of what the images are
        identity["pipe_kwargs"] = json.loads(json.dumps(values, default=repr))
    return identity


def _open_folder(folder: Path, identity: dict, n: int) -> dict | None:
    """Check that `folder` holds images of this identity (or none); rank 0 writes the record and clears stale
    temporary files. Returns the earlier record, or None for a new folder."""
    rank, _ = init_distributed()
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and not any(is_valid_image(p) for p in folder.glob("*.png")):
        record = None  # a run that failed before its first image: nothing to protect
    keys = [*identity, *({"pipe_kwargs"} - set(identity))]
    if record is not None and {k: record.get(k) for k in keys} != {k: identity.get(k) for k in keys}:
        what = "another model (weights)" if record.get("model") != identity["model"] else "another method"
        raise ValueError(
            f"{folder} holds images of {what}, seed, batch size or pipe_kwargs ({record_path}); "
            "use a new output folder or delete this one."
        )
    barrier()
    if rank == 0:
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        # `n` is what this run asks for: `fastdiff eval fid` warns when fewer images are there (interrupted run)
        _write_record(folder, {**(record or identity), "n": n})
    barrier()
    return record


def check_out_dir(folder: str | Path) -> Path:
    """`folder` can be an output folder: it, or its nearest existing parent, is a folder (not a file)."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"output folder {folder}: {path} is a file; pass a folder path to --out.")
            break
    return folder


def _write_record(folder: Path, record: dict) -> None:
    tmp = (folder / RECORD).with_name(RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder / RECORD)


def asked_images(folder: str | Path) -> int | None:
    """How many images the last `generate_images` run into `folder` asked for (None: no record)."""
    path = Path(folder) / RECORD
    try:
        n = json.loads(path.read_text()).get("n") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) else None


def _pending_chunks(folder: Path, n: int, batch_size: int, split: bool) -> list[tuple[list[int], list[int]]]:
    """(chunk, its indices without a valid file) for this rank's chunks that need computing."""
    rank, world = init_distributed()
    chunks = [c for k, c in enumerate(index_chunks(n, batch_size)) if not split or k % world == rank]
    pending = [(c, [i for i in c if not is_valid_image(image_path(folder, i))]) for c in chunks]
    return [(c, todo) for c, todo in pending if todo]


def _peak_memory(device) -> tuple[float, str]:
    """Peak memory of this process in MB and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _sample_chunk(sample: Callable[..., Any], chunk: list[int], base_seed: int, cond, pipe_kwargs: dict,
                  output_type: str):
    """One batch: image i gets its own CPU generator seeded `base_seed + i` and the conditioning of index i
    (`pipe_kwargs` win over it: `{"class_labels": None}` samples unconditionally)."""
    generators = [torch.Generator("cpu").manual_seed(base_seed + i) for i in chunk]
    out = sample(**{**cond(chunk), **pipe_kwargs}, generator=generators, output_type=output_type)
    images = out.images if hasattr(out, "images") else out[0]
    if len(images) != len(chunk):
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(chunk)} seeds.")
    return images


def _sample_chunks(pipe, method: MethodSpec, folder: Path, pending, base_seed: int, cond, pipe_kwargs: dict,
                   writer: bool, bar) -> dict:
    """Sample every pending chunk with `method` applied; write the missing files. Returns this rank's counts."""
    counts = {"computed": 0, "written": 0, "batches": 0, "calls": 0, "rows": 0}
    with method.apply(pipe) as sample:
        # registered last = outermost: counts the pipeline's calls of its denoiser
        counter = _CallCounter(getattr(pipe, "unet", None) or getattr(pipe, "transformer", None))
        steps = method.num_steps()
        if bar is not None:  # step-level: moves with every denoiser call, exact at each batch's end
            counter.on_call = lambda: bar.update(1)
        try:
            for k, (chunk, todo) in enumerate(pending):
                images = _to_pil(_sample_chunk(sample, chunk, base_seed, cond, pipe_kwargs, "pil"))
                if writer:
                    for i in todo:
                        _write_png_atomic(images[chunk.index(i)], image_path(folder, i))
                    counts["written"] += len(todo)
                counts["computed"] += len(chunk)
                counts["batches"] += 1
                if bar is not None:
                    bar.set((k + 1) * steps, note=f"{counts['computed']} images")
        finally:
            counter.remove()
    counts["calls"], counts["rows"] = counter.calls, counter.rows
    return counts


def _progress_bar(method: MethodSpec, pending) -> Progress:
    """Sampling steps of this rank's pending batches (rank 0 only): a bar, or a log line every 5 s."""
    _, world = init_distributed()
    return Progress(len(pending) * method.num_steps(), f"{method.name} (rank 0/{world})", unit="step")


def _world_timing(counts: dict, split: bool) -> dict:
    """This run's totals over all ranks: images computed and written, slowest wall time, denoiser calls."""
    _, world = init_distributed()
    stats = gather_objects(counts)
    batches = sum(s["batches"] for s in stats)
    images_done = sum(s["computed"] for s in stats)
    return {
        "computed": images_done if split else counts["computed"],
        "written": sum(s["written"] for s in stats) if split else counts["written"],
        "wall_s": max(s["wall"] for s in stats),
        "unet_calls": sum(s["calls"] for s in stats) / batches if batches else None,
        "unet_rows_per_image": sum(s["rows"] for s in stats) / images_done if images_done else None,
        "world_size": world,
        "peak": max(s["peak"] for s in stats),
    }


def generate_images(
    pipe,
    method: MethodSpec,
    folder: str | Path,
    n: int,
    base_seed: int = 0,
    batch_size: int = 16,
    prompts: Sequence[str] | None = None,
    pipe_kwargs: dict | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Write images 0..n-1 of `method` to `folder` as {index:06d}.png; skip the ones already valid.

    Call it in every process of a torchrun/accelerate launch (it starts the process group itself when
    WORLD_SIZE > 1); each rank computes its chunks; patch-parallel methods compute every chunk on every
    rank and rank 0 writes. Returns the same `GenerationResult` on every rank.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}.")
    folder = check_out_dir(folder)
    method.check(pipe)  # before the folder is touched: a refused method leaves nothing behind
    rank, _ = init_distributed()
    identity = _identity(method, base_seed, batch_size, prompts, model_fingerprint(pipe), pipe_kwargs)
    record = _open_folder(folder, identity, n)
    split = method.patch_parallel is None
    pending = _pending_chunks(folder, n, batch_size, split)
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress_bar(method, pending) if progress and rank == 0 and pending else None
    start = time.perf_counter()
    try:
        counts = _sample_chunks(pipe, method, folder, pending, base_seed, conditioning(pipe, prompts),
                                pipe_kwargs or {}, rank == 0 or split, bar)
    finally:
        if bar is not None:
            bar.close()
    counts["wall"] = time.perf_counter() - start
    counts["peak"], peak_kind = _peak_memory(device)
    run = _world_timing(counts, split)
    timing = {k: run[k] for k in ("computed", "wall_s", "unet_calls", "unet_rows_per_image", "world_size")}
    previous = (record or {}).get("timing")
    if previous and previous.get("computed", 0) >= run["computed"]:
        timing = previous  # keep the timing of the run that computed the most images
    s_per_image = timing["wall_s"] / timing["computed"] if timing["computed"] else None
    result = GenerationResult(
        folder=str(folder), n=n, computed=run["computed"], written=run["written"], wall_s=timing["wall_s"],
        s_per_image=s_per_image, images_per_s=1 / s_per_image if s_per_image else None, nfe=method.num_steps(),
        unet_calls=timing["unet_calls"], unet_rows_per_image=timing.get("unet_rows_per_image"),
        peak_mem_mb=run["peak"], peak_mem_kind=peak_kind, world_size=timing["world_size"], batch_size=batch_size,
        hardware=hardware_description(),
    )
    barrier()
    if rank == 0:
        _write_record(folder, {**identity, "n": n, "torch_threads": torch.get_num_threads(), "timing": timing})
    barrier()
    return result


@dataclass
class Samples:
    """What `sample_images` returns: the images in index order and how long the sampling took."""

    images: torch.Tensor  # (n, C, H, W) in [0, 1] (output_type "pt") or the latents ("latent"), float32, on CPU
    wall_s: float
    unet_calls: int  # denoiser forward calls, all batches
    unet_rows: int  # batch rows through the denoiser, all batches


def sample_images(
    pipe,
    method: MethodSpec,
    n: int,
    base_seed: int = 0,
    batch_size: int = 16,
    prompts: Sequence[str] | None = None,
    pipe_kwargs: dict | None = None,
    output_type: Literal["pt", "latent"] = "pt",
) -> Samples:
    """Images 0..n-1 of `method` in memory: the seeds, conditioning and batches of `generate_images`.

    For benchmarks that score tensors instead of PNG files: image i equals the PNG `generate_images` writes
    for it with the same arguments, before the 8-bit rounding. `pipe_kwargs` are passed to every pipeline
    call and win over the per-index conditioning (`{"class_labels": None}`: unconditional samples).
    `output_type="latent"` returns the final latents instead of images. One process, no files; with a
    patch-parallel method every rank of the process group calls it and gets all n images.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}.")
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}.")
    cond = conditioning(pipe, prompts)
    out: list[torch.Tensor] = []
    with method.apply(pipe) as sample:
        counter = _CallCounter(getattr(pipe, "unet", None) or getattr(pipe, "transformer", None))
        start = time.perf_counter()
        try:
            for chunk in index_chunks(n, batch_size):
                images = _sample_chunk(sample, chunk, base_seed, cond, pipe_kwargs or {}, output_type)
                out.append(torch.as_tensor(images).detach().float().cpu())
        finally:
            counter.remove()
        wall = time.perf_counter() - start
    return Samples(torch.cat(out), wall, counter.calls, counter.rows)


def sharded_features(folder: str | Path, n: int, extractor, batch_size: int = 64) -> np.ndarray:
    """Features (n, d) of images 0..n-1 in `folder`, computed by chunks over the ranks, gathered in order."""
    from fastdiff.eval.features import get_extractor, load_images

    if isinstance(extractor, str):
        extractor = get_extractor(extractor)
    if n < 2:
        raise ValueError(f"need at least N = 2 images for FD, got N = {n}.")
    rank, world = init_distributed()
    mine = {}
    for k, chunk in enumerate(index_chunks(n, batch_size)):
        if k % world != rank:
            continue
        missing = [i for i in chunk if not image_path(folder, i).is_file()]
        if missing:
            raise FileNotFoundError(f"{image_path(folder, missing[0])} is missing: generate the images first.")
        mine[k] = extractor(load_images([image_path(folder, i) for i in chunk]))
    parts: dict[int, np.ndarray] = {}
    for shard in gather_objects(mine):
        parts.update(shard)
    return np.concatenate([parts[k] for k in sorted(parts)])


def read_prompts(path: str | Path | None) -> list[str] | None:
    if path is None:
        return None
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line).")
    return prompts
