"""One long benchmark unit at a time on a small machine.

Several studies share this repository's 2-core machine; timing figures are only honest when one
measurement runs at a time. Each unit of work (one training run of a grid, one timed comparison) holds
an exclusive ``flock`` on a lock file, so that concurrent studies interleave unit by unit instead of
sharing the cores. The lock file is ``$LBO_BENCH_LOCK`` (default ``/tmp/lbo_bench.lock``); from a shell,
``flock /tmp/lbo_bench.lock CMD`` takes the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def bench_lock(path: str | None = None) -> Iterator[None]:
    """Hold the benchmark lock for the duration of the ``with`` block (blocks until it is free)."""
    path = path or os.environ.get("LBO_BENCH_LOCK", "/tmp/lbo_bench.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
