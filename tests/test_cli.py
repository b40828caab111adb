"""The `sslam` command line: help lists working subcommands; config errors exit 2 with a message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_only_registered_subcommands():
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True)
    for name in _subcommands():
        assert name in result.stdout
    assert "make-sample-data" in result.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name):
    result = subprocess.run([sys.executable, "-m", "jobs.cli", name, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: sslam" in result.stdout


def test_bad_override_exits_2_with_message(tmp_path, capsys):
    code = main(["make-sample-data", str(tmp_path / "out"), "--set", "data.synth.train_clipz=3"])
    assert code == 2
    assert "data.synth.train_clipz" in capsys.readouterr().err
