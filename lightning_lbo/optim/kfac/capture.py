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
from torch.utils._pytree import tree_leaves

from lightning_lbo.capture import capture_paused
from lightning_lbo.optim._torch_private import grad_scaler_scale
from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.fisher import CLASSES_DIM_ATTRIBUTE, Fisher, LabelSampler, Likelihood, sampled_loss

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
    """What a block captured since ``begin``: the sums of each micro-batch (tensors or low-rank parts, see
    :mod:`.factors`) and the examples."""

    sums: dict[str, list[Any]] = field(default_factory=dict)
    examples: int = 0
    batches: dict[int, _MicroBatch] = field(default_factory=dict)  # the current micro-batch of each use
    forwards: int = 0


def grad_scale(scaler: Any) -> torch.Tensor | None:
    """The current loss scale of an AMP ``GradScaler`` as a device tensor (no sync), ``None`` if disabled.

    ``get_scale()`` would sync the host: the private scale is read through :mod:`lightning_lbo.optim._torch_private`.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    return grad_scaler_scale(scaler)


class Capture:
    """The K-FAC hooks on ``root`` and its blocks' modules.

    Args:
        blocks: the curvature blocks to hook.
        root: the module whose forward output is the logits (``fisher="mc"``).
        fisher: which Fisher the output statistics estimate.
        likelihood: sampling distribution of ``fisher="mc"``.
        output_to_logits: maps the root's output to the logits.
        on_statistic: called with each finished sum over examples, a tensor or a low-rank part, and whether
            it is symmetric (e.g. to start reducing it).
        classes_dim: the classes axis of categorical logits; ``None``: the root's declared
            ``logits_classes_dim`` attribute if it has one, else ``1`` (``[N, C, *]``).
        sampler: the random stream of the sampled labels (default: one seeded from the global seed).
    """

    def __init__(self, blocks: list[CurvatureBlock], root: nn.Module, *, fisher: Fisher, likelihood: Likelihood,
                 output_to_logits: Callable[[Any], torch.Tensor] | None,
                 on_statistic: Callable[[Any, bool], None], classes_dim: int | None = None,
                 sampler: LabelSampler | None = None) -> None:
        self.blocks = blocks
        self.root = root
        self.fisher = fisher
        self.likelihood = likelihood
        self.output_to_logits = output_to_logits
        self.on_statistic = on_statistic
        self.classes_dim = classes_dim
        self.sampler = sampler if sampler is not None else LabelSampler()
        self.grad_scaler: Any = None
        self.output_grad_dtypes: set[torch.dtype] = set()  # read by binding.check_grad_scaler at the first step
        self.due: dict[int, set[str]] = {}
        self.captured: dict[int, Captured] = {}
        self._mc_targets: list[tuple[CurvatureBlock, Any, Any, Any, _MicroBatch]] = []
        self._in_mc = False
        # id(logits) -> (logits, targets) of forwards whose training backward has not started yet. The MC
        # hook gets the key, not the tensor: a hook holding the tensor it is registered on is a reference
        # cycle through the autograd graph that Python's GC cannot see (every step's graph leaked).
        self._mc_pending: dict[int, tuple[torch.Tensor, list]] = {}
        # why output statistics went missing on the last collected step (see mc_missing_reason)
        self._mc_unreached: dict[str, list[str]] = {}
        self._mc_no_grad = False
        self._handles: list[Any] = []
        for block in blocks:
            for i, (module, use) in enumerate(block.uses()):
                self._claim(module)
                self._handles.append(module.register_forward_hook(partial(self._forward_hook, block, use, i == 0),
                                                                  with_kwargs=True))
        self._claim(root)
        self._handles.append(root.register_forward_hook(self._root_forward_hook))
        # blocks that record their inputs' sizes on every forward (conv: which gradient columns can be nonzero)
        self._noting = {id(use): use for block in blocks for _, use in block.uses() if hasattr(use, "note_input")}
        for use in self._noting.values():
            use.track_inputs(True)

    # ---- interface ------------------------------------------------------------------------------------------
    def begin(self, due: dict[int, set[str]]) -> None:
        """Arm the hooks: ``due`` maps ``id(block)`` to the statistics to capture (whether rows are kept for a
        low-rank factor is the block's plan, :meth:`~.blocks.CurvatureBlock.capture_rows`)."""
        self.discard()
        self.due = {k: v for k, v in due.items() if v}

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
        if self._mc_targets:
            self._mc_unreached.setdefault("root_not_called", []).extend(b.name for b, *_ in self._mc_targets)
        for _, targets in self._mc_pending.values():
            self._mc_unreached.setdefault("backward_never_reached", []).extend(b.name for b, *_ in targets)
        self.due, self._mc_targets, self._mc_pending = {}, [], {}
        return captured

    def discard(self) -> None:
        """Drop what was captured (e.g. the statistics of a step the AMP scaler skipped)."""
        self.captured = {}
        self._mc_targets, self._mc_pending, self._mc_unreached, self._mc_no_grad = [], {}, {}, False

    def mc_missing_reason(self, missing: list[str]) -> str:
        """Why the sampled-label backward gave no output statistic to the blocks named ``missing`` on the
        step just collected (``fisher="mc"``), and the fix; forgets the record."""
        unreached, no_grad = self._mc_unreached, self._mc_no_grad
        self._mc_unreached, self._mc_no_grad = {}, False
        root = type(self.root).__name__

        def hit(kind: str) -> bool:
            return any(name in missing for name in unreached.get(kind, ()))

        reasons = []
        if hit("backward_never_reached"):
            reasons.append(
                f"the training backward never reached the output of {root}'s forward nor the logits "
                "output_to_logits returned, where the hook that starts the sampled-label backward sits (the loss "
                "was computed from another tensor, e.g. a second forward or a copy made outside the forward); "
                "compute the loss from the forward's output, or call preconditioner.run_mc_backward(logits) "
                "before the backward. For logits [N, T, V] pass classes_dim=-1 instead of transposing them in "
                "output_to_logits")
        if hit("not_on_path"):
            reasons.append(
                "the sampled-label backward from the logits (the root's output, or what output_to_logits returns) "
                "does not reach these layers' outputs: they do not feed the logits (exclude them, or return the "
                "logits they feed through output_to_logits)")
        if no_grad:
            reasons.append(f"the logits of {root}'s forward do not require grad, so no sampled-label backward ran")
        if hit("root_not_called") or not reasons:
            reasons.append(
                f"the sampled-label backward starts from the output of the module K-FAC is bound to ({root}), "
                "whose forward was not called (e.g. training_step calls self.net(x)). Build K-FAC on the module "
                "that returns the logits (KFAC(self.net, ...)), or call preconditioner.run_mc_backward(logits) "
                "before the backward")
        return "with fisher='mc' " + "; and ".join(reasons)

    def remove(self) -> None:
        """Remove every hook (teardown); idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for use in self._noting.values():  # forwards from now on are not seen
            use.track_inputs(False)
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
        noting = self._noting.get(id(use))
        if noting is not None and inputs:
            noting.note_input(inputs[0])
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
        wanted = use.output_stat in due
        if self.fisher is Fisher.MC and wanted:
            self._mc_targets.append((block, use, torch.autograd.graph.get_gradient_edge(output), context, batch))
            wanted = False
        # The tensor hook also closes the micro-batch when the backward reaches this use.
        output.register_hook(partial(self._grad_hook, block, use, context, batch, wanted))

    def _output_statistic(self, block: CurvatureBlock, use: Any, grad: torch.Tensor, context: Any,
                          batch: _MicroBatch, scaled: bool) -> None:
        stat = block.output_part(use.output_statistic(grad.detach(), context), grad.detach())
        if batch.uses > 1:
            stat = fac.divided(stat, batch.uses)
        scale = grad_scale(self.grad_scaler) if scaled else None
        if scale is not None:
            stat = fac.unscaled(stat, scale)
        record = self.captured.get(id(block))
        if record is None:  # discarded meanwhile
            return
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
        if not logits.requires_grad:
            self._mc_no_grad = True
            return
        key = id(logits)
        self._mc_pending[key] = (logits, targets)
        # The first of these tensors the training backward reaches starts the sampled-label backward: the
        # logits may be a new tensor the loss never uses (output_to_logits=lambda o: o.transpose(1, 2)).
        triggers = {id(t): t for t in [logits, *tree_leaves(output)]
                    if isinstance(t, torch.Tensor) and t.requires_grad}
        for tensor in triggers.values():
            tensor.register_hook(partial(self._mc_hook, key))

    def _classes_dim(self) -> int:
        if self.classes_dim is not None:
            return self.classes_dim
        return getattr(self.root, CLASSES_DIM_ATTRIBUTE, 1)

    def _mc_hook(self, key: int, grad: torch.Tensor) -> None:
        """At the start of the training backward: the sampled-label backward to the layer outputs only."""
        pending = self._mc_pending.pop(key, None)
        if pending is not None and not self._in_mc and not capture_paused():
            self._mc_backward(*pending)

    def _mc_backward(self, logits: torch.Tensor, targets: list) -> None:
        self._in_mc = True
        try:
            with torch.enable_grad():
                loss = sampled_loss(logits, self.likelihood, self._classes_dim(), self.sampler.generator(logits.device))
                grads = torch.autograd.grad(loss, [edge for _, _, edge, _, _ in targets], retain_graph=True,
                                            allow_unused=True)
            for (block, use, _, context, batch), g in zip(targets, grads, strict=True):
                if g is not None:
                    self._output_statistic(block, use, g, context, batch, scaled=False)
                else:
                    self._mc_unreached.setdefault("not_on_path", []).append(block.name)
        finally:
            self._in_mc = False
