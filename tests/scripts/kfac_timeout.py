"""Two gloo ranks; rank 1 freezes before each curvature collective: rank 0's must fail after the strategy's timeout.

The world group is built with a long timeout (120 s), so only the curvature group's own timeout can end rank
0's wait early. Cases: ``KFACDDPStrategy(timeout=...)``'s group (``ddp_kfac``), and the synchronous
communicator ``KFACCallback`` builds under plain ``DDPStrategy(timeout=...)`` (``attach_kfac``). Rank 1 waits
for rank 0's verdict in a file, then both leave. Prints ``<case>: timed out after <s> s`` per case.

Usage: python tests/scripts/kfac_timeout.py TIMEOUT_S MARGIN_S FLAG_DIR
"""

from __future__ import annotations

import os
import sys
import time
import types
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FROZEN_AT_MOST_S = 90


def _wait_for(flag: Path) -> None:
    deadline = time.monotonic() + FROZEN_AT_MOST_S
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _curvature_collective(comm) -> None:
    comm.reduce_factors([torch.ones(3, 3)], symmetric=True)
    comm.wait()


def _case(rank: int, name: str, comm, timeout_s: float, margin_s: float, flag: Path) -> None:
    if rank == 1:  # frozen: never joins the collective, until rank 0 has its verdict
        _wait_for(flag)
        return
    start = time.monotonic()
    try:
        _curvature_collective(comm)
    except Exception as err:  # noqa: BLE001 - gloo's timeout error type varies across torch versions
        elapsed = time.monotonic() - start
        print(f"{name}: timed out after {elapsed:.1f} s ({type(err).__name__})", flush=True)
        assert elapsed < timeout_s + margin_s, f"{name}: waited {elapsed:.1f} s with a {timeout_s} s timeout"
    else:
        raise AssertionError(f"{name}: the collective completed without the frozen peer")
    finally:
        flag.touch()


def _worker(rank: int, port: int, timeout_s: float, margin_s: float, flags: str) -> None:
    import pytorch_lightning as pl

    from lightning_lbo.callbacks.kfac_lifecycle import attach_kfac
    from lightning_lbo.compat import strategy_timeout
    from lightning_lbo.optim.kfac import KFACPreconditioner
    from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    timeout = timedelta(seconds=timeout_s)
    strategy = kfac_ddp_strategy_class("pytorch_lightning")(timeout=timeout)
    strategy.setup_curvature_sync()  # the group and communicator ddp_kfac builds at setup
    _case(rank, "ddp_kfac", strategy.communicator, timeout_s, margin_s, Path(flags) / "ddp_kfac")

    holder = types.SimpleNamespace(kfac=KFACPreconditioner(torch.nn.Linear(4, 2)))
    attach_kfac([], holder, timeout=strategy_timeout(pl.strategies.DDPStrategy(timeout=timeout)))
    _case(rank, "plain ddp", holder.kfac.comm, timeout_s, margin_s, Path(flags) / "plain_ddp")
    print(f"rank {rank} ok", flush=True)
    sys.stdout.flush()
    os._exit(0)  # the curvature groups are broken on rank 0: no collective teardown


if __name__ == "__main__":
    from tests.helpers.ddp import free_port

    timeout_s, margin_s, flags = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    mp.spawn(_worker, args=(free_port(), timeout_s, margin_s, flags), nprocs=2, join=True)
