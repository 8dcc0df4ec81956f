"""K-FAC's unit-wise BN block on ghost batch norm layers (issue 25.1): the statistic sees the ghost-normalised input.

References are independent of the block: per-example gamma/beta gradients by autograd, one example at a time
(brute force, fp64), and the unit-wise ``2 x 2`` solve by ``torch.linalg.solve`` on the dense matrices.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, ghost_chunk_sizes
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.optim.kfac.blocks import UnitWiseBlock

# (layer type, input shape, virtual batch): chunks [3, 3, 2], [3, 4] (a 1-row remainder joins), [4, 4]
CASES = [(GhostBatchNorm1d, (8, 3), 3), (GhostBatchNorm1d, (7, 3), 3), (GhostBatchNorm2d, (8, 3, 2, 3), 4),
         (GhostBatchNorm2d, (7, 3, 3, 2), 3)]


def _ghost_layer(layer_type, channels: int, virtual_batch: int, seed: int = 0) -> nn.Module:
    layer = layer_type(channels, virtual_batch_size=virtual_batch, eps=1e-3).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.rand(channels, generator=g, dtype=torch.float64) - 0.5)
    return layer


def _inputs(shape, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """An input whose virtual batches have clearly different statistics, and the weights of a per-example loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * (1.0 + torch.arange(shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))) + 3.0
    return x, torch.randn(shape, generator=g, dtype=torch.float64)


def _per_example_loss(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[N]`` losses, each a function of its own example's output only."""
    return (torch.tanh(y) * w).flatten(1).sum(1)


def _autograd_per_example_grads(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[N, C, 2]``: d l_i / d(gamma, beta) by autograd, one example at a time, through the ghost forward."""
    losses = _per_example_loss(layer(x), w)
    rows = []
    for i in range(x.shape[0]):
        gamma, beta = torch.autograd.grad(losses[i], [layer.weight, layer.bias], retain_graph=True)
        rows.append(torch.stack([gamma, beta], 1))
    return torch.stack(rows)


@pytest.mark.parametrize(("layer_type", "shape", "virtual_batch"), CASES)
def test_unit_wise_block_ghost_bn_per_example_grads_equal_autograd(layer_type, shape, virtual_batch):
    """The block's per-example (gamma, beta) gradients from its context and the output gradient equal autograd's
    per-example gradients through the ghost forward (virtual-batch statistics), exactly in fp64."""
    layer = _ghost_layer(layer_type, shape[1], virtual_batch)
    x, w = _inputs(shape)
    assert len(ghost_chunk_sizes(shape[0], virtual_batch)) > 1
    reference = _autograd_per_example_grads(layer, x, w)
    y = layer(x).detach().requires_grad_(True)
    (grad_y,) = torch.autograd.grad(_per_example_loss(y, w).sum(), y)  # dL/dy_i = dl_i/dy_i
    block = UnitWiseBlock(layer, "bn", factor_dtype=torch.float64)
    _, context = block.input_statistics(x, set())
    torch.testing.assert_close(block.per_example_grads(grad_y, context), reference, rtol=1e-12, atol=1e-12)
    # the whole-batch x_hat (what the block used before) gives other gradients on these inputs
    whole = block.per_example_grads(grad_y, F.batch_norm(x, None, None, training=True, eps=layer.eps))
    assert (whole - reference).abs().max() > 1e-2


class _GhostNet(nn.Module):
    def __init__(self, channels: int, virtual_batch: int) -> None:
        super().__init__()
        self.norm = _ghost_layer(GhostBatchNorm1d, channels, virtual_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def _dense_reference(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, damping: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F_u = E_i[v_i v_i^T]`` with ``v_i`` the autograd per-example gradients of the per-example losses, the mean
    loss's gradient ``[C, 2]`` and ``(F_u + lambda I)^{-1} grad_u`` by a dense solve per unit."""
    v = _autograd_per_example_grads(layer, x, w)  # [N, C, 2], the gradients of l_i (= N * those of the mean)
    fisher = torch.einsum("nuk,nul->ukl", v, v) / x.shape[0]
    grad = v.mean(0)
    solved = torch.linalg.solve(fisher + damping * torch.eye(2, dtype=torch.float64), grad.unsqueeze(2)).squeeze(2)
    return fisher, grad, solved


def test_kfac_preconditioner_ghost_bn_step_equals_dense_unit_wise_solve():
    """One refresh on a ghost-BN model: the factor F equals the per-example Fisher of autograd's per-example gradients
    through the ghost forward, and the preconditioned gradient equals the dense 2x2 solve (fp64)."""
    n, channels, virtual_batch, damping = 8, 3, 3, 1e-2
    model = _GhostNet(channels, virtual_batch)
    x, w = _inputs((n, channels))
    fisher, grad, solved = _dense_reference(model.norm, x, w, damping)
    pre = KFACPreconditioner(model, damping=damping, factor_decay=1.0, factor_update_interval=1,
                             inverse_update_interval=1, kl_clip=None)
    model.zero_grad()
    _per_example_loss(model(x), w).mean().backward()
    torch.testing.assert_close(torch.stack([model.norm.weight.grad, model.norm.bias.grad], 1), grad,
                               rtol=1e-12, atol=1e-12)
    pre.step()
    torch.testing.assert_close(pre.blocks[0].factors["F"].double(), fisher, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack([model.norm.weight.grad, model.norm.bias.grad], 1), solved,
                               rtol=1e-10, atol=1e-12)


def test_kfac_optimizer_ghost_bn_step_moves_weights_by_dense_solve():
    """A K-FAC optimizer step (no momentum) on a ghost-BN model moves (gamma, beta) by ``-lr`` times the dense solve."""
    n, channels, virtual_batch, damping, lr = 7, 3, 3, 1e-2, 0.125  # lr exact in fp32 (the step mask)
    model = _GhostNet(channels, virtual_batch)
    x, w = _inputs((n, channels), seed=2)
    _, _, solved = _dense_reference(model.norm, x, w, damping)
    before = torch.stack([model.norm.weight, model.norm.bias], 1).detach().clone()
    opt = KFAC(model, lr=lr, momentum=0.0, damping=damping, factor_decay=1.0, factor_update_interval=1,
               inverse_update_interval=1, kl_clip=None)
    opt.zero_grad()
    _per_example_loss(model(x), w).mean().backward()
    opt.step()
    after = torch.stack([model.norm.weight, model.norm.bias], 1).detach()
    torch.testing.assert_close(after, before - lr * solved, rtol=1e-10, atol=1e-12)
