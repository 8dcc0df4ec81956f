"""Proof of extensibility: a Shampoo-style block (Gupta et al. 2018) written against the public block API only.

Statistics come from the weight gradient alone: for ``G = dL/dW`` (``[d_out, d_in]``), ``L = G G^T`` and
``R = G^T G``; the update is ``(L + lambda I)^{-1/4} G (R + lambda I)^{-1/4}``. The block packs ``L`` and ``R``
into one symmetric statistic ``S = diag(L, R)`` (so averaging across ranks, checkpoints and the running average
are the core's, unchanged), computes ``G`` per micro-batch from the layer input and output gradient the hooks
see, and brings its own inverse class. It is given to ONE preconditioner (``block_types=``), not registered
globally, and no file of the core knows about it.
"""

from __future__ import annotations

import pickle

import torch
from torch import nn

from lightning_lbo.optim.kfac import BLOCK_TYPES, CurvatureBlock, KFACPreconditioner, LinearBlock
from lightning_lbo.optim.kfac.inverses import BlockInverse


def _inverse_fourth_root(m: torch.Tensor, damping: float) -> torch.Tensor:
    d, q = torch.linalg.eigh(m)
    return (q * (d.clamp_min(0) + damping).pow(-0.25).unsqueeze(-2)) @ q.transpose(-1, -2)


class ShampooInverse(BlockInverse):
    """``P = L_root @ grad @ R_root`` with ``X_root = (X + lambda I)^{-1/4}`` (grad ``[1, d_out, d_in]``)."""

    names = ("L_root", "R_root")
    symmetric = frozenset(names)
    d_out = 0  # where S = diag(L, R) splits; set per layer by ShampooBlock.inverse_type

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False):
        S, d = factors["S"].to(dtype)[0], cls.d_out
        l_root, r_root = _inverse_fourth_root(S[:d, :d], damping), _inverse_fourth_root(S[d:, d:], damping)
        ok = torch.isfinite(l_root).all() & torch.isfinite(r_root).all()
        return cls(L_root=l_root.unsqueeze(0).to(out_dtype), R_root=r_root.unsqueeze(0).to(out_dtype)), ok

    @classmethod
    def identity(cls, factors, out_dtype):
        S, d = factors["S"][0], cls.d_out
        eye = torch.eye(S.shape[0], dtype=out_dtype, device=S.device)
        return cls(L_root=eye[:d, :d].unsqueeze(0).clone(), R_root=eye[d:, d:].unsqueeze(0).clone())

    def apply(self, grad, damping):
        return (self.data["L_root"] @ self._cast(grad) @ self.data["R_root"]).to(grad.dtype)


class ShampooBlock(CurvatureBlock):
    """An ``nn.Linear`` without bias preconditioned Shampoo-style; statistic ``S = diag(G G^T, G^T G)``."""

    stat_names = ("S",)
    input_stats = ()
    output_stat = "S"

    def __init__(self, module: nn.Linear, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        if module.bias is not None:
            raise ValueError(f"ShampooBlock: {name} has a bias; this test block covers bias-free layers.")
        super().__init__(module, name, factor_dtype)
        self._inverse_type = type("ShampooInverse", (ShampooInverse,), {"d_out": module.out_features})

    def factor_shapes(self):
        d = self.module.out_features + self.module.in_features
        return {"S": (1, d, d)}

    def cost(self):
        return float(self.module.out_features ** 3 + self.module.in_features ** 3)

    def input_statistics(self, x, due):
        return {}, x  # the input is the context of the output hook

    def output_statistic(self, grad, context):
        """``diag(G G^T, G^T G)`` of this micro-batch's weight gradient ``G = grad^T x`` (of the unscaled ``dL/dy``)."""
        G = grad.reshape(-1, grad.shape[-1]).to(self.factor_dtype).T @ context.reshape(-1, context.shape[-1]).to(
            self.factor_dtype)
        return torch.block_diag(G @ G.T, G.T @ G).unsqueeze(0)

    def grad_matrix(self):
        return self.weight.grad.unsqueeze(0)

    def param_matrix(self):
        return self.weight.unsqueeze(0)

    def set_grad(self, matrix):
        self.weight.grad.copy_(matrix[0])

    def inverse_type(self, method):
        return self._inverse_type


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(5, 3, bias=False).double()


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def test_kfac_shampoo_block_equals_dense_reference_formula():
    """One step preconditions W.grad to ``(L + lambda I)^{-1/4} G (R + lambda I)^{-1/4}`` with ``L = n G G^T``,
    ``R = n G^T G`` (the per-example scaling of an output statistic), checked against the closed form from the
    SVD ``G = sum_i s_i u_i v_i^T``: ``P = sum_i s_i / sqrt(n s_i^2 + lambda) u_i v_i^T``."""
    layer, (x, y) = _layer(), _batch()
    n, damping = x.shape[0], 1e-3
    pre = KFACPreconditioner(layer, block_types={nn.Linear: ShampooBlock}, damping=damping, kl_clip=None,
                             factor_update_interval=1, inverse_update_interval=1)
    assert isinstance(pre.block(layer), ShampooBlock)
    (0.5 * (layer(x) - y).pow(2).sum(1).mean()).backward()
    G = layer.weight.grad.clone()
    pre.step()
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    want = (U * (s / torch.sqrt(n * s ** 2 + damping))) @ Vh
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-10, atol=1e-12)
    S = pre.factors(layer)["S"][0]
    torch.testing.assert_close(S, torch.block_diag(n * G @ G.T, n * G.T @ G), rtol=1e-12, atol=1e-14)


def test_kfac_shampoo_block_is_local_to_its_preconditioner():
    """``block_types=`` changes one preconditioner: the global registry and another preconditioner keep
    ``LinearBlock``; the signature names the block type and stays picklable."""
    pre = KFACPreconditioner(_layer(), block_types={nn.Linear: ShampooBlock})
    other = KFACPreconditioner(_layer(1))
    assert BLOCK_TYPES[nn.Linear] is LinearBlock and isinstance(other.blocks[0], LinearBlock)
    signature = pre.signature()
    assert signature["layers"] == ["Linear: ShampooBlock ((1, 8, 8),)"]
    assert pickle.loads(pickle.dumps(signature)) == signature


def test_kfac_shampoo_block_checkpoint_resumes_bit_for_bit():
    """Its state goes through the core's checkpoint path: a resumed run equals the straight one."""
    def run(steps, state=None, weights=None):
        layer = _layer()
        if weights is not None:
            layer.load_state_dict(weights)
        pre = KFACPreconditioner(layer, block_types={nn.Linear: ShampooBlock}, kl_clip=None,
                                 factor_update_interval=2, inverse_update_interval=3, factor_decay=0.5)
        if state is not None:
            pre.load_state_dict(state)
        for t in steps:
            x, y = _batch(8 + t)
            layer.zero_grad()
            (0.5 * (layer(x) - y).pow(2).sum(1).mean()).backward()
            pre.step()
            with torch.no_grad():
                layer.weight -= 0.1 * layer.weight.grad
        return layer, pre

    straight, _ = run(range(7))
    first, pre = run(range(4))
    resumed, _ = run(range(4, 7), pre.state_dict(), first.state_dict())
    assert torch.equal(straight.weight, resumed.weight)
