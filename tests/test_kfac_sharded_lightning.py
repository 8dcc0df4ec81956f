"""KFAC through Lightning's ModelParallelStrategy (fully_shard in configure_model, 2 CPU ranks): see the script."""

from __future__ import annotations

import pytest

from tests.helpers.ddp import REPO_ROOT, run_script


@pytest.mark.slow
def test_kfac_sharded_lightning_equals_one_process_and_resumes(tmp_path):
    """Trainer(strategy=ModelParallelStrategy(data_parallel_size=2)) + KFAC(self), no callback: trains and equals one
    process (its communicator on the mesh's group, with the strategy's timeout); across Lightning's distributed
    checkpoint, resumed with a user's KFACCallback, which keeps K-FAC's one communicator."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "kfac_sharded_lightning.py", str(tmp_path), timeout=600)
    assert "sharded Lightning KFAC without KFACCallback == one process over 6 steps" in out.stdout
    assert "Lightning checkpoint 3 + 3 steps (resumed with KFACCallback: one communicator) == 6 uninterrupted" \
        in out.stdout


@pytest.mark.slow
def test_kfac_sharded_lightning_two_nodes():
    """torchrun --nnodes 2 on 127.0.0.1, one rank per node, Trainer(num_nodes=2, devices=1) with ModelParallelStrategy:
    sharded KFAC (no callback) trains and equals one process on both ranks."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "kfac_sharded_lightning.py", "--nodes", "2", torchrun_nproc=1,
                     nnodes=2, timeout=300).stdout
    assert "sharded Lightning KFAC without KFACCallback == one process over 6 steps" in out
    assert "rank 0 of 2 on node 0: equal to one process" in out and "rank 1 of 2 on node 1: equal to one process" in out
