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


def test_lbo_help_imports_neither_torch_nor_lightning():
    """`lbo --help` and `lbo data --help` build only placeholders for the other commands: no heavy import."""
    code = ("import sys\nfrom lightning_lbo.cli import main\n"
            "for argv in (['--help'], ['data', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "compare" in out.stdout and "--download" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_lbo_every_command_builds_and_lists_its_help_line():
    """Each row of COMMANDS names a real parser builder; `lbo --help` lists every command with its line."""
    from lightning_lbo.cli import COMMANDS, build_parser

    full, listing = build_parser().format_help(), " ".join(build_parser("").format_help().split())  # unwrap lines
    for name, (_, _, help_line) in COMMANDS.items():
        assert name in full and help_line in listing, name
