"""The one lazy-export mechanism of fastdiff's packages: a public name loads its module on first use.

    __getattr__ = lazy_exports(__name__, {"run_sweep": "fastdiff.eval.sweep", "eval": "fastdiff.eval"})

A name that maps to `<package>.<name>` is a subpackage and returns the module itself. This keeps
`import fastdiff` (and `import fastdiff.eval`, `fastdiff.parallel`, `fastdiff.models`) free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `exports[name]` when `name` is first read."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        return module if exports[name] == f"{package}.{name}" else getattr(module, name)

    return __getattr__
