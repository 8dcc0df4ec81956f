"""Capturing K-FAC statistics: forward hooks, output-gradient tensor hooks and the MC-Fisher backward.

:class:`Capture` is the hooks as one object with an explicit interface: ``begin(due)`` arms it for
the coming step (which statistics of which block), the hooks fill sums over examples, and
``collect()`` hands them over (``discard()`` drops them, ``remove()`` removes every hook). It knows
nothing of inverses, schedules or ranks; each finished statistic goes to ``on_statistic`` (the
preconditioner starts its cross-rank reduction there).

Hooks record only in training mode, with grad enabled, on armed steps, and never inside
:func:`lightning_lbo.capture.curvature_capture_paused`. Per micro-batch, input statistics (``A``)
are computed in the forward hook and output statistics (``G``/``F``) in a tensor hook registered on
the layer output during the forward (so in-place ops after the layer do not change what is
captured). With ``fisher="mc"`` the forward records gradient edges of the layer outputs instead, and
a tensor hook on the root module's output (the logits) runs the sampled-label backward to those
edges when the training backward starts (:mod:`.fisher`).

Uses of a layer (tied weights, a block called twice in one forward): calls between two backward
passes are uses of one micro-batch; their input statistics add up (like positions) and their
output statistics are averaged over the uses (the convention of :mod:`.blocks`). A block whose
weight belongs to several modules (tied embeddings, :mod:`.tied`) hooks each of them
(:meth:`~lightning_lbo.optim.kfac.blocks.CurvatureBlock.uses`), with its own statistics per module.
Only one :class:`Capture` hooks a module at a time: a new one (``KFAC(model)`` built again by a
second ``configure_optimizers``, ``lr_find`` or ``fit``) removes the hooks of the one before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_lbo.capture import capture_paused
from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood, sampled_loss

# module -> the Capture hooking it (weak both ways; not an attribute, so modules stay picklable)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _MicroBatch:
    """One micro-batch of one block: its examples and how many times the block ran on it."""

    examples: int
    uses: int = 1
    closed: bool = False


@dataclass
class Captured:
    """What a block captured since ``begin``: summed statistics, examples, and the A (G) rows if kept."""

    sums: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    examples: int = 0
    rows: list[torch.Tensor] | None = field(default_factory=list)
    g_rows: list[torch.Tensor] | None = field(default_factory=list)
    batches: dict[int, _MicroBatch] = field(default_factory=dict)  # the current micro-batch of each use
    forwards: int = 0


def grad_scale(scaler: Any) -> torch.Tensor | None:
    """The current loss scale of an AMP ``GradScaler`` as a device tensor (no sync), ``None`` if disabled.

    The one place that reads the scaler's private ``_scale`` (``get_scale()`` would sync the host).
    """
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


class Capture:
    """The K-FAC hooks on ``root`` and its blocks' modules.

    Args:
        blocks: the curvature blocks to hook.
        root: the module whose forward output is the logits (``fisher="mc"``).
        fisher: which Fisher the output statistics estimate.
        likelihood: sampling distribution of ``fisher="mc"``.
        output_to_logits: maps the root's output to the logits.
        on_statistic: called with each finished sum over examples (e.g. to start reducing it).
    """

    def __init__(self, blocks: list[CurvatureBlock], root: nn.Module, *, fisher: Fisher, likelihood: Likelihood,
                 output_to_logits: Callable[[Any], torch.Tensor] | None,
                 on_statistic: Callable[[torch.Tensor, bool], None]) -> None:
        self.blocks = blocks
        self.root = root
        self.fisher = fisher
        self.likelihood = likelihood
        self.output_to_logits = output_to_logits
        self.on_statistic = on_statistic
        self.grad_scaler: Any = None
        self.output_grad_dtypes: set[torch.dtype] = set()  # read by binding.check_grad_scaler at the first step
        self.due: dict[int, set[str]] = {}
        self.keep_rows: set[int] = set()
        self.captured: dict[int, Captured] = {}
        self._mc_targets: list[tuple[CurvatureBlock, Any, Any, Any, _MicroBatch]] = []
        self._in_mc = False
        # id(logits) -> (logits, targets) of forwards whose training backward has not started yet. The MC
        # hook gets the key, not the tensor: a hook holding the tensor it is registered on is a reference
        # cycle through the autograd graph that Python's GC cannot see (every step's graph leaked).
        self._mc_pending: dict[int, tuple[torch.Tensor, list]] = {}
        self._handles: list[Any] = []
        for block in blocks:
            for i, (module, use) in enumerate(block.uses()):
                self._claim(module)
                self._handles.append(module.register_forward_hook(partial(self._forward_hook, block, use, i == 0),
                                                                  with_kwargs=True))
        self._claim(root)
        self._handles.append(root.register_forward_hook(self._root_forward_hook))

    # ---- interface ------------------------------------------------------------------------------------------
    def begin(self, due: dict[int, set[str]], keep_rows: set[int]) -> None:
        """Arm the hooks: ``due`` maps ``id(block)`` to the statistics to capture; ``keep_rows`` the blocks
        whose A rows are kept for a low-rank inverse (when they have fewer rows than half of ``d_A``)."""
        self.discard()
        self.due = {k: v for k, v in due.items() if v}
        self.keep_rows = keep_rows

    @property
    def armed(self) -> bool:
        return bool(self.due)

    @property
    def active(self) -> bool:
        """Something was captured since :meth:`begin`."""
        return bool(self.captured)

    def collect(self) -> dict[int, Captured]:
        """The statistics captured since :meth:`begin`, by ``id(block)``; disarms the hooks."""
        captured, self.captured = self.captured, {}
        self.due, self._mc_targets, self._mc_pending = {}, [], {}
        return captured

    def discard(self) -> None:
        """Drop what was captured (e.g. the statistics of a step the AMP scaler skipped)."""
        self.captured = {}
        self._mc_targets, self._mc_pending = [], {}

    def remove(self) -> None:
        """Remove every hook (teardown); idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.due, self.captured, self._mc_targets, self._mc_pending = {}, {}, [], {}

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def run_mc_backward(self, logits: torch.Tensor) -> None:
        """The sampled-label backward for the current forward, now (when the root's output is not the logits)."""
        targets, self._mc_targets = self._mc_targets, []
        if targets:
            self._mc_backward(logits, targets)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _claim(self, module: nn.Module) -> None:
        """Make this the only capture hooking ``module``: remove the hooks of a previous one."""
        previous = _OWNERS.get(module)
        previous = previous() if previous is not None else None
        if previous is not None and previous is not self:
            previous.remove()
        _OWNERS[module] = weakref.ref(self)

    def _recording(self, module: nn.Module) -> bool:
        return module.training and not capture_paused() and torch.is_grad_enabled()

    def _forward_hook(self, block: CurvatureBlock, use: Any, counts_examples: bool, module: nn.Module, inputs: tuple,
                      kwargs: dict[str, Any], output: Any) -> None:
        due = self.due.get(id(block))
        if not due or not self._recording(module):
            return
        x, examples, output = use.hook_io(inputs, kwargs, output)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        record = self.captured.setdefault(id(block), Captured())
        record.forwards += 1
        batch = record.batches.get(id(use))
        if batch is None or batch.closed:  # a new micro-batch (the previous one saw its backward)
            batch = record.batches[id(use)] = _MicroBatch(examples)
            record.examples += examples if counts_examples else 0
        else:  # another use of the layer in the same forward
            batch.uses += 1
        stats, context = use.input_statistics(x, due)
        for name, value in stats.items():
            record.sums.setdefault(name, []).append(value)
            self.on_statistic(value, use.symmetric(name))
        if "A" in stats and record.rows is not None:
            rows = context
            if id(block) in self.keep_rows and isinstance(rows, torch.Tensor) and 2 * rows.shape[1] <= block.dims[0]:
                record.rows.append(rows)
            else:
                record.rows = None
        wanted = use.output_stat in due
        if self.fisher is Fisher.MC and wanted:
            self._mc_targets.append((block, use, torch.autograd.graph.get_gradient_edge(output), context, batch))
            wanted = False
        # The tensor hook also closes the micro-batch when the backward reaches this use.
        output.register_hook(partial(self._grad_hook, block, use, context, batch, wanted))

    def _output_statistic(self, block: CurvatureBlock, use: Any, grad: torch.Tensor, context: Any,
                          batch: _MicroBatch, scaled: bool) -> None:
        stat = use.output_statistic(grad.detach(), context)
        if batch.uses > 1:
            stat = stat / batch.uses
        scale = grad_scale(self.grad_scaler) if scaled else None
        if scale is not None:
            stat = stat / scale.to(device=stat.device, dtype=stat.dtype).square()
        record = self.captured.get(id(block))
        if record is None:  # discarded meanwhile
            return
        if record.g_rows is not None and id(block) in self.keep_rows:  # rows of a low-rank G (W^T W = stat)
            rows = block.low_rank_output_rows(grad.detach())
            if rows is None:
                record.g_rows = None
            else:
                rows = rows / batch.uses ** 0.5 if batch.uses > 1 else rows
                record.g_rows.append(rows if scale is None else rows / scale.to(device=rows.device, dtype=rows.dtype))
        record.sums.setdefault(use.output_stat, []).append(stat)
        self.on_statistic(stat, use.symmetric(use.output_stat))

    def _grad_hook(self, block: CurvatureBlock, use: Any, context: Any, batch: _MicroBatch, wanted: bool,
                   grad: torch.Tensor) -> None:
        if capture_paused() or self._in_mc:
            return
        batch.closed = True
        self.output_grad_dtypes.add(grad.dtype)
        if wanted:
            self._output_statistic(block, use, grad, context, batch, scaled=True)

    def _root_forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.fisher is not Fisher.MC or not self._mc_targets:
            return
        targets, self._mc_targets = self._mc_targets, []
        if not self._recording(module):
            return
        logits = self.output_to_logits(output) if self.output_to_logits is not None else output
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"fisher='mc' needs the module's forward to return the logits tensor, got "
                            f"{type(logits).__name__}; pass output_to_logits=... to extract them.")
        if logits.requires_grad:
            self._mc_pending[id(logits)] = (logits, targets)
            logits.register_hook(partial(self._mc_hook, id(logits)))

    def _mc_hook(self, key: int, grad: torch.Tensor) -> None:
        """At the start of the training backward: the sampled-label backward to the layer outputs only."""
        pending = self._mc_pending.pop(key, None)
        if pending is not None and not self._in_mc and not capture_paused():
            self._mc_backward(*pending)

    def _mc_backward(self, logits: torch.Tensor, targets: list) -> None:
        self._in_mc = True
        try:
            with torch.enable_grad():
                loss = sampled_loss(logits, self.likelihood)
                grads = torch.autograd.grad(loss, [edge for _, _, edge, _, _ in targets], retain_graph=True,
                                            allow_unused=True)
            for (block, use, _, context, batch), g in zip(targets, grads, strict=True):
                if g is not None:
                    self._output_statistic(block, use, g, context, batch, scaled=False)
        finally:
            self._in_mc = False
