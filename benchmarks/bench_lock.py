"""A small machine shared by several benchmarks: training units share the cores, timings get them all.

Several studies share this repository's 2-core machine. A training unit of a grid (one run, one
thread) takes one of ``$LBO_BENCH_SLOTS`` slots (default 2, one per core), so two single-thread runs go
side by side and neither oversubscribes the cores. A timed comparison, whose figures are only honest on
a quiet machine, takes every slot (``exclusive=True``). A gate lock ahead of the slots keeps waiting
exclusive units from being starved by a stream of single-slot ones.

The lock files are ``$LBO_BENCH_LOCK`` (default ``/tmp/lbo_bench.lock``, the gate) and
``<gate>.slot<i>``. From a shell, ``python -m benchmarks.bench_lock [--exclusive] CMD...`` runs a
command under the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator


def _slot_count() -> int:
    return max(1, int(os.environ.get("LBO_BENCH_SLOTS", "2")))


@contextlib.contextmanager
def bench_lock(path: str | None = None, *, exclusive: bool = False) -> Iterator[None]:
    """Hold one benchmark slot (or, with ``exclusive``, all of them) for the ``with`` block; blocks until free."""
    gate_path = path or os.environ.get("LBO_BENCH_LOCK", "/tmp/lbo_bench.lock")
    slot_paths = [f"{gate_path}.slot{i}" for i in range(_slot_count())]
    held: list = []
    try:
        with open(gate_path, "a") as gate:
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                if exclusive:
                    for slot_path in slot_paths:
                        handle = open(slot_path, "a")
                        held.append(handle)
                        fcntl.flock(handle, fcntl.LOCK_EX)
                else:
                    while not held:
                        for slot_path in slot_paths:
                            handle = open(slot_path, "a")
                            try:
                                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            except BlockingIOError:
                                handle.close()
                                continue
                            held.append(handle)
                            break
                        else:
                            time.sleep(0.5)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
        yield
    finally:
        for handle in held:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    exclusive = bool(args) and args[0] == "--exclusive"
    command = args[1:] if exclusive else args
    if not command:
        print("usage: python -m benchmarks.bench_lock [--exclusive] CMD [ARGS...]", file=sys.stderr)
        return 2
    with bench_lock(exclusive=exclusive):
        return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
