"""The import graph of fastdiff/: every module imports on its own, no cycles, argparse only in the commands,
no private name imported from another module, and `import fastdiff` stays free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastdiff"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module, imported names) of each import statement (module-level ones only when `top_level_only`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _edges(name: str) -> set[str]:
    """fastdiff modules that `name` imports when it is imported (module-level statements)."""
    out = set()
    for module, names in _imports(MODULES[name], top_level_only=True):
        if not module.startswith("fastdiff"):
            continue
        targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
        for target in targets:
            if not name.startswith(target + ".") and target != name:  # a parent package is already importing
                out.add(target)
    return out


def test_no_import_cycles():
    graph = {name: _edges(name) for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# what each part of fastdiff may import from the others (docs/architecture.md); "*" = anything
ALLOWED = {
    "schedulers": set(), "clock": set(), "lazy": set(), "models": set(), "testing": set(),
    "compose": {"clock"}, "hooks": {"clock", "compose"}, "parallel": {"clock", "compose"},
    "guidance": {"schedulers", "clock", "compose", "models"},
    "search": {"schedulers", "hooks", "eval.metrics", "models", "testing"},
    "eval": {"compose", "schedulers", "models", ""},  # "": the package root (`from fastdiff import __version__`)
    "commands": {"*"}, "cli": {"commands"}, "": {"*"},
}


def _part(module: str) -> str:
    """'fastdiff.eval.sweep' -> 'eval', 'fastdiff.clock' -> 'clock', 'fastdiff' -> ''."""
    return module.split(".")[1] if module.count(".") else ""


def test_each_package_imports_only_what_docs_architecture_allows():
    offenders = []
    for name, path in MODULES.items():
        allowed = ALLOWED[_part(name)] | {"lazy"}  # every package's __init__ may export lazily
        for module, names in _imports(path, top_level_only=False):
            if not module.startswith("fastdiff") or _part(module) == _part(name) or "*" in allowed:
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            for target in targets:
                if _part(target) not in allowed and ".".join(target.split(".")[1:3]) not in allowed:
                    offenders.append(f"{name} imports {target}")
    assert offenders == []


def test_argparse_only_in_the_commands_package():
    offenders = [name for name, path in MODULES.items()
                 if not name.startswith("fastdiff.commands")
                 and any(module == "argparse" for module, _ in _imports(path, top_level_only=False))]
    assert offenders == []


def test_no_private_name_imported_across_modules():
    offenders = []
    for name, path in MODULES.items():
        for module, names in _imports(path, top_level_only=False):
            if module.startswith("fastdiff") and module != name:
                offenders += [f"{name}: from {module} import {n}" for n in names
                              if n.startswith("_") and not n.endswith("__")]
    assert offenders == []


def test_every_module_imports_first_in_a_clean_fastdiff():
    """Each module imported first, with no other fastdiff module loaded (third-party ones stay cached):
    an import cycle or a missing import fails here, whatever the order the suite happens to use."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(MODULES)!r}:\n"
            "    for loaded in [m for m in sys.modules if m == 'fastdiff' or m.startswith('fastdiff.')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_fastdiff_is_cheap():
    code = "import sys, fastdiff, fastdiff.eval, fastdiff.models, fastdiff.parallel, fastdiff.cli\n" \
           "print(sorted(m for m in ('torch', 'scipy', 'torchvision', 'cleanfid') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
