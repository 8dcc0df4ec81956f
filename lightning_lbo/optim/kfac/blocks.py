"""Curvature blocks: one object per preconditioned layer, owning its statistics, factors and inverse.

Scaling convention (one for every block, every batch size and every world size)
-------------------------------------------------------------------------------
The training loss is the **mean over the batch** (leading dimension) of per-example losses, so an
output gradient ``dL/dy_i`` is ``1/N`` times the per-example gradient. Statistics are built from
per-example quantities, ``g_i = N * dL/dy_i``, so that the Fisher block ``F ~ A (x) G`` estimates
``E_i[grad_i grad_i^T]`` of a *single example* and damping means the same at every batch size:

.. math::

    A = \\frac{1}{N}\\sum_i \\sum_{t=1}^{T} \\bar a_{i,t} \\bar a_{i,t}^T, \\qquad
    G = \\frac{1}{N}\\sum_i \\frac{1}{T}\\sum_{t=1}^{T} g_{i,t} g_{i,t}^T,

where ``t`` runs over the ``T`` positions sharing the weight (conv output locations, sequence
positions of an N-D Linear in the "expand" variant, **and the uses of a module called several times
in one forward**: tied weights, a shared block) and ``\\bar a = [a, 1]`` folds the bias in. This is
the KFC convention of Grosse & Martens (2016): the positional sum sits in ``A``, the positional mean
in ``G``; for a plain Linear layer ``T = 1``. The "reduce" variant for N-D Linear inputs uses
``a_i = mean_t a_{i,t}`` and ``g_i = sum_t g_{i,t}`` (Eschenhagen et al. 2023). Calls of a layer
between two backward passes are uses of one micro-batch (so ``N`` counts the examples once);
micro-batches separated by a backward are more examples (gradient accumulation).

Blocks compute **sums over examples** (:meth:`CurvatureBlock.input_statistics`,
:meth:`CurvatureBlock.output_statistic`); the preconditioner divides by the number of examples of
the whole (possibly accumulated) batch and applies the per-example factor ``N``.

Tensor layouts: Kronecker factors are batched over groups, ``A: [groups, d_a, d_a]``,
``G: [groups, d_g, d_g]``; a layer's gradient as a matrix is ``[groups, d_g, d_a]``. An embedding's
``A`` is diagonal and stored as its diagonal ``[1, num_embeddings]``. Unit-wise blocks (BatchNorm,
LayerNorm; SP-NGD, Osawa et al. 2020) hold one ``k x k`` Fisher per unit, ``F: [units, k, k]`` with
``k = 2`` for (gamma, beta), 1 without a bias.

Adding a block type
-------------------
Subclass :class:`CurvatureBlock` (or :class:`KroneckerBlock`), implement the methods marked
*contract*, and map a module type to it with :func:`register_block`. The preconditioner, the
capture hooks, the communicator and checkpoints only use that contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import inverses as inv

EXPAND, REDUCE = "expand", "reduce"


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision gradients are preconditioned in: fp64 stays fp64, anything else is fp32."""
    return t if t.dtype == torch.float64 else t.float()


def _gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x^T x`` batched: ``[groups, rows, d] -> [groups, d, d]`` in ``dtype``."""
    x = x.to(dtype)
    return torch.bmm(x.transpose(1, 2), x)


def _gram_with_ones(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[x, 1]^T [x, 1]`` without materialising the ones column: ``[g, rows, d] -> [g, d+1, d+1]``."""
    x = x.to(dtype)
    return _bordered(torch.bmm(x.transpose(1, 2), x), x.sum(1), x.shape[1])


def _bordered(gram: torch.Tensor, col: torch.Tensor, rows: int) -> torch.Tensor:
    """``[[gram, col], [col^T, rows]]``: the Gram of ``[x, 1]`` from that of ``x`` and its column sums."""
    g, d, _ = gram.shape
    out = gram.new_empty(g, d + 1, d + 1)
    out[:, :d, :d] = gram
    out[:, :d, d] = col
    out[:, d, :d] = col
    out[:, d, d] = rows
    return out


class CurvatureBlock:
    """One layer's curvature: statistics being captured, factors, their versions and the inverse.

    State owned by the block (read it through the preconditioner's accessors):

    * ``factors``: ``{statistic: tensor}`` in ``factor_dtype``; ``versions``: ``{statistic: int}``,
      incremented whenever a factor changes (refresh, checkpoint load);
    * ``inverse``: a :class:`~lightning_lbo.optim.kfac.inverses.BlockInverse` or ``None``;
      ``inverse_versions``: the factor versions it was computed from (``None`` before the first);
    * the schedule of each statistic: ``interval``, ``next_due``, ``refreshes``.

    Contract of a subclass: ``stat_names`` (``input_stats`` computed from the layer input in the
    forward, ``output_stat`` from the output gradient), :meth:`input_statistics`,
    :meth:`output_statistic`, :meth:`grad_matrix`, :meth:`set_grad`, :meth:`param_matrix`,
    :meth:`cost`, :meth:`inverse_type` and :attr:`description`.
    """

    stat_names: tuple[str, ...] = ()
    input_stats: tuple[str, ...] = ()
    output_stat: str = ""

    def __init__(self, module: nn.Module, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        self.module = module
        self.name = name
        self.factor_dtype = factor_dtype
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = module.bias if getattr(module, "bias", None) is not None else None
        # {statistic: tensor, or a low-rank A whose Gram is built when read (inv.DeferredFactor)}: see ``factors``
        self.stored_factors: dict[str, Any] = {}
        # set by the preconditioner while this block's A rows feed the low-rank inverse: A's Gram is then deferred
        self.defer_low_rank_gram = False
        self.versions: dict[str, int] = {s: 0 for s in self.stat_names}
        self.inverse: inv.BlockInverse | None = None
        self.inverse_versions: dict[str, int] | None = None
        self.inverse_source: dict[str, Any] | None = None  # the factors (and rows) the inverse was built from
        self.inverse_damping: float | None = None
        # set by a checkpoint load: (source, damping, source older than the factors, factor versions at load)
        self.restored_source: tuple[dict[str, Any], float, bool, dict[str, int]] | None = None
        self.owner: int | None = None
        # Per statistic, rows U ([groups, r, d]) and example count n with factor = U^T U / n, when the current
        # factor is a fresh low-rank statistic (the Woodbury inverse); valid while versions == low_rank_versions.
        self.low_rank: dict[str, tuple[torch.Tensor, int]] = {}
        self.low_rank_versions: dict[str, int] = {}
        self.interval = {s: 1 for s in self.stat_names}
        self.next_due = {s: 0 for s in self.stat_names}
        self.refreshes = {s: 0 for s in self.stat_names}
        # per statistic, on the device: has a finite estimate been committed (vs the identity placeholder)
        self.estimated = {s: torch.zeros((), dtype=torch.bool, device=self.weight.device) for s in self.stat_names}

    # ---- contract ----------------------------------------------------------------------------------------
    @classmethod
    def trainable(cls, module: nn.Module) -> bool:
        """Whether ``module`` has the trainable parameters this block type preconditions."""
        return isinstance(getattr(module, "weight", None), nn.Parameter)

    def hook_io(self, inputs: tuple, kwargs: dict[str, Any], output: Any) -> tuple[Any, int, Any]:
        """From one hooked call: the input passed to :meth:`input_statistics`, the number of examples,
        and the output tensor whose gradient feeds :meth:`output_statistic`."""
        x = inputs[0].detach()
        return x, x.shape[0], output

    def uses(self) -> list[tuple[nn.Module, Any]]:
        """``(module, use)`` for each module the capture hooks; the first use counts the examples.

        A use provides ``hook_io``, ``input_statistics``, ``output_statistic``, ``output_stat`` and
        ``symmetric`` for the calls of its module. A block of one module is its own use; a block of a
        weight shared by two modules (:mod:`.tied`) has one use per module.
        """
        return [(self.module, self)]

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this block preconditions."""
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def description(self) -> str:
        """Rank-independent summary (type and factor sizes), compared across ranks and checkpoints."""
        return f"{type(self).__name__} {tuple(self.factor_shapes().values())}"

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each factor (checked on checkpoint load)."""
        raise NotImplementedError

    def cost(self) -> float:
        """Relative cost of inverting this block (``sum d^3``), for assigning inverse work to ranks."""
        raise NotImplementedError

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        """Sums over the examples of ``x`` of the due input statistics, and a context for the backward."""
        raise NotImplementedError

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        """Sum over examples of the output-gradient statistic of the *unscaled* ``dL/dy`` (the caller scales)."""
        raise NotImplementedError

    def grad_matrix(self) -> torch.Tensor:
        """The gradient in the block's layout (fp32, fp64 for fp64 parameters)."""
        raise NotImplementedError

    def param_matrix(self) -> torch.Tensor:
        """The parameters in the layout of :meth:`grad_matrix` (for folding L2 in)."""
        raise NotImplementedError

    def set_grad(self, matrix: torch.Tensor) -> None:
        """Write a matrix in the :meth:`grad_matrix` layout back into ``.grad`` (in place)."""
        raise NotImplementedError

    def inverse_type(self, method: inv.InverseMethod) -> type[inv.BlockInverse]:
        """The inverse class this block uses with ``method``."""
        raise NotImplementedError

    @property
    def low_rank_capable(self) -> bool:
        """Whether the Woodbury inverse (rows of ``A`` kept at capture) applies to this block."""
        return False

    def symmetric(self, stat: str) -> bool:
        """Whether the statistic is a (batch of) symmetric matrices (the communicator packs those)."""
        return True

    def identity_factor(self, stat: str) -> torch.Tensor:
        """The factor used before the first finite estimate (the identity)."""
        shape = self.factor_shapes()[stat]
        return torch.eye(shape[-1], dtype=self.factor_dtype, device=self.weight.device).expand(shape).clone()

    # ---- shared helpers -----------------------------------------------------------------------------------
    @property
    def factors(self) -> dict[str, torch.Tensor]:
        """``{statistic: factor}``, dense: a deferred low-rank factor's Gram is built here, once."""
        for stat, value in list(self.stored_factors.items()):
            if not isinstance(value, torch.Tensor):
                self.stored_factors[stat] = value.dense()
        return self.stored_factors

    @factors.setter
    def factors(self, value: dict[str, torch.Tensor]) -> None:
        self.stored_factors = dict(value)

    def set_factor(self, stat: str, value: Any) -> None:
        """Replace a factor (a tensor or a deferred one) and bump its version (invalidates an inverse built
        from the old one)."""
        self.stored_factors[stat] = value
        self.versions[stat] += 1

    @property
    def captured(self) -> bool:
        return len(self.stored_factors) == len(self.stat_names)

    @property
    def inverse_is_current(self) -> bool:
        return self.inverse_versions == self.versions


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
        return {"A": self._a_gram(rows)}, rows

    def _a_gram(self, rows: torch.Tensor) -> torch.Tensor | inv.DeferredGram:
        """``A``'s sum over examples from its rows; deferred when the rows feed the low-rank inverse."""
        gram = inv.DeferredGram(rows, self.factor_dtype, _gram_with_ones if self.bias is not None else _gram)
        return gram if self.defer_low_rank_gram and 2 * rows.shape[1] <= self.dims[0] else gram.dense()

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
                 linear_variant: str = EXPAND) -> None:
        super().__init__(module, name, factor_dtype)
        if linear_variant not in (EXPAND, REDUCE):
            raise ValueError(f"Invalid linear_variant: {linear_variant!r}. Supported: {(EXPAND, REDUCE)}.")
        self.variant = linear_variant

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


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` with any stride, padding (int, tuple, ``"same"``, any padding mode), dilation, groups.

    ``A`` is built from im2col patches, one row per output location.
    """

    def __init__(self, module: nn.Conv2d | nn.Conv1d, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(module, name, factor_dtype)
        self.groups = module.groups

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        m = self.module
        return m.kernel_size, m.dilation, m.stride

    @property
    def dims(self) -> tuple[int, int]:
        m = self.module
        (kh, kw), _, _ = self._geometry()
        return m.in_channels // m.groups * kh * kw + (self.bias is not None), m.out_channels // m.groups

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input padded as the layer pads it, ``[N, C, H, W]``."""
        m = self.module
        (kh, kw), (dh, dw), _ = self._geometry()
        if m.padding_mode != "zeros":
            return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        if m.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        if m.padding != "valid" and any(m.padding):
            ph, pw = m.padding
            return F.pad(x, (pw, pw, ph, ph))
        return x

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """im2col patches ``[groups, N * L, kh * kw * C_in/groups]`` (L = output locations) in *patch order*:
        columns ``(i, j, c)``, not the weight's ``(c, i, j)``.

        One stack of ``kh * kw`` strided slices of the padded input in channels-last memory, so that
        each slice is copied in runs of ``C`` contiguous values (3x faster than stacking them into the
        weight order, which writes every ``kh * kw``-th value; ``F.unfold`` is slower still).
        :meth:`input_statistics` then reorders whichever is smaller, the rows or their Gram.
        """
        (kh, kw), (dh, dw), (sh, sw) = self._geometry()
        x = self._padded(x)
        n, c, H, W = x.shape
        oh = (H - dh * (kh - 1) - 1) // sh + 1
        ow = (W - dw * (kw - 1) - 1) // sw + 1
        xc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # [N, H, W, C], C contiguous
        cols = [xc[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                for i in range(kh) for j in range(kw)]
        cols = torch.stack(cols, dim=3) if len(cols) > 1 else cols[0].unsqueeze(3)  # [N, oh, ow, kh*kw, C]
        g = self.groups
        if g == 1:
            return cols.reshape(1, n * oh * ow, kh * kw * c)
        cols = cols.reshape(n * oh * ow, kh * kw, g, c // g).permute(2, 0, 1, 3)
        return cols.reshape(g, n * oh * ow, kh * kw * (c // g))

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        """``A`` in the weight's column order: with fewer rows than columns the patch-order rows are
        reordered (and kept for a low-rank inverse), else their Gram (a ``d_A^2`` copy; such rows are
        never low-rank, so none are returned)."""
        if "A" not in due:
            return {}, None
        rows = self.a_rows(x)
        g, r, d = rows.shape
        (kh, kw), _, _ = self._geometry()
        taps = kh * kw
        if r < d:
            rows = rows.view(g, r, taps, d // taps).transpose(2, 3).reshape(g, r, d)
            return {"A": self._a_gram(rows)}, rows
        gram = _gram(rows, self.factor_dtype)
        gram = gram.view(g, taps, d // taps, taps, d // taps).permute(0, 2, 1, 4, 3).reshape(g, d, d)
        if self.bias is not None:
            col = rows.to(self.factor_dtype).sum(1).view(g, taps, d // taps).transpose(1, 2).reshape(g, d)
            gram = _bordered(gram, col, r)
        return {"A": gram}, None

    def output_rows(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        n, c = grad.shape[:2]
        locations = grad[0, 0].numel()
        rows = grad.reshape(n, self.groups, c // self.groups, locations).permute(1, 0, 3, 2)
        return rows.reshape(self.groups, n * locations, c // self.groups), locations

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        """``G``: with at least ``4 d_g`` locations, a sum over examples of each example's ``[d_g, L] @ [L, d_g]``,
        read in the gradient's own layout (no ``[N * L, d_g]`` copy of the rows; the ``[N, d_g, d_g]`` products
        are at most a quarter of the gradient); with fewer (wide late layers), the Gram of the rows. At 2 threads,
        batch 1024 (one micro run): SmallCNN conv1 (L = 784, d_g = 16) 44 -> 24 ms, conv2 (196, 32) 40 -> 24 ms."""
        n, c = grad.shape[:2]
        g = self.groups
        locations = grad[0, 0].numel()
        if locations < 4 * (c // g):
            return super().output_statistic(grad, context)
        per_example = grad.to(self.factor_dtype).reshape(n * g, c // g, locations)
        gram = torch.bmm(per_example, per_example.transpose(1, 2)).view(n, g, c // g, c // g).sum(0)
        return gram / locations if locations > 1 else gram


class Conv1dBlock(Conv2dBlock):
    """``nn.Conv1d``: a Conv2d block over inputs ``[N, C, 1, L]`` with kernel ``(1, k)``."""

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        m = self.module
        return (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        elif m.padding == "same":
            t = m.dilation[0] * (m.kernel_size[0] - 1)
            x = F.pad(x, (t // 2, t - t // 2))
        elif m.padding != "valid" and m.padding[0]:
            x = F.pad(x, (m.padding[0], m.padding[0]))
        return x.unsqueeze(2)


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


class UnitWiseBlock(CurvatureBlock):
    """BatchNorm1d/2d/3d or LayerNorm: unit-wise natural gradient over (gamma_u, beta_u) (SP-NGD).

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
        statistics), by the layer's own kernel without its affine map (one pass, no ``var`` over strided dims)."""
        m = self.module
        x = x.to(self.factor_dtype)
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


BlockFactory = Callable[..., CurvatureBlock]

#: Module type -> block class. Looked up along the module's MRO, so subclasses of a registered type
#: (e.g. a custom ``nn.Linear``) get its block unless registered themselves.
BLOCK_TYPES: dict[type[nn.Module], type[CurvatureBlock]] = {
    nn.Linear: LinearBlock,
    nn.Conv1d: Conv1dBlock,
    nn.Conv2d: Conv2dBlock,
    nn.Embedding: EmbeddingBlock,
    nn.BatchNorm1d: UnitWiseBlock,
    nn.BatchNorm2d: UnitWiseBlock,
    nn.BatchNorm3d: UnitWiseBlock,
    nn.LayerNorm: UnitWiseBlock,
}


def register_block(module_type: type[nn.Module], block_type: type[CurvatureBlock]) -> None:
    """Precondition every ``module_type`` (and subclasses not registered themselves) with ``block_type``.

    The preconditioner builds ``block_type(module, name, factor_dtype=...)`` (a :class:`LinearBlock`
    subclass also gets ``linear_variant=...``).

    Example::

        register_block(MyLinear, LinearBlock)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_block needs an nn.Module subclass, got {module_type!r}.")
    if not (isinstance(block_type, type) and issubclass(block_type, CurvatureBlock)):
        raise TypeError(f"register_block needs a CurvatureBlock subclass, got {block_type!r}.")
    BLOCK_TYPES[module_type] = block_type


#: Factories of the block of a weight shared by two layers: ``factory(first_block, second_block)`` returns
#: the block, or ``None`` for a pair it does not cover (tied embeddings: :mod:`.tied`).
SHARED_BLOCK_FACTORIES: list[Callable[[CurvatureBlock, CurvatureBlock], CurvatureBlock | None]] = []


def register_shared_block(factory: Callable[[CurvatureBlock, CurvatureBlock], CurvatureBlock | None]) -> None:
    """Cover a sharing pattern: ``factory(first, second)`` builds one block for two blocks that share a
    parameter (``first`` found first in ``named_modules``), or returns ``None``. Uncovered pairs get the
    plain update with a warning."""
    if not callable(factory):
        raise TypeError(f"register_shared_block needs a callable (first, second) -> block or None, got {factory!r}.")
    SHARED_BLOCK_FACTORIES.append(factory)


def make_shared_block(first: CurvatureBlock, second: CurvatureBlock) -> CurvatureBlock | None:
    """The block of a parameter shared by ``first`` and ``second`` from the registered factories, else ``None``."""
    for factory in SHARED_BLOCK_FACTORIES:
        block = factory(first, second)
        if block is not None:
            return block
    return None


def block_type_for(module: nn.Module) -> type[CurvatureBlock] | None:
    """The registered block class of ``module`` (nearest registered base class), else ``None``."""
    for cls in type(module).__mro__:
        if cls in BLOCK_TYPES:
            return BLOCK_TYPES[cls]
    return None


def make_block(module: nn.Module, name: str, factor_dtype: torch.dtype = torch.float32,
               linear_variant: str = EXPAND) -> CurvatureBlock | None:
    """The curvature block of a registered module with a trainable ``weight`` parameter, else ``None``."""
    block_type = block_type_for(module)
    if block_type is None or not block_type.trainable(module):
        return None
    if issubclass(block_type, LinearBlock):
        return block_type(module, name, factor_dtype=factor_dtype, linear_variant=linear_variant)
    return block_type(module, name, factor_dtype=factor_dtype)
