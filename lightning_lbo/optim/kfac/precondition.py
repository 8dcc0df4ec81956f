"""Applying a block's inverse data to its gradient matrix (the per-step work of K-FAC).

Shapes: Kronecker gradient ``[groups, d_g, d_a]``; unit-wise gradient ``[units, k]``.

* cholesky (factored Tikhonov, damping baked in): ``P = G_inv @ grad @ A_inv``;
* eigen (exact damping ``lambda`` of the current step):
  ``P = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + lambda)] Q_A^T``;
* unit-wise: ``P_u = (F_u + lambda I)^{-1} grad_u`` for every unit.
"""

from __future__ import annotations

import torch

from lightning_lbo.optim.kfac.inverses import InverseMethod


def apply_inverse(state, grad: torch.Tensor, damping: float, method: InverseMethod) -> torch.Tensor:
    """The preconditioned gradient of one block (fp32, same layout as ``grad``)."""
    inv = state.inverse
    if state.block.kind == "unit":
        return torch.bmm(inv["F_inv"], grad.unsqueeze(2)).squeeze(2)
    if "U" in inv:  # Woodbury form of the damped A inverse (see inverses.kronecker_inverse)
        U = inv["U"]
        low = torch.bmm(torch.bmm(torch.bmm(grad, U.transpose(1, 2)), inv["K_inv"]), U)
        return torch.bmm(inv["G_inv"], (grad - low) / inv["delta_A"])
    if method is InverseMethod.CHOLESKY:
        return torch.bmm(torch.bmm(inv["G_inv"], grad), inv["A_inv"])
    QA, QG = inv["QA"], inv["QG"]
    v = torch.bmm(torch.bmm(QG.transpose(1, 2), grad), QA)
    v = v / (inv["dG"].unsqueeze(2) * inv["dA"].unsqueeze(1) + damping * inv["mask"])
    return torch.bmm(torch.bmm(QG, v), QA.transpose(1, 2))


def inverse_template(block, factors: dict[str, torch.Tensor], method: InverseMethod) -> dict[str, torch.Tensor]:
    """Empty tensors shaped like the block's inverse data (receive buffers for a broadcast)."""
    if block.kind == "unit":
        return {"F_inv": torch.empty_like(factors["F"], dtype=torch.float32)}
    A, G = factors["A"], factors["G"]
    if method is InverseMethod.CHOLESKY:
        # Woodbury inverses are only built in one process (rows are not averaged across ranks).
        return {"A_inv": torch.empty_like(A, dtype=torch.float32), "G_inv": torch.empty_like(G, dtype=torch.float32)}
    return {"QA": torch.empty_like(A, dtype=torch.float32), "dA": A.new_empty(A.shape[:2], dtype=torch.float32),
            "QG": torch.empty_like(G, dtype=torch.float32), "dG": G.new_empty(G.shape[:2], dtype=torch.float32),
            "mask": A.new_empty((), dtype=torch.float32)}
