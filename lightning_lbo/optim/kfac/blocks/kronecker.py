"""Kronecker-factored blocks: a weight (and optional bias) with ``F ~ A (x) G`` (K-FAC, Martens & Grosse 2015)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.blocks.base import CurvatureBlock, _gram, _gram_with_ones, _work

__all__ = ["KroneckerBlock"]


class KroneckerBlock(CurvatureBlock):
    """A weight (and optional bias) with ``F ~ A (x) G``; gradient layout ``[groups, d_g, d_a]``."""

    stat_names = ("A", "G")
    input_stats = ("A",)
    output_stat = "G"
    groups = 1

    @property
    def dims(self) -> tuple[int, int]:
        """``(d_a, d_g)`` of one group."""
        raise NotImplementedError

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        d_a, d_g = self.dims
        return {"A": (self.groups, d_a, d_a), "G": (self.groups, d_g, d_g)}

    def cost(self) -> float:
        d_a, d_g = self.dims
        return float(self.groups * (d_a ** 3 + d_g ** 3))

    def inverse_type(self, method: inv.InverseMethod) -> type[inv.BlockInverse]:
        return inv.EigenKronecker if method is inv.InverseMethod.EIGEN else inv.CholeskyKronecker

    @property
    def low_rank_capable(self) -> bool:
        return self.groups == 1

    def _as_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        g = self.groups
        w = _work(weight.reshape(g, weight.shape[0] // g, -1))
        if bias is None:
            return w
        return torch.cat([w, _work(bias.reshape(g, -1, 1))], dim=2)

    def grad_matrix(self) -> torch.Tensor:
        return self._as_matrix(self.weight.grad, self.bias.grad if self.bias is not None else None)

    def param_matrix(self) -> torch.Tensor:
        return self._as_matrix(self.weight, self.bias)

    def set_grad(self, matrix: torch.Tensor) -> None:
        w = matrix[:, :, :-1] if self.bias is not None else matrix
        self.weight.grad.copy_(w.reshape(self.weight.shape))
        if self.bias is not None:
            self.bias.grad.copy_(matrix[:, :, -1].reshape(self.bias.shape))

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``[groups, N * T, d_a - bias]`` of the layer input (no ones column)."""
        raise NotImplementedError

    def with_ones(self, rows: torch.Tensor) -> torch.Tensor:
        """``abar`` rows in the factor dtype: ``rows`` with the bias column of ones appended."""
        rows = rows.to(self.factor_dtype)
        if self.bias is None:
            return rows
        return torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        if "A" not in due:
            return {}, None
        rows = self.a_rows(x)
        return {"A": self._a_statistic(rows)}, rows

    def _a_statistic(self, rows: torch.Tensor) -> torch.Tensor | fac.LowRankFactor:
        """``A``'s sum over examples from its rows: a low-rank part (rows kept, the Gram deferred if planned)
        when this capture keeps rows and there are at most ``d_a / 2`` of them, else the Gram."""
        gram = _gram_with_ones if self.bias is not None else _gram
        if not (self._keep_rows and 2 * rows.shape[1] <= self.dims[0]):
            return gram(rows, self.factor_dtype)
        if self._defer_gram:
            return fac.LowRankFactor.part(self.with_ones(rows), raw=rows, gram=gram, dtype=self.factor_dtype)
        return fac.LowRankFactor.part(self.with_ones(rows), value=gram(rows, self.factor_dtype))

    def output_rows(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows ``[groups, N * T, d_g]`` of the unscaled output gradient and the ``T`` positions averaged over."""
        raise NotImplementedError

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        return self._g_gram(*self.output_rows(grad))

    def output_row_count(self, grad: torch.Tensor) -> int:
        """The number of rows :meth:`output_rows` gives for ``grad`` (without building them)."""
        return grad.numel() // (self.groups * self.dims[1])

    def low_rank_output_rows(self, grad: torch.Tensor) -> torch.Tensor | None:
        """``W`` in the factor dtype with ``W^T W = output_statistic(grad)`` (rows of a low-rank ``G``), or
        ``None`` without building them when there are at least ``d_g / 2`` (a low-rank form would not pay)."""
        if 2 * self.output_row_count(grad) > self.dims[1]:
            return None
        rows, positions = self.output_rows(grad)
        rows = rows.to(self.factor_dtype)
        return rows / positions ** 0.5 if positions > 1 else rows

    def _g_gram(self, rows: torch.Tensor, positions: int) -> torch.Tensor:
        gram = _gram(rows, self.factor_dtype)
        return gram / positions if positions > 1 else gram


    def output_part(self, stat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | fac.LowRankFactor:
        if not self._keep_rows:
            return stat
        rows = self.low_rank_output_rows(grad)
        return stat if rows is None else fac.LowRankFactor.part(rows, value=stat)
