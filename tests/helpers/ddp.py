"""Helpers for 2-process DDP tests on CPU (gloo).

Three ways to run ranks, for three kinds of test:

* :func:`spawn_gloo`: plain ``torch.distributed`` workers (no Trainer) for pure collectives code.
  Exceptions in a worker fail the test with the worker's traceback.
* ``Trainer(strategy="ddp_spawn", devices=2)``: callback state changed in workers is *not* copied
  back to the test process, so assert inside the workers (e.g. in ``on_fit_end``).
* :func:`run_script`: popen ``ddp`` and ``torchrun`` re-run ``sys.argv``, so they run a standalone
  script in a subprocess; the script prints/asserts and exits non-zero on failure.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[2]
COLLECTIVE_TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_env(threads_per_process: int = 1) -> dict[str, str]:
    """Environment for child processes: one thread each (2 processes on 2 cores), offline wandb."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads_per_process), MKL_NUM_THREADS=str(threads_per_process),
               WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    return env


def _gloo_worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    # A bounded timeout turns a stalled rendezvous or collective into a visible failure instead of a hang.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
        # Teardown only once every rank is done with every collective, and with nothing of the run left in
        # reference cycles (a model's hooks and its optimizer hold process groups and the rank-0 store): such
        # objects would otherwise be destroyed during interpreter finalization, after the process groups.
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn: Callable, world_size: int = 2, args: Sequence = ()) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; re-raise any failure.

    ``fn`` must be importable (defined at module level of a test file).
    """
    mp.spawn(_gloo_worker, args=(world_size, free_port(), fn, tuple(args)), nprocs=world_size, join=True)


def run_script(script: str | Path, *args: str, torchrun_nproc: int | None = None, nnodes: int = 1,
               timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a test script (plainly, or under ``torchrun``), fail with its output if it exits non-zero.

    With ``nnodes > 1`` one ``torchrun`` per node is started on 127.0.0.1 (a multi-node run on one
    machine), each with ``torchrun_nproc`` processes.
    """
    env = {**ddp_env(), **(env or {})}
    if torchrun_nproc is None:
        cmds = [[sys.executable, str(script), *args]]
    else:
        port = free_port()
        cmds = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node}",
                 f"--nproc_per_node={torchrun_nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
                 str(script), *args] for node in range(nnodes)]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    outputs, codes = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"{script} timed out after {timeout} s") from None
        outputs.append(out)
        codes.append(proc.returncode)
    output = "\n".join(outputs)
    if any(codes):
        raise AssertionError(f"{script} exited with {codes}:\n{output[-6000:]}")
    return subprocess.CompletedProcess(cmds[0], 0, output, "")
