"""Unit-wise blocks of BatchNorm and LayerNorm (SP-NGD, Osawa et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.blocks.base import CurvatureBlock, _work

__all__ = ["UnitWiseBlock"]


class UnitWiseBlock(CurvatureBlock):
    """BatchNorm1d/2d/3d or LayerNorm: unit-wise natural gradient over (gamma_u, beta_u) (SP-NGD).

    Ghost batch norm layers (subclasses of ``nn.BatchNorm*d``) get this block too; their ``x_hat`` comes
    from the layer (:meth:`input_statistics`).

    Per example, ``g_gamma = sum_pos g * x_hat`` and ``g_beta = sum_pos g`` for each unit (channel for
    BatchNorm, element of ``normalized_shape`` for LayerNorm); ``F_u = E_i[v_i v_i^T]`` with
    ``v_i = N * (g_gamma, g_beta)_{i,u}`` is ``2 x 2`` (``1 x 1`` without bias).
    """

    stat_names = ("F",)
    input_stats = ()
    output_stat = "F"

    def __init__(self, module: nn.Module, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(module, name, factor_dtype)
        self.units = module.weight.numel()

    @property
    def k(self) -> int:
        return 1 + (self.bias is not None)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"F": (self.units, self.k, self.k)}

    def cost(self) -> float:
        return float(self.units * self.k ** 3)

    def inverse_type(self, method: inv.InverseMethod) -> type[inv.BlockInverse]:
        return inv.UnitWise

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        """No input statistic; the context is ``x_hat`` as the layer computes it in training mode (batch
        statistics), by the layer's own kernel without its affine map (one pass, no ``var`` over strided dims).

        A layer that defines ``normalized_input(x)`` (ghost batch norm,
        :class:`~lightning_lbo.batchnorm.GhostBatchNorm1d`: statistics per virtual batch) is asked for its
        ``x_hat``: the per-example gamma gradient ``sum g * x_hat`` must use the statistics its forward used,
        and whole-batch statistics would be other ones. The capture hooks run in training mode only.
        """
        m = self.module
        x = x.to(self.factor_dtype)
        normalized_input = getattr(m, "normalized_input", None)
        if callable(normalized_input):
            return {}, normalized_input(x)
        if isinstance(m, nn.LayerNorm):
            return {}, F.layer_norm(x, m.normalized_shape, eps=m.eps)
        return {}, F.batch_norm(x, None, None, training=True, momentum=0.0, eps=m.eps)

    def per_example_grads(self, grad: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``[N, units, k]``: per-example (gamma, beta) gradients of the unscaled output gradient."""
        grad = grad.to(x_hat.dtype)
        n = grad.shape[0]
        if isinstance(self.module, nn.LayerNorm):
            prod = (grad * x_hat).reshape(n, -1, self.units).sum(1)
            beta = grad.reshape(n, -1, self.units).sum(1)
        else:
            prod = (grad * x_hat).reshape(n, self.units, -1).sum(2)
            beta = grad.reshape(n, self.units, -1).sum(2)
        return torch.stack([prod, beta], dim=2) if self.bias is not None else prod.unsqueeze(2)

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        v = self.per_example_grads(grad, context)
        return torch.einsum("nuk,nul->ukl", v, v)

    def _as_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cols = [_work(weight.reshape(-1))] + ([_work(bias.reshape(-1))] if bias is not None else [])
        return torch.stack(cols, dim=1)

    def grad_matrix(self) -> torch.Tensor:
        """``[units, k]`` gradient (fp32, fp64 for fp64 parameters)."""
        return self._as_matrix(self.weight.grad, self.bias.grad if self.bias is not None else None)

    def param_matrix(self) -> torch.Tensor:
        return self._as_matrix(self.weight, self.bias)

    def set_grad(self, matrix: torch.Tensor) -> None:
        self.weight.grad.copy_(matrix[:, 0].reshape(self.weight.shape))
        if self.bias is not None:
            self.bias.grad.copy_(matrix[:, 1].reshape(self.bias.shape))

