"""The prepared GPU check (issue 17): one self-installing command that proves the CUDA path and measures speed.

On a machine with CUDA, in one command of at most 8 minutes (its install included), ``make gpu-check``

1. ``tests``: runs the CUDA-variant tests (``tests/gpu``: K-FAC factors/steps/resume/bf16/skips, LARS and
   LAMB on both paths, BatchNormStats, Hessian HVPs/eigenvalues/trace), each comparing CUDA to the CPU, and
   the FSDP1 case: ``KFAC`` and ``LARS`` under Lightning's ``FSDPStrategy`` (GPU only; ``use_orig_params``
   both ways) refused at setup naming ``fully_shard`` (``tests/gpu/test_cuda_fsdp1.py``);
2. ``amp``: trains a few hundred K-FAC steps under ``precision="16-mixed"`` (Lightning's real GradScaler)
   and ``"bf16-mixed"`` with non-finite batches injected: factors finite and free of the loss scale,
   skipped steps counted;
3. ``sync``: runs K-FAC steps that refresh nothing under ``torch.cuda.set_sync_debug_mode`` (counted by
   source line in "warn" mode, then in "error" mode);
4. ``ddp``: ``strategy="ddp_kfac"`` over NCCL with world size 1, and 2 processes sharing the GPU (NCCL if
   it allows two ranks on one device, else gloo on CUDA tensors); the ranks' weights must be identical;
5. ``speed``: K-FAC / momentum-SGD step-time ratios interleaved in one process on torchvision resnet50
   (224x224, batch 128, bf16 autocast, factors every 10 and inverses every 100 steps) and on the
   SmallCNN (batch 1024, K-FAC defaults, fp32), ASDL's K-FAC measured beside;
6. writes ``gpu_check.json`` and ``gpu_check.txt`` (plus the tests' JUnit XML and a log) to ``--out``.

``--study`` (``make gpu-study``) runs instead the ``study`` part alone, in about 7 minutes: the SmallCNN at
E = 30 with study v2's protocol, batches 128 and 2048, ``sgd``/``lars``/``kfac``, short LR grids and seeds
(:mod:`gpu_study`); its runs and summary are the part's figures in ``gpu_check.json``.

Setup: the driver needs only the standard library. It picks the first interpreter whose torch sees CUDA
(this one, ``python3``, ``.venv/bin/python``), puts the repository on ``PYTHONPATH`` and installs only
missing modules with ``pip --target`` (from ``build/gpu_wheels`` when present, for machines without a
package registry: ``make gpu-wheels`` fills it), quietly and timed. Every part runs in its own process
group under a time budget; the report is written even when a part fails, crashes or times out.

Without CUDA the driver says so, checks that it would run (interpreter, imports, the plan) and exits 0.
``--device cpu --smoke`` runs every part on the CPU with tiny sizes (what tests/test_gpu_check.py runs).

Usage::

    make gpu-check                                       # on the GPU machine: report to $OUT
    make gpu-study                                       # the SmallCNN study variant (carry data/)
    python3 benchmarks/gpu_check.py --out build/gpu_check
    python3 benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO_ROOT / "build" / "gpu_wheels"
SITE_DIR = Path("/tmp/lbo_gpu_site")
#: The whole run on the GPU machine, probes and install included (the issue allows 8 minutes).
TOTAL_S = 470.0
#: Part name -> longest time in seconds on the GPU machine (the order is the run order); the parts share TOTAL_S.
BUDGETS = {"tests": 100, "sync": 50, "amp": 80, "speed": 160, "ddp": 150}
SMOKE_BUDGETS = {"tests": 240, "sync": 90, "amp": 150, "speed": 150, "ddp": 200}
#: ``--study``: the study part alone (its own ~7 minutes; not part of the default check's 8)
STUDY_BUDGETS = {"study": 420}
SMOKE_STUDY_BUDGETS = {"study": 300}
#: Module -> what pip installs when it is missing (``None``: required, not installable here).
MODULES = {"torch": None, "pytorch_lightning": "pytorch-lightning>=2.1", "torchvision": None,
           "torchmetrics": "torchmetrics>=1.0", "typing_extensions": "typing-extensions", "pytest": "pytest>=7.4",
           "asdl": "asdfghjkl==0.1a5"}
OPTIONAL = {"asdl"}  # the speed part measures ASDL only when it is importable
PROBE = """
import importlib.util, json, sys
info = {"python": sys.version.split()[0], "missing": [m for m in %r if importlib.util.find_spec(m) is None]}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda)
    if info["cuda"]:
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
except Exception as exc:
    info.update(torch=None, cuda=False, error=repr(exc))
print(json.dumps(info))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO_ROOT / "build" / "gpu_check"),
                        help="report folder (default: $OUT, else build/gpu_check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the real check; cpu: run the parts on the CPU (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise every code path in little time")
    parser.add_argument("--dry-run", action="store_true", help="check that the check would run; run no part")
    parser.add_argument("--parts", nargs="+", choices=sorted(BUDGETS), default=None, help="run only these parts")
    parser.add_argument("--study", action="store_true",
                        help="run only the study part: the SmallCNN at E = 30 on the GPU (about 7 minutes)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for the whole run, install included (default {TOTAL_S:.0f}; smoke: no limit)")
    parser.add_argument("--part-timeout", nargs="*", default=[], metavar="PART=SECONDS",
                        help="override a part's budget, e.g. --part-timeout speed=200")
    # Internal modes: one part in this process, or one DDP rank under torchrun.
    parser.add_argument("--worker", choices=("amp", "sync", "ddp", "speed", "study"), help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="nccl", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # scratch folder (not brought back)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not (args.smoke or args.dry_run or args.worker or args.ddp_worker):
        parser.error("--device cpu runs the smoke sizes only: add --smoke (speed figures on a CPU are not the goal)")
    if args.study and args.parts:
        parser.error("--study runs the study part alone: drop --parts (or run the check without --study)")
    known = STUDY_BUDGETS if args.study else BUDGETS
    for item in args.part_timeout:
        name, _, value = item.partition("=")
        if name not in known or not value.replace(".", "", 1).isdigit():
            parser.error(f"Invalid --part-timeout {item!r}; use PART=SECONDS with PART in {tuple(known)}.")
    return args


def plan(args: argparse.Namespace) -> dict[str, float]:
    """Part -> time budget, in run order."""
    if getattr(args, "study", False):
        budgets = dict(SMOKE_STUDY_BUDGETS if args.smoke else STUDY_BUDGETS)
    else:
        budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    budgets.update({k: float(v) for k, v in (item.split("=") for item in args.part_timeout)})
    return {name: budgets[name] for name in budgets if args.parts is None or name in args.parts}


# ------------------------------------------------------------------------------------- setup
def probe(python: str) -> dict[str, Any] | None:
    """What ``python`` has: its torch, whether it sees CUDA, which needed modules are missing."""
    try:
        out = subprocess.run([python, "-c", PROBE % (list(MODULES),)], capture_output=True, text=True, timeout=120,
                             env=part_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        return None
    return {"executable": python, **json.loads(lines[-1])}


def interpreters() -> list[str]:
    """Candidate interpreters: this one, ``python3`` on PATH, the repository's ``.venv`` (each once).

    Paths are compared as written: a venv's python links to its base interpreter but has other packages.
    """
    found = []
    for candidate in (sys.executable, shutil.which("python3"), str(REPO_ROOT / ".venv" / "bin" / "python")):
        if candidate and os.path.exists(candidate) and os.path.abspath(candidate) not in found:
            found.append(os.path.abspath(candidate))
    return found


def choose_interpreter(device: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The first interpreter with a torch that sees CUDA (``device="cuda"``) or any torch (``"cpu"``)."""
    probes = [p for p in (probe(python) for python in interpreters()) if p is not None]
    usable = [p for p in probes if p.get("torch") and (p["cuda"] or device == "cpu")]
    usable.sort(key=lambda p: len(p["missing"]))  # stable: the earlier candidate among equals
    return (usable[0] if usable else None), probes


def part_env() -> dict[str, str]:
    """The environment of every child: the repository and the install folder on the path, offline wandb."""
    paths = [str(REPO_ROOT), str(SITE_DIR), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "disabled", "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_", "0"),
            "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "100000000000")}


def install_missing(info: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """``pip install --target`` the missing modules that can be installed (wheelhouse first, no dependencies)."""
    wanted = [MODULES[m] for m in info["missing"] if MODULES.get(m)]
    report: dict[str, Any] = {"missing_before": list(info["missing"]), "requested": wanted}
    if not wanted:
        return report
    source = ["--no-index", "--find-links", str(WHEELHOUSE)] if WHEELHOUSE.is_dir() else []
    cmd = [info["executable"], "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
           "--no-deps", "--no-compile", "--upgrade", "--target", str(SITE_DIR), *source, *wanted]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        report.update(returncode=out.returncode, output=(out.stdout + out.stderr)[-800:])
    except subprocess.TimeoutExpired:
        report.update(returncode=None, output=f"pip timed out after {timeout:.0f} s")
    report.update(seconds=round(time.perf_counter() - t0, 1), source="wheelhouse" if source else "registry")
    after = probe(info["executable"])
    report["missing_after"] = after["missing"] if after else info["missing"]
    return report


# ------------------------------------------------------------------------------------- parts
def run_tests_part(python: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """pytest on tests/gpu; counts and failures from its JUnit XML."""
    from gpu_check_parts import run_bounded

    junit = args.out / "gpu_tests.xml"
    junit.unlink(missing_ok=True)
    env = part_env()
    if args.device == "cpu":
        env["LBO_GPU_TEST_DEVICE"] = "cpu"
    cmd = [python, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    codes, timed_out, tail = run_bounded([cmd], timeout, env, args.out / "gpu_check.log")
    if timed_out:
        return {"status": "timeout", "output_tail": tail[-2000:]}
    if not junit.exists():
        return {"status": "error", "output_tail": tail[-2000:]}
    return summarize_junit(junit, expect_device=args.device)


def summarize_junit(path: Path, expect_device: str) -> dict[str, Any]:
    """A part result from a JUnit XML file: counts, one check per test that failed or skipped (a skip means
    the device under test was missing, so it fails the part too)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    checks = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}.{case.get('name', '')}".removeprefix("tests.gpu.")
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                detail = (node.get("message") or node.text or "").strip().splitlines()
                checks.append({"name": name, "ok": False, "detail": f"{kind}: {' '.join(detail)[:300]}"})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    checks.insert(0, {"name": f"CUDA-variant tests on {expect_device} ({counts['tests']} tests)",
                      "ok": counts["tests"] > 0 and passed == counts["tests"],
                      "detail": f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                                f"{counts['skipped']} skipped"})
    return {"status": "pass" if checks[0]["ok"] else "fail", "checks": checks, "figures": counts, "notes": []}


def run_worker_part(python: str, name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One part in a child process (its own process group, killed at the budget); its JSON result."""
    from gpu_check_parts import run_bounded

    result = args.work / f"part_{name}.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--device", args.device, "--work", str(args.work),
           "--result", str(result), "--budget-s", str(timeout)] + (["--smoke"] if args.smoke else [])
    codes, timed_out, tail = run_bounded([cmd], timeout, part_env(), args.out / "gpu_check.log")
    if result.exists():
        return json.loads(result.read_text())
    return {"status": "timeout" if timed_out else "error", "checks": [], "figures": {}, "notes": [],
            "output_tail": tail[-2000:]}


def worker_main(args: argparse.Namespace) -> int:
    """``--worker PART``: run the part here, write its result (or the exception) as JSON."""
    import traceback

    from gpu_check_parts import PARTS, PartContext

    t0 = time.perf_counter()
    try:
        if args.worker == "study":
            from gpu_study import part_study

            PARTS = {**PARTS, "study": part_study}  # noqa: N806 - the parts table, with the study
        data = PARTS[args.worker](PartContext(args.device, args.smoke, args.budget_s, args.work)).as_dict()
    except Exception:  # noqa: BLE001 - the report must say what broke
        data = {"status": "error", "checks": [], "figures": {}, "notes": [], "output_tail": traceback.format_exc()}
    data["seconds"] = round(time.perf_counter() - t0, 1)
    args.result.write_text(json.dumps(data, indent=1, default=str))
    return 0 if data["status"] == "pass" else 1


# ------------------------------------------------------------------------------------- report
def machine_info(chosen: dict[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()[:200]
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    else:
        info["nvidia_smi"] = "not found"
    if chosen:
        info.update({k: chosen.get(k) for k in ("executable", "python", "torch", "cuda_version", "gpu")})
    if os.path.exists("/proc/loadavg"):
        info["loadavg"] = Path("/proc/loadavg").read_text().strip()
    return info


def render_text(report: dict[str, Any]) -> str:
    """The short text report: the machine, then each part's status, checks and figures."""
    m = report["machine"]
    lines = [f"lightning_lbo GPU check ({report['mode']}), {report['started']}, {report['seconds']:.0f} s: "
             f"{report['status'].upper()}",
             f"machine: {m.get('gpu') or m.get('nvidia_smi')}; torch {m.get('torch')} (CUDA {m.get('cuda_version')}), "
             f"python {m.get('python')}, {m.get('cpus')} CPUs, load {m.get('loadavg', '?')}"]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    for name, part in report["parts"].items():
        lines.append(f"\n[{name}] {part['status']} ({part.get('seconds', 0):.0f} s)")
        for check in part.get("checks", []):
            lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']}"
                         + (f": {check['detail']}" if check.get("detail") else ""))
        for key, value in part.get("figures", {}).items():
            lines.append(f"  {key}: {json.dumps(value, default=str)}")
        lines += [f"  note: {n}" for n in part.get("notes", [])]
        if part.get("output_tail") and part["status"] != "pass":
            lines.append("  output tail:\n    " + "\n    ".join(part["output_tail"].strip().splitlines()[-15:]))
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path, t0: float) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.txt`` (after every part, so a killed run keeps what it did)."""
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = render_text(report)
    (out / "gpu_check.txt").write_text(text)
    return text


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_parts, also under a bare python3
    if args.ddp_worker:
        from gpu_check_parts import ddp_worker

        ddp_worker(args)
        return 0
    if args.worker:
        return worker_main(args)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").write_text("")
    # Only four files go to --out (the device returns at most 8); trainer folders and part results go here.
    args.work = Path(tempfile.mkdtemp(prefix="lbo_gpu_check_"))
    try:
        return run_check(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


def run_check(args: argparse.Namespace) -> int:
    """Probe, install, run the parts in order within the budget, write the report; the exit status."""
    t0 = time.perf_counter()
    budgets = plan(args)
    report: dict[str, Any] = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "mode": f"{args.device}{' smoke' if args.smoke else ''}", "plan": budgets,
                              "parts": {}, "notes": [], "status": "running", "seconds": 0.0}
    chosen, probes = choose_interpreter(args.device)
    report["interpreters"] = probes
    report["machine"] = machine_info(chosen)
    gpu_listed = "," in report["machine"]["nvidia_smi"]  # a "name, driver, memory" row
    if chosen is None and args.device == "cuda" and gpu_listed:
        report["notes"].append(f"nvidia-smi lists {report['machine']['nvidia_smi']!r} but no interpreter's torch sees "
                               "CUDA: install a CUDA build of torch for python3 (the check cannot run)")
        return finish(report, args, t0, "error")
    if chosen is None or args.dry_run:
        return dry_run(args, report, chosen, probes, t0)

    budget = args.budget_s or (TOTAL_S if not args.smoke else sum(budgets.values()) + 300)
    deadline = t0 + budget
    install_s = min(120.0, (deadline - time.perf_counter()) / 4)
    # Only the GPU machine installs; a CPU smoke run measures without what is missing (ASDL) and says so.
    report["install"] = install_missing(chosen, install_s) if args.device == "cuda" else {"skipped": "CPU smoke run"}
    missing = [m for m in report["install"].get("missing_after", chosen["missing"]) if m not in OPTIONAL]
    if missing:
        report["notes"].append(f"cannot run: {chosen['executable']} lacks {missing} (see install)")
        return finish(report, args, t0, "error")
    names = list(budgets)
    for i, name in enumerate(names):
        later_minimum = 20 * (len(names) - i - 1)  # leave every later part a chance to start
        timeout = min(budgets[name], deadline - time.perf_counter() - later_minimum)
        if timeout < min(15.0, budgets[name]):  # a part given less on purpose (--part-timeout) still runs
            report["parts"][name] = {"status": "skipped", "checks": [], "notes": ["out of time"]}
            continue
        started = time.perf_counter()
        if name == "tests":
            part = run_tests_part(chosen["executable"], args, timeout)
        else:
            part = run_worker_part(chosen["executable"], name, args, timeout)
        part["seconds"] = round(time.perf_counter() - started, 1)
        part["budget_s"] = round(timeout)
        report["parts"][name] = part
        print(f"[{name}] {part['status']} in {part['seconds']:.0f} s", flush=True)
        write_report(report, args.out, t0)
    ok = all(p["status"] == "pass" for p in report["parts"].values())
    return finish(report, args, t0, "pass" if ok else "fail")


def finish(report: dict[str, Any], args: argparse.Namespace, t0: float, status: str) -> int:
    report["status"] = status
    print(write_report(report, args.out, t0), flush=True)
    return 0 if status in ("pass", "no_cuda", "dry_run") else 1


def dry_run(args: argparse.Namespace, report: dict[str, Any], chosen: dict[str, Any] | None,
            probes: list[dict[str, Any]], t0: float) -> int:
    """No CUDA (or --dry-run): say so, check imports and the plan with the best interpreter, exit 0 if it would run."""
    no_cuda = chosen is None
    if no_cuda:
        report["notes"].append("no CUDA: no interpreter here has a torch that sees a GPU "
                               f"({', '.join(p['executable'] for p in probes) or 'no interpreter with torch'}); "
                               "checked that the GPU check would run instead")
        with_torch = sorted((p for p in probes if p.get("torch")), key=lambda p: len(p["missing"]))
        chosen = with_torch[0] if with_torch else None
    if chosen is None:
        report["notes"].append("no interpreter with torch found: the check cannot run here")
        return finish(report, args, t0, "error")
    report["machine"].update({k: chosen.get(k) for k in ("executable", "python", "torch", "cuda_version")})
    code = ("import gpu_check, gpu_check_parts, lightning_lbo, pytorch_lightning, torchvision; "
            "from lightning_lbo import KFAC; from lightning_lbo.strategies import KFACDDPStrategy; "
            "from tests.gpu.accessors import layer_factors; import gpu_study; "
            "print(sorted(gpu_check_parts.PARTS))")
    env = part_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env["PYTHONPATH"]])
    out = subprocess.run([chosen["executable"], "-c", code], capture_output=True, text=True, timeout=180, env=env,
                         cwd=REPO_ROOT)
    imports_ok = out.returncode == 0
    report["parts"]["dry-run"] = {
        "status": "pass" if imports_ok else "fail", "figures": {"plan (part: budget s)": report["plan"]},
        "checks": [{"name": f"imports with {chosen['executable']}", "ok": imports_ok,
                    "detail": out.stdout.strip()[-300:] if imports_ok else out.stderr.strip()[-600:]},
                   {"name": "missing modules (installed on the GPU machine)", "ok": True,
                    "detail": ", ".join(chosen["missing"]) or "none"}], "notes": []}
    status = ("no_cuda" if no_cuda else "dry_run") if imports_ok else "fail"
    return finish(report, args, t0, status)


if __name__ == "__main__":
    sys.exit(main())
