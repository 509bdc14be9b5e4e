"""fastdiff.parallel: DistriFusion (arXiv 2402.19481) and PCPP (arXiv 2412.02962) patch parallelism.

    import fastdiff
    from fastdiff.parallel import PatchParallelConfig
    with fastdiff.apply(pipe, PatchParallelConfig(mode="async", warmup_steps=4)):  # under torchrun
        image = pipe("a red cube").images[0]

`enable_patch_parallel` / `disable_patch_parallel` are aliases of `fastdiff.apply` / `fastdiff.remove`.

Importing this package loads only the config; the torch/diffusers parts load on first use.
"""

from __future__ import annotations

from fastdiff.lazy import lazy_exports
from fastdiff.parallel.config import PatchParallelConfig

_LAZY = {
    "enable_patch_parallel": "fastdiff.parallel.patch",
    "disable_patch_parallel": "fastdiff.parallel.patch",
    "patch_parallel_state": "fastdiff.parallel.patch",
    "reset_patch_parallel": "fastdiff.parallel.patch",
    "check_divisible": "fastdiff.parallel.patch",
    "make_attachment": "fastdiff.parallel.patch",
    "PatchParallelAttachment": "fastdiff.parallel.patch",
    "PatchParallelError": "fastdiff.parallel.comm",
    "expected_bytes": "fastdiff.parallel.comm",
    "layer_plan": "fastdiff.parallel.layers",
}

__all__ = ["PatchParallelConfig", *_LAZY]

__getattr__ = lazy_exports(__name__, _LAZY)
