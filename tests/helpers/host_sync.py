"""Count host synchronisations and host-built tensors: per optimizer step, or per training batch of a fit.

On an accelerator each counted op either waits for the device (``.item()``, ``float(t)``, ``if t:``) or
copies host data to it (``torch.tensor(x)``, a Python float given to ``self.log``). On the CPU the ops are
the same, so these counters find on a CPU machine what would stall a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lbo.compat import callback_bases

aten = torch.ops.aten

# Ops that wait for the device or build a tensor from host data. Not counted: ``scalar_tensor`` (a Python
# number promoted in ``torch.where(c, t, 0.0)`` and the like) and ``full``: both are an empty tensor filled
# on the target device, a kernel launch with the number as argument, no copy and no wait.
_SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.lift_fresh.default,
             aten.lift_fresh_copy.default}


class HostSyncCounter(TorchDispatchMode):
    """Counts ops that wait for the device or copy between host and device.

    ``_local_scalar_dense``/``item`` (``.item()``, ``float(t)``, ``if t:``), ``lift_fresh`` (a tensor
    built from host data, ``torch.tensor(x)``: a blocking host-to-device copy on an accelerator) and
    copies between devices.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.ops.append(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst) != src.device:
                self.ops.append(f"{func} {src.device}->{dst}")
        return func(*args, **kwargs)


class _Open(*callback_bases()):
    """First callback of the run: opens a counter at the start of every training batch."""

    def __init__(self) -> None:
        self.counter: HostSyncCounter | None = None
        self.batches: list[tuple[int, list[str]]] = []  # (global step at the batch's start, ops)
        self._step = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        self.counter = HostSyncCounter()
        self.counter.__enter__()


class _Close(*callback_bases()):
    """Last callback of the run: closes the counter at the end of every training batch."""

    def __init__(self, opened: _Open) -> None:
        self.opened = opened

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        counter, self.opened.counter = self.opened.counter, None
        counter.__exit__(None, None, None)
        self.opened.batches.append((self.opened._step, counter.ops))


def batch_sync_recorder() -> tuple[Any, Any]:
    """``(first, last)``: put ``first`` before and ``last`` after the callbacks under test; ``first.batches``
    then lists, per training batch, the global step it started at and the ops counted from the first
    callback's ``on_train_batch_start`` to the last one's ``on_train_batch_end`` (forward, backward, the
    optimizer step and every callback hook in between)."""
    first = _Open()
    return first, _Close(first)
