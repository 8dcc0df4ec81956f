"""``nn.Linear`` blocks (any input rank; the "expand" and "reduce" conventions of Eschenhagen et al. 2023)."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from lightning_lbo.optim.kfac.blocks.kronecker import KroneckerBlock

__all__ = ["LinearBlock", "LinearVariant", "EXPAND", "REDUCE"]


class LinearVariant(str, Enum):
    """How an ``nn.Linear`` with inputs ``[N, T, in]`` treats its ``T`` positions (strings are accepted too)."""

    EXPAND = "expand"  # positions act like conv locations (sum in A, mean in G)
    REDUCE = "reduce"  # average the input / sum the gradient over positions before the outer product

    @classmethod
    def parse(cls, value: str | LinearVariant) -> LinearVariant:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"Invalid linear_variant: {value!r}. Supported: "
                             f"{tuple(v.value for v in cls)}.") from None


EXPAND, REDUCE = LinearVariant.EXPAND, LinearVariant.REDUCE


class LinearBlock(KroneckerBlock):
    """``nn.Linear`` with inputs ``[N, ..., in]``; leading dims after N are weight-sharing positions.

    Args:
        module: the layer.
        name: its qualified name (for messages and checkpoints).
        factor_dtype: dtype of the factors.
        linear_variant: ``"expand"`` (positions act like conv locations) or ``"reduce"`` (average the
            input / sum the gradient over positions before the outer product).
    """

    def __init__(self, module: nn.Linear, name: str, factor_dtype: torch.dtype = torch.float32,
                 linear_variant: str | LinearVariant = EXPAND) -> None:
        super().__init__(module, name, factor_dtype)
        self.variant = LinearVariant.parse(linear_variant)

    @property
    def dims(self) -> tuple[int, int]:
        return self.module.in_features + (self.bias is not None), self.module.out_features

    def _rows(self, t: torch.Tensor, reduce: str) -> torch.Tensor:
        n = t.shape[0]
        if t.dim() > 2 and self.variant == REDUCE:
            t = t.reshape(n, -1, t.shape[-1])
            t = t.mean(1) if reduce == "mean" else t.sum(1)
        return t.reshape(1, -1, t.shape[-1])

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x, "mean")

    def output_rows(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        positions = 1 if self.variant == REDUCE else grad[0].numel() // grad.shape[-1]
        return self._rows(grad, "sum"), positions

    def output_row_count(self, grad: torch.Tensor) -> int:
        return grad.shape[0] if self.variant == REDUCE and grad.dim() > 2 else super().output_row_count(grad)

