"""fastdiff: faster sampling for diffusers pipelines without retraining, with measured quality cost.

Importing this package is cheap: subpackages load on first use, and nothing here imports scipy,
torchvision or clean-fid, touches the network or starts a process group.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = ("schedulers", "hooks", "search", "parallel", "guidance", "eval", "models", "testing")

__all__ = ["__version__", "apply", "remove", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fastdiff.{name}")
    if name in ("apply", "remove"):  # the one door for every accelerator (fastdiff.compose)
        return getattr(importlib.import_module("fastdiff.compose"), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
