"""Defect 7 with the default factor dtype of an fp32 model: every inverse method within 1e-4 of a dense fp64
solve from damping 1e-2 down to 1e-6 (end to end: hooks, factors, inverse, preconditioned gradient)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner

N, T, V, D, OUT = 1, 4, 10, 8, 5  # one sequence of 4 tokens: every factor is rank-deficient


class _SequenceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, OUT)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.fc(self.emb(tokens)))))


def _record(model: _SequenceNet) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs and output gradients of every layer, recorded by hooks of this test (not K-FAC's)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name, module, inputs, output):
        seen[name] = {"x": inputs[0].detach()}
        output.register_hook(lambda g: seen[name].__setitem__("g", g.detach()))

    for name in ("emb", "fc", "norm", "out"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o))
    return seen


def _kron_solve(G: torch.Tensor, A: torch.Tensor, grad: torch.Tensor, lam: float, exact: bool) -> torch.Tensor:
    """``(G (x) A + lam I)^{-1}`` (exact damping) or the factored Tikhonov system applied to ``grad [d_g, d_a]``."""
    d_g, d_a = G.shape[0], A.shape[0]
    eye_g, eye_a = torch.eye(d_g, dtype=torch.float64), torch.eye(d_a, dtype=torch.float64)
    if exact:
        M = torch.kron(G, A) + lam * torch.eye(d_g * d_a, dtype=torch.float64)
    else:
        pi = ((A.trace() / d_a) / (G.trace() / d_g)).sqrt()
        M = torch.kron(G + lam ** 0.5 / pi * eye_g, A + pi * lam ** 0.5 * eye_a)
    return torch.linalg.solve(M, grad.reshape(-1)).reshape(d_g, d_a)


def _references(seen, model: _SequenceNet, grads: dict[str, torch.Tensor], lam: float, method: str):
    """Dense fp64 solves from fp64 statistics of the recorded fp32 activations and gradients."""
    exact = method == "eigen"
    out = {}
    for name in ("fc", "out"):  # nn.Linear over positions: A sums positions, G averages them (N dL/dy)
        x = seen[name]["x"].double().reshape(-1, seen[name]["x"].shape[-1])
        rows = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        g = N * seen[name]["g"].double().reshape(-1, seen[name]["g"].shape[-1])
        A, G = rows.T @ rows / N, g.T @ g / (N * T)
        grad = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"].unsqueeze(1)], 1)
        out[name] = _kron_solve(G, A, grad, lam, exact)
    counts = torch.bincount(seen["emb"]["x"].reshape(-1), minlength=V).double() / N
    g = N * seen["emb"]["g"].double().reshape(-1, D)
    out["emb"] = _kron_solve(g.T @ g / (N * T), torch.diag(counts), grads["emb.weight"].T, lam, exact=True)
    x_hat = nn.functional.layer_norm(seen["norm"]["x"].double(), (D,), eps=model.norm.eps)
    g = N * seen["norm"]["g"].double()
    v = torch.stack([(g * x_hat).sum(1), g.sum(1)], 2)  # [N, units, 2]: per-example (gamma, beta) gradients
    F = torch.einsum("nuk,nul->ukl", v, v) / N
    grad = torch.stack([grads["norm.weight"], grads["norm.bias"]], 1)
    out["norm"] = torch.linalg.solve(F + lam * torch.eye(2, dtype=torch.float64), grad.unsqueeze(2))[..., 0]
    return out


@pytest.mark.parametrize("damping", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
@pytest.mark.parametrize("method", ["cholesky", "woodbury", "eigen"])
def test_kfac_default_dtype_every_method_matches_dense_fp64_solve(method, damping):
    """fp32 model, factor_dtype left at its default: the Cholesky/Woodbury Kronecker blocks, the eigen blocks,
    the embedding's diagonal block and LayerNorm's unit-wise block all within 1e-4 of a dense fp64 solve."""
    torch.manual_seed(0)
    model = _SequenceNet()
    seen = _record(model)
    pre = KFACPreconditioner(model, damping=damping, factor_update_interval=1, inverse_update_interval=1,
                             kl_clip=None, inverse_method="cholesky" if method != "eigen" else "eigen",
                             low_rank_inverse=method == "woodbury")
    tokens = torch.randint(0, V, (N, T))
    target = torch.randint(0, OUT, (N, T))
    nn.functional.cross_entropy(model(tokens).reshape(-1, OUT), target.reshape(-1)).backward()
    grads = {k: p.grad.double().clone() for k, p in model.named_parameters()}
    pre.step()
    if method == "woodbury":
        assert isinstance(pre.inverse("fc"), inv.WoodburyKronecker) and isinstance(pre.inverse("out"),
                                                                                   inv.WoodburyKronecker)
    want = _references(seen, model, grads, damping, method)
    got = {"fc": torch.cat([model.fc.weight.grad, model.fc.bias.grad.unsqueeze(1)], 1),
           "out": torch.cat([model.out.weight.grad, model.out.bias.grad.unsqueeze(1)], 1),
           "emb": model.emb.weight.grad.T,
           "norm": torch.stack([model.norm.weight.grad, model.norm.bias.grad], 1)}
    errors = {k: ((got[k].double() - want[k]).norm() / want[k].norm()).item() for k in want}
    assert max(errors.values()) <= 1e-4, errors
