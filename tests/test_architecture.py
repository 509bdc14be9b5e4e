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


# -- eval/bench_*.py sample and score through the harness --------------------------------------------------------
BENCHMARKS = sorted((ROOT / "eval").glob("bench_*.py"))
# A line that must seed, swap a scheduler or do FD maths itself (a scheduler- or UNet-level measurement, a data
# subset) says why in a comment on it or on the line above.
NOT_HARNESS = "# not harness:"
# benchmarks still on their own loops, and why; remove an entry once its script is moved
PENDING: dict[str, str] = {}
OWN_CALLS = ("manual_seed", "from_config", "sqrtm", "cov")


def own_sampling(source: str) -> list[str]:
    """Lines that build seeded generators (`manual_seed(`), swap schedulers (`from_config(`, assigning
    `.scheduler`) or compute FD by hand (`sqrtm(`, `cov(`), unless marked `# not harness: <reason>`.

    Benchmarks get all of that from the harness instead: `MethodSpec` (scheduler and accelerators),
    `sample_images` / `generate_images` (image i: seed base + i, label i % 10) and `fastdiff.eval.metrics`.
    """
    lines = source.splitlines()

    def excused(lineno: int) -> bool:
        for line in lines[max(lineno - 2, 0) : lineno]:
            reason = line.partition(NOT_HARNESS)[2] if NOT_HARNESS in line else ""
            if reason.strip():
                return True
        return False

    found = set()
    for node in ast.walk(ast.parse(source)):
        what = None
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            what = f"{name}(" if name in OWN_CALLS else None
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "scheduler" for x in targets for t in ast.walk(x)):
                what = ".scheduler ="
        if what and not excused(node.lineno):
            found.add((node.lineno, what))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_own_sampling_finds_seeds_swaps_and_fd_maths():
    source = (
        "g = torch.Generator().manual_seed(0)\n"
        "# not harness: a data subset\n"
        "h = torch.Generator().manual_seed(1)\n"
        "old, pipe.scheduler = pipe.scheduler, DDIMScheduler.from_config(config)\n"
        "covmean = linalg.sqrtm(np.cov(a) @ np.cov(b))  # not harness:\n"  # a marker needs its reason
        "x = torch.randn(2, generator=torch.Generator().manual_seed(2))  # not harness: a timing input\n"
    )
    assert own_sampling(source) == ["line 1: manual_seed(", "line 4: .scheduler =", "line 4: from_config(",
                                    "line 5: cov(", "line 5: sqrtm("]


def test_benchmarks_sample_through_the_harness():
    """No eval/bench_*.py seeds its own generators, swaps schedulers by hand or does FD maths itself."""
    names = {path.name for path in BENCHMARKS}
    assert set(PENDING) <= names, f"remove stale PENDING entries: {sorted(set(PENDING) - names)}"
    offenders = {path.name: own_sampling(path.read_text()) for path in BENCHMARKS if path.name not in PENDING}
    assert {name: found for name, found in offenders.items() if found} == {}
