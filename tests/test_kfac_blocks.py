"""K-FAC v2 blocks: Embedding, Conv1d and a layer used twice against brute force; the block registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import BLOCK_TYPES, KFACPreconditioner, LinearBlock, register_block


def _per_example_output_grads(model, layer, x, loss_fn):
    """``[N, uses, *out]``: d loss_i / d y (each use of ``layer``) of every example alone (= N dL/dy_i)."""
    out = []
    for i in range(x.shape[0]):
        store = []
        handle = layer.register_forward_hook(lambda m, a, o, store=store: store.append(o))
        loss = loss_fn(model(x[i:i + 1]), i)
        handle.remove()
        out.append(torch.stack([g[0] for g in torch.autograd.grad(loss, store)]))
    return torch.stack(out)


def _capture(model, x, loss_fn, **kw):
    pre = KFACPreconditioner(model, factor_decay=1.0, factor_update_interval=1, inverse_update_interval=1,
                             kl_clip=None, **kw)
    model.zero_grad()
    loss_fn(model(x), slice(None)).backward()
    pre.step()
    return pre


def test_kfac_embedding_factors_equal_token_counts_and_per_example_brute_force():
    """Embedding: A = diag(token counts) / N (expand over positions), G = (1/N) sum_i mean_t g g^T."""
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3).double()
    head = nn.Linear(3, 2).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = emb, head

        def forward(self, tokens):
            return self.head(torch.tanh(self.emb(tokens)).mean(1))

    model = Net()
    n, t = 5, 4
    x, y = torch.randint(0, 7, (n, t)), torch.randint(0, 2, (n,))
    loss_fn = lambda out, i: F.cross_entropy(out, y[i] if isinstance(i, slice) else y[i:i + 1])  # noqa: E731
    pre = _capture(model, x, loss_fn)
    counts = torch.bincount(x.reshape(-1), minlength=7).double()
    factors = pre.factors(emb)
    torch.testing.assert_close(factors["A"][0].double(), counts / n)
    g = _per_example_output_grads(model, emb, x, loss_fn)[:, 0]  # [N, T, D]
    G_ref = torch.einsum("ntd,nte->de", g, g) / (n * t)
    torch.testing.assert_close(factors["G"][0].double(), G_ref, rtol=1e-5, atol=1e-8)


def test_kfac_embedding_step_equals_dense_kronecker_solve():
    """The preconditioned embedding gradient solves (diag(A) (x) G + lambda I) P = grad (exact damping)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2))
    x = torch.randint(0, 6, (8, 2))
    lam = 0.05
    pre = KFACPreconditioner(model, damping=lam, kl_clip=None)
    model(x).pow(2).sum(1).mean().backward()
    grad = model[0].weight.grad.double().clone()  # [V, D]
    pre.step()
    A, G = pre.factors(model[0])["A"][0].double(), pre.factors(model[0])["G"][0].double()
    # vec over (d, v) row-major of the [D, V] gradient matrix: M = G (x) diag(A)
    M = torch.kron(G, torch.diag(A)) + lam * torch.eye(18, dtype=torch.float64)
    ref = torch.linalg.solve(M, grad.T.reshape(-1)).reshape(3, 6).T
    torch.testing.assert_close(model[0].weight.grad.double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(padding="same", dilation=2, groups=2, bias=False)])
def test_kfac_conv1d_factors_equal_per_example_brute_force(kw):
    """Conv1d (KFC over output positions): A sums patch outer products, G averages output-gradient ones."""
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, **kw).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3).double())
    n = 3
    x, y = torch.randn(n, 4, 9, dtype=torch.float64), torch.randint(0, 3, (n,))
    loss_fn = lambda out, i: F.cross_entropy(out, y[i] if isinstance(i, slice) else y[i:i + 1])  # noqa: E731
    pre = _capture(model, x, loss_fn)
    pad = conv.dilation[0] * 2 if conv.padding == "same" else conv.padding[0] * 2
    xp = F.pad(x, (pad // 2, pad - pad // 2))
    k, d, s, g = 3, conv.dilation[0], conv.stride[0], conv.groups
    length = (xp.shape[2] - d * (k - 1) - 1) // s + 1
    patches = torch.stack([xp[:, :, j * s: j * s + d * (k - 1) + 1: d].reshape(n, g, 4 // g * k)
                           for j in range(length)], 1)  # [N, L, g, d]
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(*patches.shape[:3], 1, dtype=torch.float64)], 3)
    A_ref = torch.einsum("nlgi,nlgj->gij", patches, patches) / n
    gout = _per_example_output_grads(model, conv, x, loss_fn)[:, 0]  # [N, C_out, L]
    gout = gout.reshape(n, g, 6 // g, length).permute(0, 3, 1, 2)
    G_ref = torch.einsum("nlgi,nlgj->gij", gout, gout) / (n * length)
    torch.testing.assert_close(pre.factors(conv)["A"].double(), A_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre.factors(conv)["G"].double(), G_ref, rtol=1e-5, atol=1e-8)


def test_kfac_layer_used_twice_counts_uses_as_positions():
    """A layer called twice in one forward (tied weights): N counts examples once, A sums the uses,
    G averages them (the expand convention); accumulating 2 micro-batches equals one batch."""
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = shared, head

        def forward(self, inp):
            return self.head(self.shared(torch.tanh(self.shared(inp))))

    model = Tied()
    n = 6
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))
    loss_fn = lambda out, i: F.cross_entropy(out, y[i] if isinstance(i, slice) else y[i:i + 1])  # noqa: E731
    pre = _capture(model, x, loss_fn)
    with torch.no_grad():
        inputs = [x, torch.tanh(shared(x))]
    abar = torch.stack([torch.cat([a, torch.ones(n, 1, dtype=torch.float64)], 1) for a in inputs], 1)  # [N, U, 4]
    A_ref = torch.einsum("nui,nuj->ij", abar, abar) / n
    g = _per_example_output_grads(model, shared, x, loss_fn)  # [N, U, 3]
    G_ref = torch.einsum("nui,nuj->ij", g, g) / (n * 2)
    factors = pre.factors(shared)
    torch.testing.assert_close(factors["A"][0].double(), A_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(factors["G"][0].double(), G_ref, rtol=1e-5, atol=1e-8)
    # two accumulated micro-batches (loss / 2) are more examples, not more uses
    model.zero_grad()
    pre2 = KFACPreconditioner(model, factor_decay=1.0, factor_update_interval=1, kl_clip=None)
    for part in (slice(0, 3), slice(3, 6)):
        (loss_fn(model(x[part]), part) / 2).backward()
    pre2.step()
    for stat in ("A", "G"):
        torch.testing.assert_close(pre2.factors(shared)[stat], factors[stat], rtol=1e-6, atol=1e-9)


def test_kfac_block_registry_maps_a_custom_module_type():
    """register_block gives a user module type a block; subclasses of registered types inherit theirs."""

    class Dense(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.in_features, self.out_features = i, o
            self.weight = nn.Parameter(torch.randn(o, i) / i ** 0.5)
            self.bias = nn.Parameter(torch.zeros(o))

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(Dense(4, 3), nn.Tanh(), MyLinear(3, 2))
    with pytest.warns(UserWarning, match=r"0 \(Dense\)"):
        KFACPreconditioner(model)
    register_block(Dense, LinearBlock)
    try:
        pre = KFACPreconditioner(model, kl_clip=None, factor_update_interval=1)
        assert [type(b).__name__ for b in pre.blocks] == ["LinearBlock", "LinearBlock"]
        x = torch.randn(5, 4)
        model(x).pow(2).sum().backward()
        pre.step()
        assert pre.factors(model[0])["A"].shape == (1, 5, 5)
    finally:
        del BLOCK_TYPES[Dense]
    with pytest.raises(TypeError, match="CurvatureBlock subclass"):
        register_block(Dense, nn.Linear)
    with pytest.raises(KeyError, match="preconditioned layers"):
        pre.factors(model[1])
