"""Conv taps that read only zero padding have an exactly zero gradient: the low-rank step skips their columns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.optim.kfac.blocks import Conv2dBlock
from lightning_lbo.optim.kfac.inversion import WoodburyKronecker
from tests.test_kfac_host_sync import HostSyncCounter


class _PaddedTail(nn.Module):
    """A padded 3x3 conv on 1x1 maps (resnet18's layer4 at 32x32) for 3x3 inputs, on 3x3 maps for 7x7 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 16, 3, stride=2)
        self.tail = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tail(torch.tanh(self.down(x)))).mean((2, 3)))


def test_kfac_conv_live_columns_are_the_taps_that_read_input():
    """Recorded per forward since the capture hooked the layer: the centre tap (and the bias) on 1x1 maps, every
    tap once a 3x3 map was seen, unknown once the hooks are removed; the other columns' gradient is exactly 0."""
    model = _PaddedTail()
    pre = KFACPreconditioner(model, kl_clip=None)
    block = pre.block(model.tail)
    assert isinstance(block, Conv2dBlock) and block.live_columns() is None  # no forward seen yet
    F.cross_entropy(model(torch.randn(4, 4, 3, 3)), torch.tensor([0, 1, 2, 0])).backward()
    live = block.live_columns()
    assert live == tuple(c * 9 + 4 for c in range(16)) + (16 * 9,)
    grad = block.grad_matrix()
    dead = [c for c in range(grad.shape[2]) if c not in live]
    assert grad[:, :, live].abs().sum() > 0 and bool((grad[:, :, dead] == 0).all())
    model(torch.randn(2, 4, 7, 7))
    assert block.live_columns() is None  # every tap reads input on 3x3 maps
    pre.remove_hooks()
    assert block.live_columns() is None


def test_kfac_conv_live_columns_skip_equals_the_full_step(monkeypatch):
    """The step on the live columns only (both Kronecker sides) equals the step on every column, and it runs."""
    torch.manual_seed(0)
    model = _PaddedTail()
    pre = KFACPreconditioner(model, kl_clip=None, damping=1e-2)
    x, y = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    pre.step()
    inverse, block = pre.inverse(model.tail), pre.block(model.tail)
    assert isinstance(inverse, WoodburyKronecker) and "G_rows" in inverse.data
    assert inverse.a_columns.issuperset(block.live_columns())
    widths = []
    g_side = WoodburyKronecker._g_side
    monkeypatch.setattr(WoodburyKronecker, "_g_side", lambda self, p: widths.append(p.shape[2]) or g_side(self, p))
    grad = torch.randn(1, 8, 16 * 9 + 1)
    grad[:, :, [c for c in range(grad.shape[2]) if c not in block.live_columns()]] = 0
    skipped, scale = inverse.apply_unscaled(grad, 1e-2, live=block.live_columns())
    full, full_scale = inverse.apply_unscaled(grad, 1e-2)
    assert widths == [17, 145]  # the live columns only, then every column
    torch.testing.assert_close(skipped * scale, full * full_scale, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("l2", [0.0, 1e-2])
def test_kfac_conv_live_columns_training_equals_the_full_steps(monkeypatch, l2):
    """KFAC training whose input size changes (1x1 maps, then 3x3: every tap live, back to the full step) ends where
    the same training without the skip ends; with L2 (the dead columns' gradient is filled) nothing is skipped."""
    finals = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(Conv2dBlock, "live_columns", lambda self: None)
        torch.manual_seed(0)
        model = _PaddedTail()
        opt = KFAC(model, lr=0.1, momentum=0.9, factor_update_interval=2, inverse_update_interval=2, l2=l2)
        g = torch.Generator().manual_seed(2)
        for step in range(6):
            size = 3 if step < 4 else 7
            x, y = torch.randn(4, 4, size, size, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        finals[skip] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(finals[True], finals[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kfac_conv_live_columns_steps_that_refresh_nothing_make_no_host_sync():
    torch.manual_seed(0)
    model = _PaddedTail()
    opt = KFAC(model, lr=0.1, momentum=0.9, factor_update_interval=3, inverse_update_interval=3)
    x, y = torch.randn(4, 4, 3, 3), torch.tensor([0, 1, 2, 0])
    quiet = []
    for step in range(5):
        opt.zero_grad()
        counter = HostSyncCounter()
        with counter:
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if step % 3:
            quiet.append(counter.ops)
    inverse = opt.preconditioner.inverse(model.tail)
    assert inverse.a_columns is not None and inverse.a_columns.issuperset(opt.preconditioner.block(model.tail)
                                                                          .live_columns())
    assert quiet == [[], [], []]
