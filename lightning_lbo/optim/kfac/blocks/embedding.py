"""``nn.Embedding`` blocks: a diagonal ``A`` (token counts) and a dense ``G``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.blocks.base import _work
from lightning_lbo.optim.kfac.blocks.kronecker import KroneckerBlock

__all__ = ["EmbeddingBlock"]


class EmbeddingBlock(KroneckerBlock):
    """``nn.Embedding``: ``A`` is diagonal (token counts), ``G`` from the output gradients.

    With one-hot inputs ``a``, ``A = (1/N) sum_i sum_t e_{x_it} e_{x_it}^T = diag(counts) / N`` (the
    expand convention over the ``T`` positions), stored as its diagonal ``[1, V]``. The weight is
    ``[V, D]``, so the gradient matrix is its transpose ``[1, D, V]`` and ``G`` is ``[1, D, D]``.
    Tokens that never occur have ``A_vv = 0``: their rows get the damped update ``grad / damping``-like
    scale of the chosen inverse, as for any direction without curvature. ``padding_idx`` rows have a
    zero gradient and stay zero. Inverse: exact damping in the eigenbasis of ``G``
    (:class:`~lightning_lbo.optim.kfac.inverses.DiagonalKronecker`) whatever ``inverse_method``.
    """

    def __init__(self, module: nn.Embedding, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        self.check(module, name)
        super().__init__(module, name, factor_dtype)

    @staticmethod
    def check(module: nn.Embedding, name: str) -> None:
        """Reject the embeddings K-FAC cannot precondition, naming the fix."""
        if module.sparse:
            raise ValueError(f"K-FAC needs dense gradients: {name} is nn.Embedding(sparse=True); use sparse=False "
                             "or exclude it (exclude=[nn.Embedding]).")
        if module.max_norm is not None:
            raise ValueError(f"K-FAC cannot precondition {name}: nn.Embedding(max_norm=...) renormalises the weight "
                             "in the forward; exclude it (exclude=[nn.Embedding]).")

    @property
    def dims(self) -> tuple[int, int]:
        return self.module.num_embeddings, self.module.embedding_dim

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        v, d = self.dims
        return {"A": (1, v), "G": (1, d, d)}

    def cost(self) -> float:
        return float(self.dims[1] ** 3)

    @property
    def low_rank_capable(self) -> bool:
        return False

    def symmetric(self, stat: str) -> bool:
        return stat != "A"

    def identity_factor(self, stat: str) -> torch.Tensor:
        if stat == "A":
            return torch.ones(self.factor_shapes()["A"], dtype=self.factor_dtype, device=self.weight.device)
        return super().identity_factor(stat)

    def inverse_type(self, method: inv.InverseMethod) -> type[inv.BlockInverse]:
        return inv.DiagonalKronecker

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        if "A" not in due:
            return {}, None
        counts = torch.bincount(x.reshape(-1), minlength=self.module.num_embeddings)
        return {"A": counts.to(self.factor_dtype).unsqueeze(0)}, None

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        positions = grad[0].numel() // grad.shape[-1]
        return self._g_gram(grad.reshape(1, -1, grad.shape[-1]), positions)

    def grad_matrix(self) -> torch.Tensor:
        return _work(self.weight.grad).t().unsqueeze(0)

    def param_matrix(self) -> torch.Tensor:
        return _work(self.weight).t().unsqueeze(0)

    def set_grad(self, matrix: torch.Tensor) -> None:
        self.weight.grad.copy_(matrix[0].t())

