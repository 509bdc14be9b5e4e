"""The `fastdiff` console script: every subcommand parses; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastdiff import cli, commands


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("sample", "search", "eval", "train-reference", "demo"):
        assert word in out.stdout


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["eval", "sweep", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff eval sweep: ") and "does not exist" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["eval", "sweep", "--help"], ["train-reference", "--help"]])
def test_subcommand_help(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0


@pytest.mark.parametrize("command", list(commands.COMMANDS))
def test_help_of_a_command_loads_only_its_own_module(command):
    """`fastdiff <command> --help` imports that command's module and no other command's."""
    code = (
        "import sys\nfrom fastdiff import cli\n"
        f"try:\n    cli.main({command.split() + ['--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastdiff.commands.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])
    assert loaded == [commands.command_module(command).__name__]


@pytest.mark.parametrize("flag", ["--num-images", "-n"])
def test_image_count_flag_passes_through_the_launchers(flag):
    """`torchrun ... -m fastdiff.cli sample --num-images 4`: torchrun's own parser leaves the flag to fastdiff
    (`--n` was refused by torchrun as an abbreviation of `--nnodes` / `--nproc-per-node`)."""
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser().parse_args(
        ["--standalone", "--nproc_per_node", "2", "-m", "fastdiff.cli", "sample", flag, "4", "--out", "x"])
    assert launcher.training_script == "fastdiff.cli"
    args = commands.parse_args(launcher.training_script_args)
    assert args.command_name == "sample" and args.n == 4
    for command in (["eval", "sweep", "s.toml"], ["demo"]):
        assert commands.parse_args([*command, flag, "8"]).n == 8


@pytest.mark.parametrize("argv", [
    ["sample", "-n", "1", "--device", "cuda", "--out", "{tmp}/s"],
    ["search", "--steps", "4", "--device", "cuda", "--out", "{tmp}/s.json"],
])
def test_cuda_device_without_cuda_is_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the same on a GPU machine
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available on this machine; use cpu" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["sample", "-n", "1", "--out", "{file}"],
    ["sample", "-n", "1", "--out", "{file}/sub"],
    ["eval", "sweep", "eval/sweeps/reference.toml", "--out", "{file}"],
])
def test_out_pointing_at_a_file_is_refused_before_any_work(argv, tmp_path, capsys):
    import time
    from pathlib import Path

    file = tmp_path / "taken.txt"
    file.write_text("keep me")
    start = time.perf_counter()
    argv = [a.format(file=file) for a in argv]
    argv = [str(Path(__file__).parents[1] / a) if a.endswith(".toml") else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is a file; pass a folder path to --out" in err and err.count("\n") == 1
    assert file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]
    assert time.perf_counter() - start < 10


def test_train_reference_never_overwrites_the_shipped_weights_by_default(capsys):
    from pathlib import Path

    from fastdiff.models.weights import WEIGHTS_DIR

    args = commands.parse_args(["train-reference"])
    assert args.out == Path("runs/reference/weights") and not args.replace_shipped
    assert commands.parse_args(["train-reference", "--replace-shipped"]).replace_shipped
    before = {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()}
    assert cli.main(["train-reference", "--out", str(WEIGHTS_DIR)]) == 2
    assert "--replace-shipped" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()} == before


def test_uncached_model_offline_is_one_line_naming_the_fix(tmp_path, capsys):
    assert cli.main(["sample", "--model", "someone/not-cached-model", "-n", "1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "cannot load a model id 'someone/not-cached-model'" in err and "pass a local folder" in err
    assert err.count("\n") == 1 and not (tmp_path / "s").exists()
