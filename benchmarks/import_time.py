"""Wall time of fresh interpreters: ``import lightning_lbo`` and ``lbo --help`` against ``import torch``.

Each round runs every command once, in turn (so load changes hit all of them alike); the table gives
the median of the rounds. ``--before DIR`` adds the same commands run against another checkout of
the package (e.g. ``git worktree add /tmp/old <rev>``), imported through ``PYTHONPATH`` from a
neutral working directory. The whole measurement holds the shared benchmark lock.

    python benchmarks/import_time.py --rounds 5 [--before /tmp/old]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_lock import bench_lock  # noqa: E402

HELP = "from lightning_lbo.cli import main; main(['--help'])"


def commands(before: str | None) -> list[tuple[str, list[str], dict[str, str]]]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    py = sys.executable
    rows = [("import torch", [py, "-c", "import torch"], env),
            ("import pytorch_lightning", [py, "-c", "import pytorch_lightning"], env),
            ("import lightning_lbo", [py, "-c", "import lightning_lbo"], env),
            ("from lightning_lbo import KFAC", [py, "-c", "from lightning_lbo import KFAC"], env),
            ("lbo --help", [py, "-c", HELP], env)]
    if before:
        old = dict(env, PYTHONPATH=before)
        rows += [("import lightning_lbo (before)", [py, "-c", "import lightning_lbo"], old),
                 ("lbo --help (before)", [py, "-c", HELP], old)]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default=None, help="another checkout's root, measured side by side")
    args = parser.parse_args(argv)
    rows = commands(args.before)
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    loads = []
    with bench_lock(exclusive=True), tempfile.TemporaryDirectory() as neutral:  # cwd must not shadow either checkout
        for _ in range(args.rounds):
            for name, cmd, env in rows:
                start = time.perf_counter()
                subprocess.run(cmd, env=env, cwd=neutral, stdout=subprocess.DEVNULL, check=True)
                times[name].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
    for name, ts in times.items():
        print(f"{name:34s} median {statistics.median(ts):6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})")
    print(f"1-min load average after each round: {[round(x, 1) for x in loads]} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
