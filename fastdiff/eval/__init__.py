"""The eval harness: FD/KID (numpy), named feature extractors, seeded sharded generation, quality-vs-speed sweeps.

Submodules load on first use, so `import fastdiff.eval` stays cheap (no scipy, torchvision or clean-fid).

Example:
    >>> from fastdiff.eval import frechet_distance, compute_stats, run_sweep
    >>> rows = run_sweep("eval/sweeps/reference.toml", "runs/ref", n=200)
"""

from __future__ import annotations

from fastdiff.lazy import lazy_exports

_EXPORTS = {
    "frechet_distance": "fastdiff.eval.metrics",
    "kernel_distance": "fastdiff.eval.metrics",
    "compute_stats": "fastdiff.eval.metrics",
    "save_stats": "fastdiff.eval.metrics",
    "load_stats": "fastdiff.eval.metrics",
    "check_compatible": "fastdiff.eval.metrics",
    "FeatureStats": "fastdiff.eval.metrics",
    "get_extractor": "fastdiff.eval.features",
    "folder_features": "fastdiff.eval.features",
    "MethodSpec": "fastdiff.eval.methods",
    "method_from_dict": "fastdiff.eval.methods",
    "generate_images": "fastdiff.eval.generate",
    "GenerationResult": "fastdiff.eval.generate",
    "sample_images": "fastdiff.eval.generate",
    "Samples": "fastdiff.eval.generate",
    "run_sweep": "fastdiff.eval.sweep",
    "write_results": "fastdiff.eval.report",
    "load_sweep": "fastdiff.eval.sweep",
    "SweepConfig": "fastdiff.eval.sweep",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
