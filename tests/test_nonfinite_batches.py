"""NonFiniteBatchGuard: a run with NaN/Inf batches equals, bit for bit, the run in which they were dropped."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lbo.callbacks.batchnorm_stats import BatchNormStats
from lightning_lbo.callbacks.nonfinite_batches import NonFiniteBatchGuard, TensorSnapshot
from lightning_lbo.optim.kfac import KFAC
from lightning_lbo.optim.lamb import LAMB
from lightning_lbo.optim.lars import LARS
from tests.conftest import make_trainer
from tests.helpers.ddp import REPO_ROOT, run_script

NUM_BATCHES = 10
BAD = {0: float("nan"), 3: float("inf"), 6: float("nan")}  # batch index -> injected value (first step included)


class ReplacingMomentum(torch.optim.Optimizer):
    """Momentum SGD that replaces its state tensors every step instead of updating them in place."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["buf"] = 0.9 * state["buf"] + p.grad if "buf" in state else p.grad.clone()
                state["count"] = state.get("count", torch.zeros(())) + 1
                p.add_(state["buf"], alpha=-group["lr"])


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "replacing": lambda m: ReplacingMomentum(m.parameters()),
    "lars": lambda m: LARS(m.parameters(), lr=0.5, weight_decay=1e-4, trust_coefficient=0.02),
    "lamb": lambda m: LAMB(m.parameters(), lr=1e-2, weight_decay=1e-2),
    # refresh every step: K-FAC's refresh schedule is a host-side counter of attempted steps
    "kfac": lambda m: KFAC(m, lr=0.05, momentum=0.9, damping=1e-2, factor_update_interval=1,
                           inverse_update_interval=1),
}


def module_class(pl):
    class Net(pl.LightningModule):
        """Linear-BN-ReLU-Linear classifier: BN running statistics and a K-FAC-able stack."""

        def __init__(self, make_optimizer):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
            self.make_optimizer = make_optimizer

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return self.make_optimizer(self)

    return Net


def batches(bad: dict[int, float], seed: int = 0, n: int = NUM_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 8 examples; batch ``i`` in ``bad`` gets one NaN/Inf input entry."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        if i in bad:
            x[i % 8, i % 6] = bad[i]
        out.append((x, y))
    return out


def fit(pl, tmp_path, name, data, callbacks=(), **trainer_kwargs):
    module = module_class(pl)(OPTIMIZERS[name])
    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=list(callbacks), log_every_n_steps=1,
                           **trainer_kwargs)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return module, trainer


def assert_same_training_state(a, b, opt_a, opt_b):
    """Weights, BN running statistics and optimizer state equal bit for bit (skip counters aside)."""
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"module {key} differs"
    _assert_equal(_without_counters(opt_a.state_dict()), _without_counters(opt_b.state_dict()), "optimizer")


# Host-side counters count attempted steps by design (reading the device's decision would be a host sync
# per step): LARS' count of steps since its momentum scale was folded into the buffers, K-FAC's step and
# refresh schedule. The skip counters differ by definition.
HOST_COUNTERS = ("steps_since_rescale", "steps", "next_due", "refreshes")
SKIP_COUNTERS = ("nonfinite_skips", "skipped_steps", "skipped_refreshes")


def _is_counter(key) -> bool:
    """A counter's key, nested (``next_due``) or flattened into K-FAC's per-parameter and param-group entries
    (``kfac.next_due.A``, ``kfac_steps``)."""
    return any(part in HOST_COUNTERS + SKIP_COUNTERS for part in str(key).replace("kfac_", "kfac.").split("."))


def _without_counters(state):
    """The optimizer state minus the skip counters and the host-side step counters, at any depth."""
    if isinstance(state, dict):
        return {k: _without_counters(v) for k, v in state.items() if not _is_counter(k)}
    if isinstance(state, (list, tuple)):
        return [_without_counters(v) for v in state]
    return state


def _assert_equal(x, y, where):
    if isinstance(x, dict):
        assert x.keys() == y.keys(), f"{where}: keys {sorted(x, key=str)} != {sorted(y, key=str)}"
        for k in x:
            _assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), f"{where} differs"
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def dropped(bad, accumulate=1):
    """Indices of the batches the reference run keeps: a bad micro-batch drops its whole accumulation cycle."""
    cycles = {i // accumulate for i in bad}
    return [i for i in range(NUM_BATCHES) if i // accumulate not in cycles]


@pytest.mark.parametrize("name", ["sgd", "adam", "replacing", "lars", "lamb", "kfac"])
def test_nonfinite_batches_equal_dropped_run(tmp_path, name):
    """NaN and Inf batches (the first one included) leave no trace: the run equals the one without them."""
    pl = importlib.import_module("pytorch_lightning")
    data = batches(BAD)
    guard = NonFiniteBatchGuard()
    with pytest.warns(UserWarning, match=r"1 optimizer step\(s\) were skipped") as record:
        bad_module, bad_trainer = fit(pl, tmp_path, name, data, callbacks=[guard])
    assert sum("were skipped" in str(w.message) for w in record) == 1
    ref_module, ref_trainer = fit(pl, tmp_path, name, [data[i] for i in dropped(BAD)])
    assert_same_training_state(bad_module, ref_module, bad_trainer.optimizers[0], ref_trainer.optimizers[0])
    assert guard.total == len(BAD) and bad_trainer.callback_metrics["nonfinite_skips"] == len(BAD)
    opt = bad_trainer.optimizers[0]
    if hasattr(opt, "nonfinite_skips"):  # the optimizer and the guard count the same steps
        assert opt.nonfinite_skips.item() == len(BAD)


@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_nonfinite_micro_batch_drops_its_accumulation_cycle(tmp_path, name):
    """Under accumulation one bad micro-batch skips its step; equal to dropping that cycle's micro-batches."""
    pl = importlib.import_module("pytorch_lightning")
    bad = {3: float("nan"), 6: float("inf")}
    data = batches(bad)
    guard = NonFiniteBatchGuard()
    with pytest.warns(UserWarning, match="were skipped"):
        bad_module, bad_trainer = fit(pl, tmp_path, name, data, callbacks=[guard], accumulate_grad_batches=2)
    ref_module, ref_trainer = fit(pl, tmp_path, name, [data[i] for i in dropped(bad, 2)], accumulate_grad_batches=2)
    assert_same_training_state(bad_module, ref_module, bad_trainer.optimizers[0], ref_trainer.optimizers[0])
    assert guard.total == 2


@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_nonfinite_batches_under_bf16_amp(tmp_path, name):
    """bf16-mixed autocast: the bad batches still leave no trace."""
    pl = importlib.import_module("lightning.pytorch")
    data = batches(BAD)
    with pytest.warns(UserWarning, match="were skipped"):
        bad_module, bad_trainer = fit(pl, tmp_path, name, data, callbacks=[NonFiniteBatchGuard()],
                                      precision="bf16-mixed")
    ref_module, ref_trainer = fit(pl, tmp_path, name, [data[i] for i in dropped(BAD)], precision="bf16-mixed")
    assert_same_training_state(bad_module, ref_module, bad_trainer.optimizers[0], ref_trainer.optimizers[0])


def test_nonfinite_batches_two_ranks():
    """2 DDP ranks (torchrun, gloo): a bad batch on either rank skips the step on both; equal to dropping it."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "nonfinite_ddp.py", torchrun_nproc=2, timeout=420).stdout
    assert out.count("ok") >= 2, out


def test_nonfinite_batches_leave_the_batchnorm_stats_window_as_if_dropped(tmp_path):
    """BatchNormStats' last-batches window forgets skipped batches: statistics and state equal the dropped run."""
    pl = importlib.import_module("pytorch_lightning")
    data = batches(BAD)
    stats_bad, stats_ref = BatchNormStats(num_batches=4), BatchNormStats(num_batches=4)
    with pytest.warns(UserWarning, match="were skipped"):
        bad_module, bad_trainer = fit(pl, tmp_path, "sgd", data, callbacks=[NonFiniteBatchGuard(), stats_bad])
    ref_module, ref_trainer = fit(pl, tmp_path, "sgd", [data[i] for i in dropped(BAD)], callbacks=[stats_ref])
    assert stats_bad.num_batches_used == stats_ref.num_batches_used == 4
    assert_same_training_state(bad_module, ref_module, bad_trainer.optimizers[0], ref_trainer.optimizers[0])
    window_bad, window_ref = stats_bad.state_dict()["window"], stats_ref.state_dict()["window"]
    _assert_equal(window_bad, window_ref, "window")


def test_without_guard_bn_statistics_are_poisoned(tmp_path):
    """The reason for the guard: without it a NaN batch leaves NaN running statistics (weights are safe)."""
    pl = importlib.import_module("pytorch_lightning")
    module, trainer = fit(pl, tmp_path, "lamb", batches({4: float("nan")}))
    assert torch.isnan(module.net[1].running_mean).all()
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.optimizers[0].nonfinite_skips.item() == 1


def test_guard_resume_keeps_the_count(tmp_path):
    """The skip count and the warned flag survive a checkpoint; a resumed guard does not warn again."""
    pl = importlib.import_module("pytorch_lightning")
    guard = NonFiniteBatchGuard()
    with pytest.warns(UserWarning, match="were skipped"):
        fit(pl, tmp_path, "sgd", batches(BAD), callbacks=[guard])
    state = copy.deepcopy(guard.state_dict())
    assert state == {"warned": True, "skipped_steps": len(BAD)}
    resumed = NonFiniteBatchGuard()
    resumed.load_state_dict(state)
    fit(pl, tmp_path, "sgd", batches({2: float("nan")}), callbacks=[resumed])
    assert resumed.total == len(BAD) + 1 and resumed.warned


def test_guard_rejects_manual_optimization(tmp_path):
    """Manual optimization decides its own steps: the guard says so at fit start."""
    pl = importlib.import_module("pytorch_lightning")

    class Manual(module_class(pl)):
        def __init__(self):
            super().__init__(OPTIMIZERS["sgd"])
            self.automatic_optimization = False

    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[NonFiniteBatchGuard()])
    with pytest.raises(RuntimeError, match="works with automatic optimization"):
        trainer.fit(Manual(), train_dataloaders=DataLoader(batches({}), batch_size=None))


def test_guard_rejects_bad_log_interval():
    with pytest.raises(ValueError, match="Invalid log_every_n_steps"):
        NonFiniteBatchGuard(log_every_n_steps=0)


def test_tensor_snapshot_restores_only_where_told():
    """restore_where(False) keeps the current values, restore_where(True) the saved ones, dtype by dtype."""
    floats, ints = torch.arange(5.0), torch.tensor([3, 4])
    snap = TensorSnapshot([floats, ints])
    snap.save()
    floats.add_(1.0)
    ints.mul_(2)
    snap.restore_where(torch.tensor(False))
    assert torch.equal(floats, torch.arange(5.0) + 1) and torch.equal(ints, torch.tensor([6, 8]))
    floats.fill_(float("nan"))
    snap.restore_where(torch.tensor(True))
    assert torch.equal(floats, torch.arange(5.0)) and torch.equal(ints, torch.tensor([3, 4]))


@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_nonfinite_batches_under_fp16_grad_scaler(tmp_path, name):
    """16-mixed with a grad scaler: a non-finite loss is a bad batch (not an overflow): no trace, scale kept."""
    pl = importlib.import_module("pytorch_lightning")
    data = batches(BAD)

    def fp16():  # an explicit plugin: Lightning would turn precision="16-mixed" into bf16 on the CPU
        return [pl.plugins.precision.MixedPrecision("16-mixed", "cpu")]

    guard = NonFiniteBatchGuard()
    with pytest.warns(UserWarning, match="were skipped"):
        bad_module, bad_trainer = fit(pl, tmp_path, name, data, callbacks=[guard], plugins=fp16())
    ref_module, ref_trainer = fit(pl, tmp_path, name, [data[i] for i in dropped(BAD)], plugins=fp16())
    assert_same_training_state(bad_module, ref_module, bad_trainer.optimizers[0], ref_trainer.optimizers[0])
    assert guard.total == len(BAD)
    scalers = [t.precision_plugin.scaler for t in (bad_trainer, ref_trainer)]
    assert scalers[0].get_scale() == scalers[1].get_scale() == 65536.0
