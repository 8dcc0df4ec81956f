"""Curvature blocks: how each supported layer turns activations and output gradients into statistics.

Scaling convention (one for every block, every batch size and every world size)
-------------------------------------------------------------------------------
The training loss is the **mean over the batch** (leading dimension) of per-example losses, so an
output gradient ``dL/dy_i`` is ``1/N`` times the per-example gradient. Statistics are built from
per-example quantities, ``g_i = N * dL/dy_i``, so that the Fisher block ``F ~ A (x) G`` estimates
``E_i[grad_i grad_i^T]`` of a *single example* and damping means the same at every batch size:

.. math::

    A = \\frac{1}{N}\\sum_i \\sum_{t=1}^{T} \\bar a_{i,t} \\bar a_{i,t}^T, \\qquad
    G = \\frac{1}{N}\\sum_i \\frac{1}{T}\\sum_{t=1}^{T} g_{i,t} g_{i,t}^T,

where ``t`` runs over the ``T`` positions sharing the weight (conv output locations, or sequence
positions of an N-D Linear in the "expand" variant) and ``\\bar a = [a, 1]`` folds the bias in.
This is the KFC convention of Grosse & Martens (2016): the spatial sum sits in ``A``, the spatial
mean in ``G``; for a plain Linear layer ``T = 1``. The "reduce" variant for N-D Linear inputs uses
``a_i = mean_t a_{i,t}`` and ``g_i = sum_t g_{i,t}`` (Eschenhagen et al. 2023).

Blocks only compute **sums over examples** (``stat_sum``); the preconditioner divides by the number
of examples of the whole (possibly accumulated) batch and applies the per-example factor ``N``.

Tensor layouts: Kronecker factors are batched over groups, ``A: [groups, d_a, d_a]``,
``G: [groups, d_g, d_g]``; a layer's gradient as a matrix is ``[groups, d_g, d_a]``. Unit-wise
blocks (BatchNorm, LayerNorm; SP-NGD, Osawa et al. 2020) hold one ``k x k`` Fisher per unit,
``F: [units, k, k]`` with ``k = 2`` for (gamma, beta), 1 without a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPAND, REDUCE = "expand", "reduce"


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` batched: ``[groups, rows, d] -> [groups, d, d]`` in fp32."""
    x = x.float()
    return torch.bmm(x.transpose(1, 2), x)


def _gram_with_ones(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]^T [x, 1]`` without materialising the ones column: ``[g, rows, d] -> [g, d+1, d+1]``."""
    x = x.float()
    g, rows, d = x.shape
    out = x.new_empty(g, d + 1, d + 1)
    out[:, :d, :d] = torch.bmm(x.transpose(1, 2), x)
    col = x.sum(1)
    out[:, :d, d] = col
    out[:, d, :d] = col
    out[:, d, d] = rows
    return out


class KroneckerBlock:
    """Base of the Kronecker-factored blocks: a weight (and optional bias) with factors ``A`` and ``G``."""

    kind = "kronecker"
    stat_names = ("A", "G")

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.weight = module.weight
        self.bias = module.bias if getattr(module, "bias", None) is not None else None
        self.groups = 1

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def dims(self) -> tuple[int, int]:
        """``(d_a, d_g)`` of one group."""
        raise NotImplementedError

    def cost(self) -> float:
        d_a, d_g = self.dims
        return float(self.groups * (d_a ** 3 + d_g ** 3))

    def grad_matrix(self) -> torch.Tensor:
        """The gradient as ``[groups, d_g, d_a]`` (fp32; bias as the last column)."""
        g = self.groups
        w = self.weight.grad.reshape(g, self.weight.shape[0] // g, -1).float()
        if self.bias is None:
            return w
        return torch.cat([w, self.bias.grad.reshape(g, -1, 1).float()], dim=2)

    def set_grad(self, matrix: torch.Tensor) -> None:
        """Write a ``[groups, d_g, d_a]`` matrix back into ``.grad`` (in place, in the grad's dtype)."""
        w = matrix[:, :, :-1] if self.bias is not None else matrix
        self.weight.grad.copy_(w.reshape(self.weight.shape))
        if self.bias is not None:
            self.bias.grad.copy_(matrix[:, :, -1].reshape(self.bias.shape))

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``[groups, N * T, d_a - bias]`` of the layer input (no ones column)."""
        raise NotImplementedError

    def gram(self, rows: torch.Tensor) -> torch.Tensor:
        """``sum abar abar^T`` of rows from :meth:`a_rows` (ones column folded in for the bias)."""
        return _gram_with_ones(rows) if self.bias is not None else _gram(rows)

    def with_ones(self, rows: torch.Tensor) -> torch.Tensor:
        """``abar`` rows in fp32: ``rows`` with the bias column of ones appended."""
        rows = rows.float()
        if self.bias is None:
            return rows
        return torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)

    def a_sum(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``sum_i sum_t abar abar^T`` of the layer input ``x`` and the number of examples."""
        return self.gram(self.a_rows(x)), x.shape[0]

    def g_sum(self, grad: torch.Tensor) -> torch.Tensor:
        """``sum_i (1/T) sum_t g g^T`` of the output gradient (unscaled: the caller scales)."""
        raise NotImplementedError


class LinearBlock(KroneckerBlock):
    """``nn.Linear`` with inputs ``[N, ..., in]``; leading dims after N are weight-sharing positions.

    Args:
        module: the layer.
        name: its qualified name (for messages and checkpoints).
        variant: ``"expand"`` (positions act like conv locations) or ``"reduce"`` (average the
            input / sum the gradient over positions before the outer product).
    """

    def __init__(self, module: nn.Linear, name: str, variant: str = EXPAND) -> None:
        super().__init__(module, name)
        if variant not in (EXPAND, REDUCE):
            raise ValueError(f"Invalid linear_variant: {variant!r}. Supported: {(EXPAND, REDUCE)}.")
        self.variant = variant

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
        """Input rows ``[groups, rows, d_a - bias]`` whose Gram matrix (with a ones column) is ``a_sum``."""
        return self._rows(x, "mean")

    def g_sum(self, grad: torch.Tensor) -> torch.Tensor:
        positions = 1 if self.variant == REDUCE else grad[0].numel() // grad.shape[-1]
        gram = _gram(self._rows(grad, "sum"))
        return gram / positions if positions > 1 else gram


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` with any stride, padding (int, tuple, ``"same"``, any padding mode), dilation, groups.

    ``A`` is built from im2col patches (``F.unfold``), one row per output location.
    """

    def __init__(self, module: nn.Conv2d, name: str) -> None:
        super().__init__(module, name)
        self.groups = module.groups

    @property
    def dims(self) -> tuple[int, int]:
        m = self.module
        d_a = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + (self.bias is not None)
        return d_a, m.out_channels // m.groups

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """im2col patches ``[groups, N * L, C_in/groups * kh * kw]`` (L = output locations).

        Built from ``kh * kw`` strided slices of the padded, channels-last input and one stack
        (``F.unfold`` is an order of magnitude slower on CPU); columns are ordered ``(c, i, j)``
        like ``weight.view(C_out, -1)``.
        """
        m = self.module
        kh, kw = m.kernel_size
        dh, dw = m.dilation
        sh, sw = m.stride
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        elif m.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        elif m.padding != "valid" and any(m.padding):
            ph, pw = m.padding
            x = F.pad(x, (pw, pw, ph, ph))
        n, c, H, W = x.shape
        oh = (H - dh * (kh - 1) - 1) // sh + 1
        ow = (W - dw * (kw - 1) - 1) // sw + 1
        xc = x.permute(0, 2, 3, 1)  # [N, H, W, C] view
        cols = [xc[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                for i in range(kh) for j in range(kw)]
        cols = torch.stack(cols, dim=-1) if len(cols) > 1 else cols[0].unsqueeze(-1)  # [N, oh, ow, C, kh*kw]
        g = self.groups
        if g == 1:
            return cols.reshape(1, n * oh * ow, c * kh * kw)
        cols = cols.reshape(n * oh * ow, g, c // g * kh * kw).transpose(0, 1)
        return cols.contiguous()

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.patches(x)

    def g_sum(self, grad: torch.Tensor) -> torch.Tensor:
        n, c = grad.shape[:2]
        locations = grad[0, 0].numel()
        rows = grad.reshape(n, self.groups, c // self.groups, locations).permute(1, 0, 3, 2)
        return _gram(rows.reshape(self.groups, n * locations, c // self.groups)) / locations


class UnitWiseBlock:
    """BatchNorm1d/2d or LayerNorm: unit-wise natural gradient over (gamma_u, beta_u) (SP-NGD).

    Per example, ``g_gamma = sum_pos g * x_hat`` and ``g_beta = sum_pos g`` for each unit (channel for
    BatchNorm, element of ``normalized_shape`` for LayerNorm); ``F_u = E_i[v_i v_i^T]`` with
    ``v_i = N * (g_gamma, g_beta)_{i,u}`` is ``2 x 2`` (``1 x 1`` without bias).
    """

    kind = "unit"
    stat_names = ("F",)

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.weight = module.weight
        self.bias = module.bias if getattr(module, "bias", None) is not None else None
        self.units = module.weight.numel()
        self.groups = 1

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def k(self) -> int:
        return 1 + (self.bias is not None)

    def cost(self) -> float:
        return float(self.units * self.k ** 3)

    def normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x_hat`` as the layer computes it in training mode (fp32)."""
        m = self.module
        x = x.float()
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + m.eps)

    def per_example_grads(self, grad: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``[N, units, k]``: per-example (gamma, beta) gradients of the unscaled output gradient."""
        grad = grad.float()
        n = grad.shape[0]
        if isinstance(self.module, nn.LayerNorm):
            prod = (grad * x_hat).reshape(n, -1, self.units).sum(1)
            beta = grad.reshape(n, -1, self.units).sum(1)
        else:
            prod = (grad * x_hat).reshape(n, self.units, -1).sum(2)
            beta = grad.reshape(n, self.units, -1).sum(2)
        return torch.stack([prod, beta], dim=2) if self.bias is not None else prod.unsqueeze(2)

    def f_sum(self, grad: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``sum_i v_i v_i^T`` per unit: ``[units, k, k]`` (unscaled)."""
        v = self.per_example_grads(grad, x_hat)
        return torch.einsum("nuk,nul->ukl", v, v)

    def grad_matrix(self) -> torch.Tensor:
        """``[units, k]`` gradient (fp32)."""
        cols = [self.weight.grad.reshape(-1).float()]
        if self.bias is not None:
            cols.append(self.bias.grad.reshape(-1).float())
        return torch.stack(cols, dim=1)

    def set_grad(self, matrix: torch.Tensor) -> None:
        self.weight.grad.copy_(matrix[:, 0].reshape(self.weight.shape))
        if self.bias is not None:
            self.bias.grad.copy_(matrix[:, 1].reshape(self.bias.shape))


SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def make_block(module: nn.Module, name: str, linear_variant: str = EXPAND) -> KroneckerBlock | UnitWiseBlock | None:
    """The curvature block of a supported module with trainable weights, else ``None``."""
    if getattr(module, "weight", None) is None or not isinstance(module.weight, nn.Parameter):
        return None
    if isinstance(module, nn.Linear):
        return LinearBlock(module, name, linear_variant)
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(module, name)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
        return UnitWiseBlock(module, name)
    return None
