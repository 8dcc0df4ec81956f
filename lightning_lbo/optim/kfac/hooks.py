"""Capturing K-FAC statistics: forward hooks, output-gradient tensor hooks and the MC-Fisher backward.

Mixed into :class:`~lightning_lbo.optim.kfac.preconditioner.KFACPreconditioner`. Hooks record only
in training mode, with grad enabled, on refresh steps, and never inside
:func:`lightning_lbo.capture.curvature_capture_paused`. Per micro-batch, ``A`` sums are computed in
the forward hook and ``G``/``F`` sums in a tensor hook registered on the layer output during the
forward (so in-place ops after the layer do not change what is captured); each is handed to
``comm.reduce_factors`` at once. With ``fisher="mc"`` the forward records gradient edges of the layer
outputs instead, and a tensor hook on the root module's output (the logits) runs the sampled-label
backward to those edges when the training backward starts (:mod:`.fisher`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_lbo.capture import capture_paused
from lightning_lbo.optim.kfac.fisher import Fisher, sampled_loss
from lightning_lbo.optim.kfac.inverses import InverseMethod


class _BlockState:
    """Per-block bookkeeping: factors, inverse data, intervals and the statistics being captured."""

    def __init__(self, block, interval: int) -> None:
        self.block = block
        self.factors: dict[str, torch.Tensor] = {}
        self.inverse: dict[str, torch.Tensor] | None = None
        self.inverse_factors: dict[str, torch.Tensor] = {}  # the factors the inverse was computed from
        self.inverse_damping: float | None = None
        self.interval = {s: interval for s in block.stat_names}
        self.next_due = {s: 0 for s in block.stat_names}
        self.due: set[str] = set()
        self.pending: dict[str, list[torch.Tensor]] = {s: [] for s in block.stat_names}
        self.pending_n = 0
        self.refreshes = {s: 0 for s in block.stat_names}
        self.owner: int | None = None  # rank that computed the current inverse
        self.pending_rows: list[torch.Tensor] | None = []  # raw A rows for the Woodbury inverse
        self.rows: dict[str, torch.Tensor] = {}  # {"rows", "n"} of the current (fresh) A, if low rank


class CaptureHooks:
    """The capture half of the preconditioner (state lives on the preconditioner)."""

    def _plan_captures(self) -> None:
        """Decide which statistics the coming step captures (host-side ints only)."""
        for st in self.states:
            st.due = {s for s, due in st.next_due.items() if due <= self.steps}
        self._capturing = any(st.due for st in self.states)

    def _low_rank_possible(self, block, rows: torch.Tensor) -> bool:
        """Keep A's rows for the Woodbury inverse: fresh statistics, one process, fewer rows than d_A / 2."""
        return (self.low_rank_inverse and self.factor_decay == 1.0 and not self.comm.is_distributed
                and self.inverse_method is InverseMethod.CHOLESKY and block.groups == 1
                and 2 * rows.shape[1] <= block.dims[0])

    def discard_pending(self) -> None:
        """Drop statistics captured since the last step (e.g. after a step skipped by the AMP scaler)."""
        for st in self.states:
            for s in st.pending:
                st.pending[s] = []
            st.pending_n = 0
            st.pending_rows = []
        self._mc_targets = []
        self._cycle_open = False

    def _active(self, module: nn.Module) -> bool:
        return self._capturing and module.training and not capture_paused() and torch.is_grad_enabled()

    def _forward_hook(self, st: _BlockState, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not st.due or not self._active(module) or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if not self._cycle_open:
            self._check_communicator()
            self.discard_pending()
            self._cycle_open = True
        x = inputs[0].detach()
        block = st.block
        st.pending_n += x.shape[0]
        x_hat = None
        if block.kind == "unit":
            x_hat = block.normalized_input(x)
        elif "A" in st.due:
            rows = block.a_rows(x)
            a_sum = block.gram(rows)
            if st.pending_rows is not None and self._low_rank_possible(block, rows):
                st.pending_rows.append(rows.detach())
            else:
                st.pending_rows = None
            st.pending["A"].append(a_sum)
            self.comm.reduce_factors([a_sum], symmetric=True)
        grad_stat = "F" if block.kind == "unit" else "G"
        if grad_stat not in st.due:
            return
        if self.fisher is Fisher.EMPIRICAL:
            output.register_hook(partial(self._grad_hook, st, x_hat))
        else:
            self._mc_targets.append((st, torch.autograd.graph.get_gradient_edge(output), x_hat))

    def _grad_stat(self, st: _BlockState, grad: torch.Tensor, x_hat: torch.Tensor | None, amp: bool) -> None:
        grad = grad.detach()
        block = st.block
        if block.kind == "unit":
            stat, name = block.f_sum(grad, x_hat), "F"
        else:
            stat, name = block.g_sum(grad), "G"
        if amp and self.grad_scaler is not None and getattr(self.grad_scaler, "is_enabled", lambda: True)():
            scale = getattr(self.grad_scaler, "_scale", None)
            if scale is not None:
                stat = stat / scale.to(stat.device).float().pow(2)
        st.pending[name].append(stat)
        self.comm.reduce_factors([stat], symmetric=True)

    def _grad_hook(self, st: _BlockState, x_hat: torch.Tensor | None, grad: torch.Tensor) -> None:
        if capture_paused() or self._in_mc:
            return
        self._grad_stat(st, grad, x_hat, amp=True)

    def _root_forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.fisher is not Fisher.MC or not self._mc_targets:
            return
        targets, self._mc_targets = self._mc_targets, []
        if not self._active(module):
            return
        logits = self.output_to_logits(output) if self.output_to_logits is not None else output
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"fisher='mc' needs the module's forward to return the logits tensor, got "
                            f"{type(logits).__name__}; pass output_to_logits=... to extract them.")
        if logits.requires_grad:
            logits.register_hook(partial(self._mc_hook, logits, targets))

    def _mc_hook(self, logits: torch.Tensor, targets: list, grad: torch.Tensor) -> None:
        """At the start of the training backward: the sampled-label backward to the layer outputs only."""
        if self._in_mc or capture_paused():
            return
        self._in_mc = True
        try:
            with torch.enable_grad():
                loss = sampled_loss(logits, self.likelihood)
                grads = torch.autograd.grad(loss, [edge for _, edge, _ in targets], retain_graph=True,
                                            allow_unused=True)
            for (st, _, x_hat), g in zip(targets, grads, strict=True):
                if g is not None:
                    self._grad_stat(st, g, x_hat, amp=False)
        finally:
            self._in_mc = False

    def run_mc_backward(self, logits: torch.Tensor) -> None:
        """Run the sampled-label backward for the current forward now (if the model's output is not the logits).

        Call it before the training backward, with the logits computed by the current forward.
        """
        targets, self._mc_targets = self._mc_targets, []
        if targets:
            self._mc_hook(logits, targets, None)
