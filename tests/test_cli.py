"""The `fastdiff` console script: every subcommand parses; a feature that is missing says so and exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastdiff import cli


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("sample", "search", "eval", "train-reference", "demo"):
        assert word in out.stdout


def test_missing_feature_exits_2_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "search", ("fastdiff.not_a_module", "search", "x"))
    assert cli.main(["search"]) == 2
    assert "not available yet" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "sweep", "--help"], ["train-reference", "--help"]])
def test_subcommand_help(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
