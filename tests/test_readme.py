"""README.md is a test: its python blocks run, each in a fresh interpreter, and its shell lines run or say how long.

- A line `expression  # -> value` promises `str(expression) == value`; the block runs with that check.
- A python block whose first line is `# torchrun ... FILE.py` runs as FILE.py under that launch line.
- A shell line either runs here, at N = 8 images and batch 2 where it takes `-n/--num-images` and
  `--batch-size`, or ends with `# long: ...` naming its expected time. A torchrun or `accelerate launch` line
  must write the same PNGs as its one-process twin (the same command without the launcher).
Everything runs in a fresh folder that links the repository's `eval/` and `pipelines/` (the recorded schedules,
the sweep files, the recipes), so nothing is written into the checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROMISE = re.compile(r"^(?P<indent>\s*)(?P<expr>[^#\s].*?)\s+# -> (?P<value>.+?)\s*$")
LONG = re.compile(r"# long: .*?\d+ (s|min|h)\b")
LAUNCHERS = ("torchrun", "accelerate")
SMALL = {"-n": "8", "--num-images": "8", "--batch-size": "2"}


def blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line number of the first code line, code) of every fenced block of `language` in the markdown text."""
    found, lines, start = [], text.splitlines(), None
    for i, line in enumerate(lines):
        if start is None and line.strip() == f"```{language}":
            start = i + 1
        elif start is not None and line.strip() == "```":
            found.append((start + 1, "\n".join(lines[start:i])))
            start = None
    return found


def with_checks(code: str, first_line: int = 1) -> tuple[str, int]:
    """The block with each `expr  # -> value` line turned into a check of str(expr); and how many there are.

    `first_line`: README.md's line number of the block's first line, for the failure message."""
    out, count = [], 0
    for n, line in enumerate(code.splitlines(), first_line):
        m = PROMISE.match(line)
        if m:
            count += 1
            line = f"{m['indent']}__promise(({m['expr']}), {m['value']!r}, {n})"
        out.append(line)
    header = (
        "def __promise(value, promised, line):\n"
        "    assert str(value) == promised, f'README.md line {line}: promised {promised}, got {value}'\n"
    )
    return header + "\n".join(out) + "\n", count


def small(cmd: str) -> list[str]:
    """The shell line's argv (comment dropped) at the test's N and batch size."""
    argv = shlex.split(cmd, comments=True)
    return [SMALL.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]


def one_process(argv: list[str]) -> list[str]:
    """The launcher line's one-process twin: `fastdiff ...` with `--out` + `_one`."""
    i = argv.index("fastdiff.cli")
    twin = ["fastdiff", *argv[i + 1:]]
    k = twin.index("--out") + 1
    twin[k] += "_one"
    return twin


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", MPLBACKEND="Agg",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def workdir(tmp_path):
    for name in ("eval", "pipelines"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    if argv[0] in ("torchrun", "accelerate", "fastdiff"):
        argv = [str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


TEXT = README.read_text()
PYTHON = blocks(TEXT, "python")
SINGLE = [(line, code) for line, code in PYTHON if not code.startswith("# torchrun")]
TORCHRUN = [(line, code) for line, code in PYTHON if code.startswith("# torchrun")]
SHELL = [(line + i, cmd) for line, code in blocks(TEXT, "bash") for i, cmd in enumerate(code.splitlines())
         if cmd.strip() and not LONG.search(cmd)]
LAUNCHED = [(line, cmd) for line, cmd in SHELL if cmd.split()[0] in LAUNCHERS]


def test_the_readme_promises_values_and_has_something_to_run():
    assert sum(with_checks(code)[1] for _, code in PYTHON) >= 8
    assert len(SINGLE) >= 6 and TORCHRUN and SHELL and LAUNCHED


def test_a_changed_promise_fails():
    """The check is real: a promise that does not hold stops the block; one that holds lets it go on."""
    code, count = with_checks("import torch\nx = torch.tensor([3, 7])\nx, len(x)  # -> (tensor([3, 7]), 2)\n"
                              "x + 1  # -> tensor([4, 9])\nreached = True\n")
    assert count == 2
    scope: dict = {}
    with pytest.raises(AssertionError, match=r"README.md line 4: promised tensor\(\[4, 9\]\), got tensor\(\[4, 8\]\)"):
        exec(code, scope)
    assert "reached" not in scope


@pytest.mark.slow
@pytest.mark.parametrize("line, code", SINGLE, ids=[f"line{line}" for line, _ in SINGLE])
def test_python_block_runs_in_a_fresh_interpreter(line, code, workdir):
    proc = _run([sys.executable, "-c", with_checks(code, line)[0]], workdir)
    assert proc.returncode == 0, f"README.md line {line}:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("line, code", TORCHRUN, ids=[f"line{line}" for line, _ in TORCHRUN])
def test_torchrun_block_runs_under_its_launch_line(line, code, workdir):
    words = shlex.split(code.splitlines()[0].lstrip("# "), comments=True)
    launch = words[: next(i for i, w in enumerate(words) if w.endswith(".py")) + 1]  # prose may follow
    (workdir / launch[-1]).write_text(with_checks(code, line)[0])
    proc = _run(launch, workdir, timeout=600)
    assert proc.returncode == 0, f"README.md line {line}:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_shell_lines_run_at_small_n(workdir):
    """The one-process lines, in README order (later lines read what earlier ones wrote)."""
    for line, cmd in SHELL:
        if cmd.split()[0] not in LAUNCHERS:
            proc = _run(small(cmd), workdir)
            assert proc.returncode == 0, f"README.md line {line}: {cmd}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("line, cmd", LAUNCHED, ids=[f"line{line}" for line, _ in LAUNCHED])
def test_launch_line_writes_what_one_process_writes(line, cmd, workdir):
    """A `-m fastdiff.cli` launch equals its one-process twin (PNGs byte for byte, FD to 1e-6); a recipe runs."""
    import json

    argv = small(cmd)
    out = workdir / argv[argv.index("--out") + 1]
    runs = (argv, one_process(argv)) if "fastdiff.cli" in argv else (argv,)
    for run in runs:
        proc = _run(run, workdir, timeout=600)
        assert proc.returncode == 0, f"README.md line {line}: {shlex.join(run)}\n{proc.stderr[-3000:]}"
    if len(runs) == 1:
        assert out.is_file() and out.stat().st_size > 0
        return
    pngs = sorted(p.relative_to(out) for p in out.rglob("*.png") if p.name != "pareto.png")  # the plot shows time
    assert len(pngs) >= 8
    twin = out.with_name(out.name + "_one")
    assert pngs == sorted(p.relative_to(twin) for p in twin.rglob("*.png") if p.name != "pareto.png")
    for png in pngs:
        assert (out / png).read_bytes() == (twin / png).read_bytes(), png
    if (out / "results.jsonl").exists():
        rows = [[json.loads(r) for r in (d / "results.jsonl").read_text().splitlines()] for d in (out, twin)]
        assert [r["world_size"] for r in rows[0]] == [2] * len(rows[1])
        for a, b in zip(*rows):
            assert a["fd_lenet"] == pytest.approx(b["fd_lenet"], rel=1e-6), a["method"]
