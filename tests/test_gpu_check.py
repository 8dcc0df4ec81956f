"""benchmarks/gpu_check.py without a GPU: the no-CUDA path, bad arguments, budgets, every part on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check_parts import PARTS, PartContext, count_host_syncs

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def _run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The driver as ``make gpu-check`` runs it, with CUDA hidden (so a GPU machine takes the same path)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env,
                          cwd=REPO_ROOT)


def test_gpu_check_without_cuda_says_so_checks_imports_and_exits_zero(tmp_path):
    """No CUDA: exit 0, say so, and report that the imports and the plan of the real check work."""
    out = _run_script("--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA" in out.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "no_cuda"
    dry_run = report["parts"]["dry-run"]
    assert dry_run["status"] == "pass", dry_run["checks"]
    assert report["plan"] == gpu_check.BUDGETS and gpu_check.TOTAL_S <= 480  # 8 minutes in all
    assert (tmp_path / "gpu_check.txt").read_text().startswith("lightning_lbo GPU check (cuda)")


def test_gpu_check_with_a_gpu_but_no_cuda_torch_fails_naming_the_fix(tmp_path):
    """nvidia-smi lists a GPU that no interpreter's torch sees: exit 1, and say what to install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.03, 143771 MiB'\n")
    fake.chmod(0o755)
    out = _run_script("--out", str(tmp_path), env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "error" and "install a CUDA build of torch" in report["notes"][0]


def test_gpu_check_rejects_bad_arguments(capsys):
    """A CPU run without --smoke and a malformed budget fail at parsing, naming the fix."""
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])
    assert "add --smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--part-timeout", "speed"])
    assert "PART=SECONDS" in capsys.readouterr().err
    assert gpu_check.plan(gpu_check.parse_args(["--parts", "ddp", "sync", "--part-timeout", "sync=7"])) == \
        {"sync": 7.0, "ddp": gpu_check.BUDGETS["ddp"]}


def test_gpu_check_part_over_its_budget_is_killed_and_reported(tmp_path):
    """A part that outlives its budget is killed; the report says "timeout" and the exit status is 1."""
    out = _run_script("--device", "cpu", "--smoke", "--parts", "tests", "--part-timeout", "tests=3",
                      "--out", str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "fail" and report["parts"]["tests"]["status"] == "timeout"
    assert "[tests] timeout" in (tmp_path / "gpu_check.txt").read_text()


def test_summarize_junit_counts_and_names_failures(tmp_path):
    """JUnit XML -> one summary check (pass only if every test passed) and one check per failed/skipped test."""
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.gpu.test_a" name="test_ok"/>'
                   '<testcase classname="tests.gpu.test_a" name="test_bad"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.gpu.test_b" name="test_skip"><skipped message="no CUDA"/></testcase>'
                   '</testsuite></testsuites>')
    part = gpu_check.summarize_junit(xml, "cuda")
    assert part["status"] == "fail" and part["figures"]["tests"] == 3
    assert [c["name"] for c in part["checks"][1:]] == ["test_a.test_bad", "test_b.test_skip"]
    assert part["checks"][1]["detail"] == "failure: boom"
    xml.write_text('<testsuite tests="1" failures="0" errors="0" skipped="0"><testcase classname="c" name="t"/>'
                   '</testsuite>')
    assert gpu_check.summarize_junit(xml, "cuda")["status"] == "pass"


def test_count_host_syncs_on_cpu_counts_scalar_reads_at_their_line():
    """On the CPU the sync counter sees ``.item()`` and ``float(t)``, attributed to the calling line."""
    t = torch.arange(4.0)
    with count_host_syncs("cpu") as counts:
        float(t.sum())
        t.max().item()
        t.add_(1)  # stays on the device: not counted
    assert sum(counts.values()) == 2
    assert all(key.startswith("tests/test_gpu_check.py:") for key in counts), counts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sync", "amp", "speed"])
def test_gpu_check_smoke_part_passes_on_cpu(name, tmp_path):
    """Each in-process part runs on the CPU with tiny sizes and every check holds (speed: only "measured")."""
    result = PARTS[name](PartContext("cpu", True, 300.0, tmp_path)).as_dict()
    checks = [c for c in result["checks"] if not c["name"].startswith("goal:")]  # speed goals are the GPU's
    assert checks and all(c["ok"] for c in checks), checks
    if name == "speed":
        assert {f["ratio_to_sgd"]["sgd"] for f in result["figures"].values()} == {1.0}


@pytest.mark.slow
def test_gpu_check_smoke_ddp_part_trains_one_and_two_ranks_on_cpu(tmp_path):
    """ddp_kfac through torchrun over gloo: one rank equals the plain loop; two ranks hold bit-identical weights."""
    result = PARTS["ddp"](PartContext("cpu", True, 300.0, tmp_path)).as_dict()
    names = [c["name"] for c in result["checks"]]
    assert names == ["world size 1 (gloo): finite and equal to one plain process",
                     "2 processes on one device (gloo): weights finite",
                     "2 processes (gloo): ranks hold bit-identical weights"]
    assert all(c["ok"] for c in result["checks"]), result["checks"]


@pytest.mark.slow
def test_cuda_variant_tests_run_against_the_cpu(tmp_path):
    """tests/gpu with LBO_GPU_TEST_DEVICE=cpu: the comparison code runs (without CUDA it would only skip)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                         env={**os.environ, "LBO_GPU_TEST_DEVICE": "cpu"})
    assert out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]
