r"""Tied input/output embeddings: one curvature block for a weight shared by ``nn.Embedding`` and an ``nn.Linear`` head.

Language models often use the token embedding ``W: [V, d]`` as the output layer too
(``head.weight = embedding.weight``, logits ``y = h W^T + b``). Both uses add to ``W``'s gradient,
and in the layout ``[V, d]`` (row-major ``vec``) each use's K-FAC Fisher block is a Kronecker
product of a ``V x V`` and a ``d x d`` factor, with the roles of the axes swapped between the two:

.. math::

    F_{\mathrm{emb}} \approx U_e \otimes W_e = \operatorname{diag}(a) \otimes G_e, \qquad
    F_{\mathrm{head}} \approx U_h \otimes W_h = \operatorname{diag}(g_h) \otimes A_h,

where, with the scaling convention of :mod:`.blocks` (``N`` examples, ``T`` positions, per-example
output gradients ``N dL/dy``, positional sums in the input statistic and means in the output one),

* ``a = counts / N`` (tokens seen; the embedding's diagonal ``A``) and ``G_e`` the embedding's
  ``d x d`` output-gradient statistic, as in :class:`~lightning_lbo.optim.kfac.blocks.EmbeddingBlock`;
* ``A_h = (1/N) sum_i sum_t [h, 1][h, 1]^T`` the head's input statistic (``d' = d + 1`` with the
  head's bias, which this block preconditions too: its gradient is the last column of ``[W | b]``);
* ``g_h = (1/N) sum_i (1/T) sum_t (N dL/dy_{it})^2``: the **diagonal** of the head's ``V x V``
  logit-gradient statistic. The dense ``V x V`` factor (``V^2`` numbers, ``V^3`` to invert: 50k
  tokens make 10 GB) is never formed; the V axis is diagonal on both sides.

``G_e`` is padded with a zero row and column to ``d'`` (the embedding has no bias). The sum of two
Kronecker products is not one, so the block uses the **trace-weighted Kronecker sum**: with
``tau_U(k) = tr(U_k) / V``, ``tau_W(k) = tr(W_k) / d'`` and ``m_k = tau_U(k) tau_W(k)``,

.. math::

    F \approx U \otimes W, \qquad
    U = \frac{\tau_W(e)\, U_e + \tau_W(h)\, U_h}{m_e + m_h}, \qquad
    W = \tau_U(e)\, W_e + \tau_U(h)\, W_h .

It is exact whenever the two uses share one factor up to scale (``U_h = c U_e`` or
``W_h = c W_e``), it preserves the trace (``tr U tr W = tr F_emb + tr F_head``), and it is invariant
to moving a scale between the factors of one use (``U_k -> c U_k, W_k -> W_k / c``), which the plain
sum ``(U_e + U_h) (x) (W_e + W_h)`` is not. ``U`` is diagonal, so the damped inverse is
:class:`~lightning_lbo.optim.kfac.inverses.DiagonalKronecker`'s exact damping,
``P = Q_W [(Q_W^T grad) / (d_W u^T + lambda)]`` on the gradient matrix ``[W | b]^T: [d', V]``.

The block stores the four statistics as its factors (``A``, ``G``, ``A_head``, ``G_head``; each
refreshed, averaged, reduced across ranks and checkpointed like any other) and combines them when
inverting (:func:`tied_factors`). The head's statistics use the "expand" convention whatever
``linear_variant`` says. Other sharing patterns (two ``nn.Linear`` layers, an embedding shared by
two heads, a third user of the weight) keep the plain update with a warning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.blocks.base import CurvatureBlock, _work
from lightning_lbo.optim.kfac.blocks.embedding import EmbeddingBlock
from lightning_lbo.optim.kfac.blocks.kronecker import KroneckerBlock
from lightning_lbo.optim.kfac.blocks.linear import EXPAND, LinearBlock

__all__ = ["TiedEmbeddingBlock", "TiedDiagonalKronecker", "tied_factors"]


def tied_factors(factors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trace-weighted Kronecker sum of the two uses: ``{"A": u [1, V], "G": W [1, d', d']}`` in ``dtype``.

    ``factors``: ``A [1, V]`` (token counts / N), ``G [1, d, d]`` (embedding), ``A_head [1, d', d']``,
    ``G_head [1, V]`` (diagonal of the head's logit statistic). See the module docstring.
    """
    a, g_e = factors["A"].to(dtype), factors["G"].to(dtype)
    a_h, g_h = factors["A_head"].to(dtype), factors["G_head"].to(dtype)
    v, d, d_out = a.shape[-1], g_e.shape[-1], a_h.shape[-1]
    w_e = g_e.new_zeros(a_h.shape)
    w_e[:, :d, :d] = g_e
    tau_u_e, tau_u_h = a.sum(-1) / v, g_h.sum(-1) / v  # [1]
    tau_w_e = w_e.diagonal(dim1=1, dim2=2).sum(-1) / d_out
    tau_w_h = a_h.diagonal(dim1=1, dim2=2).sum(-1) / d_out
    mass = (tau_u_e * tau_w_e + tau_u_h * tau_w_h).clamp_min(torch.finfo(dtype).tiny)  # 0/tiny = 0: no curvature
    u = (tau_w_e.unsqueeze(-1) * a + tau_w_h.unsqueeze(-1) * g_h) / mass.unsqueeze(-1)
    w = tau_u_e.view(-1, 1, 1) * w_e + tau_u_h.view(-1, 1, 1) * a_h
    return {"A": u, "G": w}


class TiedDiagonalKronecker(inv.DiagonalKronecker):
    """:class:`~lightning_lbo.optim.kfac.inverses.DiagonalKronecker` of the combined tied factors."""

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False):
        return super().from_factors(tied_factors(factors, dtype), damping, dtype, out_dtype, psd_projection)

    @classmethod
    def identity(cls, factors, out_dtype):
        return super().identity({"A": factors["A"], "G": factors["A_head"]}, out_dtype)


class _Use:
    """The calls of one of the tied block's two modules. The module's own block (``own``) computes the
    statistics, in the tied block's factor dtype (the preconditioner may raise it to fp64 after construction)."""

    def __init__(self, block: TiedEmbeddingBlock, own: KroneckerBlock) -> None:
        self.block = block
        self.own = own

    def hook_io(self, inputs: tuple, kwargs: dict[str, Any], output: Any) -> tuple[Any, int, Any]:
        return self.own.hook_io(inputs, kwargs, output)

    def _own(self) -> KroneckerBlock:
        self.own.promote_factor_dtype(self.block.factor_dtype)
        return self.own


class _EmbeddingUse(_Use):
    """The embedding's calls: ``A`` = token counts, ``G`` = its output-gradient statistic (``d x d``), as
    :class:`~lightning_lbo.optim.kfac.blocks.EmbeddingBlock` computes them."""

    input_stats = ("A",)
    output_stat = "G"

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        return self._own().input_statistics(x, due)

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        return self._own().output_statistic(grad, context)

    def symmetric(self, stat: str) -> bool:
        return stat == "G"


class _HeadUse(_Use):
    """The head's calls: ``A_head`` = its input statistic (bias folded in; the "expand" ``A`` of its
    :class:`~lightning_lbo.optim.kfac.blocks.LinearBlock`), ``G_head`` = the diagonal of its logit statistic."""

    input_stats = ("A_head",)
    output_stat = "G_head"

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        if "A_head" not in due:
            return {}, None
        stats, _ = self._own().input_statistics(x, {"A"})
        return {"A_head": stats["A"]}, None

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        rows, positions = self._own().output_rows(grad)  # [1, N * T, V]
        return rows.to(self.block.factor_dtype).square().sum(1) / positions

    def symmetric(self, stat: str) -> bool:
        return stat == "A_head"


class TiedEmbeddingBlock(CurvatureBlock):
    """The weight ``[V, d]`` shared by ``embedding`` and ``head`` (and the head's bias); see the module docstring.

    Args:
        embedding: the ``nn.Embedding`` (dense gradients, no ``max_norm``).
        head: the ``nn.Linear`` with ``head.weight is embedding.weight``.
        name: qualified names of both, ``"embedding+head"``.
        factor_dtype: dtype of the statistics.
    """

    stat_names = ("A", "G", "A_head", "G_head")
    input_stats = ("A", "A_head")
    output_stat = "G"

    def __init__(self, embedding: nn.Embedding, head: nn.Linear, name: str,
                 factor_dtype: torch.dtype = torch.float32) -> None:
        own_embedding = EmbeddingBlock(embedding, name, factor_dtype)  # checks the embedding
        if head.weight is not embedding.weight:
            raise ValueError(f"{name}: the head's weight is not the embedding's; TiedEmbeddingBlock is for "
                             "head.weight = embedding.weight.")
        super().__init__(embedding, name, factor_dtype)
        self.head = head
        self.bias = head.bias
        own_head = LinearBlock(head, name, factor_dtype, linear_variant=EXPAND)
        self._uses = [(embedding, _EmbeddingUse(self, own_embedding)), (head, _HeadUse(self, own_head))]

    @classmethod
    def from_blocks(cls, first: CurvatureBlock, second: CurvatureBlock) -> TiedEmbeddingBlock | None:
        """The tied block of an embedding block and a head block sharing its weight (either order), else ``None``."""
        embedding, head = (first, second) if isinstance(first, EmbeddingBlock) else (second, first)
        if not (isinstance(embedding, EmbeddingBlock) and isinstance(head, LinearBlock)
                and head.weight is embedding.weight):
            return None
        return cls(embedding.module, head.module, f"{embedding.name}+{head.name}", embedding.factor_dtype)

    def uses(self) -> list[tuple[nn.Module, Any]]:
        return self._uses

    @property
    def dims(self) -> tuple[int, int]:
        """``(V, d')``: vocabulary and width (+1 with the head's bias)."""
        v, d = self.weight.shape
        return v, d + (self.bias is not None)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        v, d_out = self.dims
        d = self.weight.shape[1]
        return {"A": (1, v), "G": (1, d, d), "A_head": (1, d_out, d_out), "G_head": (1, v)}

    def cost(self) -> float:
        return float(self.dims[1] ** 3)

    def symmetric(self, stat: str) -> bool:
        return stat in ("G", "A_head")

    def identity_factor(self, stat: str) -> torch.Tensor:
        if stat in ("A", "G_head"):
            return torch.ones(self.factor_shapes()[stat], dtype=self.factor_dtype, device=self.weight.device)
        return super().identity_factor(stat)

    def inverse_type(self, method: inv.InverseMethod) -> type[inv.BlockInverse]:
        return TiedDiagonalKronecker

    def _as_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``[W | b]^T`` as ``[1, d', V]`` (the V axis last, like an embedding's ``A`` side)."""
        w = _work(weight).t()
        if bias is not None:
            w = torch.cat([w, _work(bias).unsqueeze(0)], dim=0)
        return w.unsqueeze(0)

    def grad_matrix(self) -> torch.Tensor:
        return self._as_matrix(self.weight.grad, self.bias.grad if self.bias is not None else None)

    def param_matrix(self) -> torch.Tensor:
        return self._as_matrix(self.weight, self.bias)

    def set_grad(self, matrix: torch.Tensor) -> None:
        d = self.weight.shape[1]
        self.weight.grad.copy_(matrix[0, :d].t())
        if self.bias is not None:
            self.bias.grad.copy_(matrix[0, d])

