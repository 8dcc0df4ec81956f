"""The `lbo` command: help, data, compare's input validation."""

from __future__ import annotations

import subprocess
import sys

from lightning_lbo.cli import main


def test_lbo_help_lists_subcommands(capsys):
    """`lbo` with no command prints help naming data and compare."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "data" in out and "compare" in out


def test_lbo_data_reports_location_and_sizes(capsys):
    """`lbo data` names the directory and the split sizes of the real data."""
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert "60000 images" in out and "10000 images" in out


def test_lbo_console_script_installed():
    """The entry point runs as a module too (`python -m lightning_lbo.cli --help`)."""
    out = subprocess.run([sys.executable, "-m", "lightning_lbo.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compare" in out.stdout
