"""Applying the inverses: the preconditioned gradients of a step, with the KL clip, written back in place."""

from __future__ import annotations

import torch

from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.inversion import WoodburyKronecker


def precondition(blocks: list[CurvatureBlock], damping: float, lr: float | None, *, l2: float, kl_clip: float | None,
                 comm: Communicator, owners_only: bool) -> torch.Tensor | None:
    """Replace each block's gradient by its preconditioned gradient ``P`` (with ``l2 * w`` folded in), scaled so
    that ``lr^2 sum <P, g>`` is at most ``kl_clip``; returns the KL-clip factor (``None`` without a clip).

    With ``owners_only`` the owner rank of a block applies its inverse and broadcasts ``P``. Inverses that return
    ``P = s * P'`` (:meth:`~.inverses.BlockInverse.apply_unscaled`) get ``s`` folded into the clip's multiply.
    No host sync.
    """
    grads, precond, scales = [], [], []
    for block in blocks:
        g = block.grad_matrix()
        if l2 > 0:
            g = g + l2 * block.param_matrix()
        scale = None
        if owners_only:
            p = block.inverse.apply(g, damping) if block.owner == comm.rank else torch.empty_like(g)
            comm.broadcast([p], src=block.owner)
        elif l2 == 0 and isinstance(block.inverse, WoodburyKronecker) and hasattr(block, "live_columns"):
            # the gradient is zero on the columns of conv taps that read only padding (l2 would fill them)
            p, scale = block.inverse.apply_unscaled(g, damping, live=block.live_columns())
        else:
            p, scale = block.inverse.apply_unscaled(g, damping)  # P = scale * p
        grads.append(g)
        precond.append(p)
        scales.append(scale)
    unscaled = [p for p, scale in zip(precond, scales, strict=True) if scale is None]
    nu = None
    if kl_clip is not None and precond:
        dots = [torch.vdot(p.reshape(-1), g.reshape(-1)) for p, g in zip(precond, grads, strict=True)]
        vg = torch.stack([d if scale is None else d * scale for d, scale in zip(dots, scales, strict=True)]).sum()
        nu = torch.sqrt(kl_clip / (lr ** 2 * vg.abs().clamp_min(1e-30))).clamp(max=1.0)
        nu = torch.where(torch.isfinite(nu), nu, torch.ones_like(nu))
        if unscaled:
            torch._foreach_mul_(unscaled, nu)
        scales = [None if scale is None else scale * nu for scale in scales]
    scaled = [(p, scale) for p, scale in zip(precond, scales, strict=True) if scale is not None]
    if scaled:
        torch._foreach_mul_([p for p, _ in scaled], [scale for _, scale in scaled])
    for block, p in zip(blocks, precond, strict=True):
        block.set_grad(p)
    return nu
