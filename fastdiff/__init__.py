"""fastdiff: faster sampling for diffusers pipelines without retraining, with measured quality cost.

Importing this package is cheap: subpackages load on first use, and nothing here imports scipy,
torchvision or clean-fid, touches the network or starts a process group.
"""

from __future__ import annotations

from fastdiff.lazy import lazy_exports

__version__ = "0.1.0"

_SUBPACKAGES = ("schedulers", "hooks", "search", "parallel", "guidance", "eval", "models", "testing")

__all__ = ["__version__", "apply", "remove", *_SUBPACKAGES]

# the one door for every accelerator (fastdiff.compose), and the subpackages on first use
__getattr__ = lazy_exports(__name__, {"apply": "fastdiff.compose", "remove": "fastdiff.compose",
                                      **{name: f"fastdiff.{name}" for name in _SUBPACKAGES}})
