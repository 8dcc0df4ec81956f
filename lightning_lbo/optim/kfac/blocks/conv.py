"""``nn.Conv2d`` / ``nn.Conv1d`` blocks: ``A`` from im2col patches (KFC, Grosse & Martens 2016)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim._torch_private import reversed_padding
from lightning_lbo.optim.kfac.blocks.base import _bordered, _gram
from lightning_lbo.optim.kfac.blocks.kronecker import KroneckerBlock

__all__ = ["Conv1dBlock", "Conv2dBlock"]

#: the Gram of a conv's im2col rows is built from shifted inputs (:meth:`Conv2dBlock._shifted_gram`) when that
#: takes this many times fewer multiply-adds (its products are smaller, so less efficient per multiply-add) ...
SHIFTED_GRAM_GAIN = 2.0
#: ... and the input has at least this many channels (a product per location is a ``C x C`` matrix)
SHIFTED_GRAM_MIN_CHANNELS = 16


class _Frame(NamedTuple):
    """Where a conv input sits in its padded frame (``top``, ``left``, ``h x w`` of non-padding), the padded
    size, the output locations and the row width of :meth:`Conv2dBlock._shifted_gram`'s layout."""

    top: int
    left: int
    h: int
    w: int
    padded_h: int
    padded_w: int
    oh: int
    ow: int
    width: int


def _window_sums(values: torch.Tensor, dim: int, f: _Frame, kh: int, kw: int, dilation: tuple[int, int],
                 stride: tuple[int, int]) -> torch.Tensor:
    """``values`` with padded-frame locations at dims ``dim, dim + 1`` -> their sums over the window of each
    tap ``(i, j)`` (the locations it reads): those dims become ``kh, kw``."""
    (dh, dw), (sh, sw) = dilation, stride
    span_h, span_w = sh * (f.oh - 1) + 1, sw * (f.ow - 1) + 1
    by_row = values.unfold(dim, span_h, dh).narrow(dim, 0, kh)[..., ::sh].sum(-1)
    return by_row.unfold(dim + 1, span_w, dw).narrow(dim + 1, 0, kw)[..., ::sw].sum(-1)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """A conv input as ``[N, C, H, W]`` (a ``Conv1d`` input ``[N, C, L]`` as ``[N, C, 1, L]``)."""
    return x if x.dim() == 4 else x.unsqueeze(2)


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` with any stride, padding (int, tuple, ``"same"``, any padding mode), dilation, groups.

    ``A`` is built from im2col patches, one row per output location.
    """

    def __init__(self, module: nn.Conv2d | nn.Conv1d, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(module, name, factor_dtype)
        self.groups = module.groups
        self._gather_cache: dict[tuple, torch.Tensor] = {}  # see _gather_index
        # input sizes of the forwards since the capture hooked the layer (None: a forward it did not see)
        self._input_sizes: set[tuple[int, ...]] | None = None
        self._live: tuple[frozenset[tuple[int, ...]], tuple[int, ...] | None] | None = None

    def note_input(self, x: torch.Tensor) -> None:
        """Record the spatial size of a forward's input (host ints, every forward the capture hooks)."""
        if self._input_sizes is not None:
            self._input_sizes.add(tuple(x.shape[2:]))

    def track_inputs(self, hooked: bool) -> None:
        """Start recording input sizes (the capture hooked the layer), or stop and forget them (hooks removed:
        forwards from now on are not seen)."""
        self._input_sizes = set() if hooked else None
        self._live = None

    def live_columns(self) -> tuple[int, ...] | None:
        """The gradient columns (weight order) that can be nonzero, host-side: every tap that reads only zero
        padding at every input size recorded since the capture hooked the layer has an exactly zero gradient
        (its input is 0). ``None`` when unknown (no recorded forward, another padding mode, groups) or all live.
        """
        sizes = self._input_sizes
        if not sizes or self.groups != 1 or self._zero_pads() is None:
            return None
        key = frozenset(sizes)
        if self._live is None or self._live[0] != key:
            self._live = (key, self._live_columns(key))
        return self._live[1]

    def _live_columns(self, sizes: frozenset[tuple[int, ...]]) -> tuple[int, ...] | None:
        (kh, kw), (dh, dw), (sh, sw) = self._geometry()
        left, _, top, _ = self._zero_pads()
        live_taps = set()
        for size in sizes:
            h, w = (1, size[0]) if len(size) == 1 else size
            oh, ow = self._output_size(h + sum(self._zero_pads()[2:]), w + sum(self._zero_pads()[:2]))
            rows = [i for i in range(kh) if any(top <= i * dh + sh * p < top + h for p in range(oh))]
            cols = [j for j in range(kw) if any(left <= j * dw + sw * q < left + w for q in range(ow))]
            live_taps.update(i * kw + j for i in rows for j in cols)
        taps = kh * kw
        if len(live_taps) == taps:
            return None
        channels = self.module.in_channels
        live = [c * taps + t for c in range(channels) for t in sorted(live_taps)]
        if self.bias is not None:
            live.append(channels * taps)
        return tuple(live)

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        m = self.module
        return m.kernel_size, m.dilation, m.stride

    @property
    def dims(self) -> tuple[int, int]:
        m = self.module
        (kh, kw), _, _ = self._geometry()
        return m.in_channels // m.groups * kh * kw + (self.bias is not None), m.out_channels // m.groups

    def _zero_pads(self) -> tuple[int, int, int, int] | None:
        """``(left, right, top, bottom)`` zeros the layer pads its input with, ``None`` for another padding mode."""
        m = self.module
        (kh, kw), (dh, dw), _ = self._geometry()
        if m.padding_mode != "zeros":
            return None
        if m.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return tw // 2, tw - tw // 2, th // 2, th - th // 2
        if m.padding != "valid" and any(m.padding):
            ph, pw = m.padding
            return pw, pw, ph, ph
        return 0, 0, 0, 0

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input padded as the layer pads it, ``[N, C, H, W]``."""
        pads = self._zero_pads()
        if pads is None:
            return F.pad(x, reversed_padding(self.module), mode=self.module.padding_mode)
        return F.pad(x, pads) if any(pads) else x

    def _input_box(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the part of :meth:`_padded` that is not zero padding (all of it for
        another padding mode)."""
        pads = self._zero_pads()
        if pads is None:
            _, _, h, w = self._padded(x).shape
            return 0, 0, h, w
        return pads[2], pads[0], x.shape[-2], x.shape[-1]

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output locations ``(oh, ow)`` of a padded input ``height x width``."""
        (kh, kw), (dh, dw), (sh, sw) = self._geometry()
        return (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1

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
        oh, ow = self._output_size(H, W)
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
        never low-rank, so none are returned), from products of shifted inputs where that is cheaper
        (:meth:`_shifted_gram`)."""
        if "A" not in due:
            return {}, None
        shifts = self._shifts(x)
        if shifts is not None:
            return {"A": self._shifted_gram(x, shifts)}, None
        rows = self.a_rows(x)
        g, r, d = rows.shape
        (kh, kw), _, _ = self._geometry()
        taps = kh * kw
        if r < d:
            rows = rows.view(g, r, taps, d // taps).transpose(2, 3).reshape(g, r, d)
            return {"A": self._a_statistic(rows)}, rows
        gram = _gram(rows, self.factor_dtype)
        gram = gram.view(g, taps, d // taps, taps, d // taps).permute(0, 2, 1, 4, 3).reshape(g, d, d)
        if self.bias is not None:
            col = rows.to(self.factor_dtype).sum(1).view(g, taps, d // taps).transpose(1, 2).reshape(g, d)
            gram = _bordered(gram, col, r)
        return {"A": gram}, None

    def _shifts(self, x: torch.Tensor) -> list[tuple[int, int]] | None:
        """The tap offsets ``(di, dj)`` of :meth:`_shifted_gram` (half of them: the others give the transposed
        blocks), or ``None`` where the Gram of the im2col rows is the way: fewer rows than columns (kept for a
        low-rank inverse, or their own Gram is small), groups, few channels, or not :data:`SHIFTED_GRAM_GAIN`
        times fewer multiply-adds."""
        if self.groups != 1 or x.shape[1] < SHIFTED_GRAM_MIN_CHANNELS:
            return None
        (kh, kw), (dh, _), _ = self._geometry()
        n, c = x.shape[:2]
        frame = self._frame(x)
        rows, cols = n * frame.oh * frame.ow, kh * kw * c
        if rows < cols:
            return None
        shifts = [(di, dj) for di in range(kh) for dj in range(1 - kw if di else 0, kw)]
        cost = sum(max(0, frame.h - di * dh) for di, _ in shifts) * frame.width * n * c * c
        return shifts if SHIFTED_GRAM_GAIN * cost <= rows * cols * cols else None

    def _frame(self, x: torch.Tensor) -> _Frame:
        (_, kw), (_, dw), _ = self._geometry()
        top, left, h, w = self._input_box(x)
        padded_h, padded_w = self._padded_size(x)
        oh, ow = self._output_size(padded_h, padded_w)
        reach = (kw - 1) * dw
        right = max(reach - left, padded_w - left - w, 0)
        return _Frame(top, left, h, w, padded_h, padded_w, oh, ow, left + w + right)

    def _padded_size(self, x: torch.Tensor) -> tuple[int, int]:
        pads = self._zero_pads()
        if pads is None:
            return tuple(self._padded(x).shape[-2:])
        return x.shape[-2] + pads[2] + pads[3], x.shape[-1] + pads[0] + pads[1]

    def _shifted_gram(self, x: torch.Tensor, shifts: list[tuple[int, int]]) -> torch.Tensor:
        """The Gram of the im2col rows without building them, ``[1, d_a, d_a]`` in the weight's column order.

        The block of taps ``t = (i, j)`` and ``t' = (i + di, j + dj)`` is ``sum_n sum_{p, q} x_u x_{u + s}^T``
        over the input locations ``u = (i dh + sh p, j dw + sw q)`` that tap ``t`` reads, ``s = (di dh, dj dw)``.
        So per offset ``s`` one batched product per input location, ``M_s(u) = sum_n x_u x_{u + s}^T`` (``N C^2``
        multiply-adds each), and each tap's block is the sum of ``M_s`` over its strided window of locations.
        The locations are rows of the input laid out ``[H, W', N, C]`` with zero columns (``W' >= W + (kw - 1)
        dw``), so that ``x_{u + s}`` is the same layout offset by ``s`` (a partner past a row's end is a zero
        column): one product per offset on contiguous slices, no copies. A ``3 x 3`` conv on ``8 x 8`` inputs
        (resnet18 layer1 at 32x32): ``890 N C^2`` multiply-adds instead of the Gram's ``81 * 64 N C^2``. Exact up
        to the order of the sums.
        """
        (kh, kw), (dh, dw), (sh, sw) = self._geometry()
        n, c = x.shape[:2]
        f = self._frame(x)
        source = self._padded(x) if self._zero_pads() is None else _as_4d(x)  # exactly the box
        # the input in the conv's padded frame, rows [H_p, W'] of [N, C] matrices, zero outside the box, and one
        # zero row more (the last partner slice may end there)
        grid = source.new_zeros(max(f.padded_h, f.top + f.h + 1), f.width, n, c, dtype=self.factor_dtype)
        grid[f.top:f.top + f.h, f.left:f.left + f.w] = source.permute(2, 3, 0, 1)
        flat = grid.view(-1, n, c)
        products = grid.new_zeros(len(shifts), f.padded_h, f.width, c, c)
        for k, (di, dj) in enumerate(shifts):
            a, b = di * dh, dj * dw
            if a >= f.h:
                continue  # no partner inside the box: zero blocks
            start, count = f.top * f.width, (f.h - a) * f.width
            out = products[k, f.top:f.top + f.h - a].view(count, c, c)
            here, there = flat[start:start + count], flat[start + a * f.width + b:start + a * f.width + b + count]
            torch.bmm(here.transpose(1, 2), there, out=out)
        sums = _window_sums(products, 1, f, kh, kw, (dh, dw), (sh, sw))  # [shifts, kh, kw, C, C]
        # block (t, t') is sums[shift of t' - t, t] if t <= t' (offsets in the half computed), else its transpose
        taps = kh * kw
        index = self._gather_index(shifts, kh, kw, x.device)
        flat_sums = sums.reshape(-1, c, c)
        blocks = torch.cat([flat_sums, flat_sums.transpose(1, 2)]).index_select(0, index)
        d = taps * c
        gram = blocks.view(taps, taps, c, c).permute(2, 0, 3, 1).reshape(1, d, d)
        if self.bias is None:
            return gram
        located = grid.sum(2)  # [H_p, W', C]: each location's sum over examples
        col = _window_sums(located[:f.padded_h], 0, f, kh, kw, (dh, dw), (sh, sw))  # [kh, kw, C]
        return _bordered(gram, col.permute(2, 0, 1).reshape(1, d), n * f.oh * f.ow)

    def _gather_index(self, shifts: list[tuple[int, int]], kh: int, kw: int, device: torch.device) -> torch.Tensor:
        """For each tap pair ``(t, t')``, the row of ``cat([sums, sums^T])`` (flattened) holding its block
        (built once per geometry)."""
        key = (tuple(shifts), kh, kw, device)
        cached = self._gather_cache.get(key)
        if cached is None:
            position = {shift: k for k, shift in enumerate(shifts)}
            per_shift, half = kh * kw, len(shifts) * kh * kw
            index = []
            for i, j in ((i, j) for i in range(kh) for j in range(kw)):
                for i2, j2 in ((i2, j2) for i2 in range(kh) for j2 in range(kw)):
                    if (i2, j2) >= (i, j):
                        index.append(position[(i2 - i, j2 - j)] * per_shift + i * kw + j)
                    else:
                        index.append(half + position[(i - i2, j - j2)] * per_shift + i2 * kw + j2)
            cached = self._gather_cache[key] = torch.tensor(index, device=device)
        return cached

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

    def _zero_pads(self) -> tuple[int, int, int, int] | None:
        m = self.module
        if m.padding_mode != "zeros":
            return None
        if m.padding == "same":
            t = m.dilation[0] * (m.kernel_size[0] - 1)
            return t // 2, t - t // 2, 0, 0
        if m.padding != "valid" and m.padding[0]:
            return m.padding[0], m.padding[0], 0, 0
        return 0, 0, 0, 0

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._zero_pads()
        if pads is None:
            x = F.pad(x, reversed_padding(self.module), mode=self.module.padding_mode)
        elif any(pads):
            x = F.pad(x, pads[:2])
        return x.unsqueeze(2)

    def _input_box(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        pads = self._zero_pads()
        if pads is None:
            return 0, 0, 1, self._padded(x).shape[-1]
        return 0, pads[0], 1, x.shape[-1]

    def _padded_size(self, x: torch.Tensor) -> tuple[int, int]:
        pads = self._zero_pads()
        return (1, self._padded(x).shape[-1]) if pads is None else (1, x.shape[-1] + pads[0] + pads[1])
