"""K-FAC curvature blocks against brute-force per-example computations and dense solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import KFACPreconditioner
from lightning_lbo.optim.kfac.inverses import WoodburyKronecker


def _capture(model, x, loss_fn, **kw):
    """One captured step (fresh factors, every statistic due); returns the preconditioner."""
    pre = KFACPreconditioner(model, factor_decay=1.0, factor_update_interval=1, inverse_update_interval=1,
                             kl_clip=None, **kw)
    model.zero_grad()
    loss_fn(model(x)).backward()
    pre.step()
    return pre


def _brute_patches(x, conv):
    """Explicit im2col by loops: ``[N, L, groups, C_in/groups*kh*kw]``, independent of F.unfold."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    sh, sw = conv.stride
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    else:
        ph, pw = conv.padding
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, H, W = x.shape
    oh = (H - dh * (kh - 1) - 1) // sh + 1
    ow = (W - dw * (kw - 1) - 1) // sw + 1
    g = conv.groups
    rows = []
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            rows.append(patch.reshape(n, g, c // g * kh * kw))
    return torch.stack(rows, dim=1)


def test_kfac_linear_factors_equal_per_example_brute_force():
    """Linear: A = E[abar abar^T], G = E[g g^T] with per-example output gradients g."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    pre = _capture(model, x, lambda out: F.cross_entropy(out, y))
    for st, layer_in, layer in ((pre.blocks[0], x, model[0]), (pre.blocks[1], torch.tanh(model[0](x)), model[2])):
        abar = torch.cat([layer_in, torch.ones(7, 1, dtype=torch.float64)], 1)
        A_ref = abar.T @ abar / 7
        grads = []
        for i in range(7):
            store = {}
            h = layer.register_forward_hook(lambda m, a, o, store=store: store.__setitem__("y", o))
            out = model(x[i:i + 1])
            h.remove()
            grads.append(torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), store["y"])[0][0])
        g = torch.stack(grads)
        G_ref = g.T @ g / 7
        torch.testing.assert_close(st.factors["A"][0].double(), A_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.factors["G"][0].double(), G_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [
    dict(stride=2, padding=1),
    dict(stride=1, padding="same", dilation=2),
    dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=2),
    dict(stride=1, padding=1, groups=4, bias=False),
])
def test_kfac_conv2d_factors_equal_per_example_brute_force(kw):
    """Conv2d (KFC): A sums patch outer products over locations, G averages them; gradient layout matches."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, **kw).double()
    head = nn.Linear(8, 3).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    n = 3
    x, y = torch.randn(n, 4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    pre = _capture(model, x, lambda out: F.cross_entropy(out, y))
    st = pre.blocks[0]
    patches = _brute_patches(x, conv)  # [N, L, g, d]
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(*patches.shape[:3], 1, dtype=torch.float64)], 3)
    L, g = patches.shape[1], conv.groups
    A_ref = torch.einsum("nlgi,nlgj->gij", patches, patches) / n
    grads = []
    for i in range(n):
        store = {}
        h = conv.register_forward_hook(lambda m, a, o, store=store: store.__setitem__("y", o))
        out = model(x[i:i + 1])
        h.remove()
        grads.append(torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), store["y"])[0][0])
    gout = torch.stack(grads).reshape(n, g, 8 // g, L).permute(0, 3, 1, 2)  # [N, L, g, out/g]
    G_ref = torch.einsum("nlgi,nlgj->gij", gout, gout) / (n * L)
    torch.testing.assert_close(st.factors["A"].double(), A_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.factors["G"].double(), G_ref, rtol=1e-5, atol=1e-8)
    # The gradient as [groups, d_g, d_a] is sum_t g_t abar_t^T averaged over examples (layout check).
    conv.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad_ref = torch.einsum("nlgo,nlgi->goi", gout, patches) / n
    torch.testing.assert_close(st.grad_matrix().double(), grad_ref, rtol=1e-4, atol=1e-6)


def test_kfac_linear_nd_expand_and_reduce_factors():
    """N-D Linear: expand treats positions like conv locations; reduce averages a and sums g over them."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    for variant in ("expand", "reduce"):
        lin = nn.Linear(3, 2).double()
        model = nn.Sequential(lin)
        pre = _capture(model, x, lambda out: out.pow(2).sum(dim=(1, 2)).mean(), linear_variant=variant)
        out = lin(x)
        g = 4 * torch.autograd.grad(out.pow(2).sum(dim=(1, 2)).mean(), out)[0]  # per-example
        abar = torch.cat([x, torch.ones(4, 5, 1, dtype=torch.float64)], 2)
        if variant == "expand":
            A_ref = torch.einsum("nti,ntj->ij", abar, abar) / 4
            G_ref = torch.einsum("nti,ntj->ij", g, g) / (4 * 5)
        else:
            a, gs = abar.mean(1), g.sum(1)
            A_ref, G_ref = a.T @ a / 4, gs.T @ gs / 4
        torch.testing.assert_close(pre.blocks[0].factors["A"][0].double(), A_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pre.blocks[0].factors["G"][0].double(), G_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_kfac_preconditioned_gradient_equals_dense_kronecker_solve(method, layer):
    """P = (A (x) G + damping)^{-1} grad (eigen: exact damping; cholesky: factored Tikhonov with pi)."""
    torch.manual_seed(0)
    lam = 0.05
    if layer == "linear":
        mod = nn.Linear(3, 2)
        model, x = nn.Sequential(mod, nn.Tanh(), nn.Linear(2, 2)), torch.randn(6, 3)
    else:
        mod = nn.Conv2d(2, 4, 2, groups=2)
        model = nn.Sequential(mod, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
        x = torch.randn(3, 2, 3, 3)
    pre = KFACPreconditioner(model, damping=lam, factor_decay=1.0, kl_clip=None, inverse_method=method)
    model.zero_grad()
    model(x).pow(2).sum(1).mean().backward()
    st = pre.blocks[0]
    grad = st.grad_matrix().double().clone()
    pre.step()
    A, G = st.factors["A"].double(), st.factors["G"].double()
    for k in range(st.groups):
        a, g = A[k], G[k]
        if method == "eigen":
            M = torch.kron(g, a) + lam * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
        else:
            pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
            eye_a, eye_g = torch.eye(a.shape[0], dtype=torch.float64), torch.eye(g.shape[0], dtype=torch.float64)
            M = torch.kron(g + lam ** 0.5 / pi * eye_g, a + pi * lam ** 0.5 * eye_a)
        ref = torch.linalg.solve(M, grad[k].reshape(-1)).reshape(grad[k].shape)  # row-major vec
        torch.testing.assert_close(st.grad_matrix()[k].double(), ref, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["bn2d", "bn1d", "ln"])
def test_kfac_unit_wise_norm_block_equals_explicit_2x2_formula(norm):
    """SP-NGD unit-wise Fisher: F_c = E_i[v v^T], v_i = N (sum g x_hat, sum g); P_c = (F_c + lam I)^{-1} grad_c."""
    torch.manual_seed(0)
    lam, n = 1e-2, 6
    if norm == "bn2d":
        layer, x = nn.BatchNorm2d(3), torch.randn(n, 3, 4, 4)
        dims, unit_dim = (0, 2, 3), 1
    elif norm == "bn1d":
        layer, x = nn.BatchNorm1d(3), torch.randn(n, 3)
        dims, unit_dim = (0,), 1
    else:
        layer, x = nn.LayerNorm(3), torch.randn(n, 5, 3)
        dims, unit_dim = (2,), 2
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    w = torch.randn(x.shape)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = layer

        def forward(self, inp):
            return self.norm(inp)

    model = Net()
    pre = KFACPreconditioner(model, damping=lam, factor_decay=1.0, kl_clip=None)
    out = model(x)
    out.retain_grad()
    ((torch.tanh(out) * w).sum() / n).backward()
    gy = out.grad.double()
    grad = torch.stack([layer.weight.grad.double().clone(), layer.bias.grad.double().clone()], 1)
    pre.step()
    xd = x.double()
    mean = xd.mean(dims, keepdim=True)
    var = xd.var(dims, unbiased=False, keepdim=True)
    x_hat = (xd - mean) / torch.sqrt(var + layer.eps)
    other = [d for d in range(1, x.dim()) if d != unit_dim]
    v_gamma = n * (gy * x_hat).sum(other) if other else n * gy * x_hat
    v_beta = n * gy.sum(other) if other else n * gy
    v = torch.stack([v_gamma, v_beta], 2)  # [N, units, 2]
    F_ref = torch.einsum("nuk,nul->ukl", v, v) / n
    torch.testing.assert_close(pre.blocks[0].factors["F"].double(), F_ref, rtol=1e-4, atol=1e-6)
    P_ref = torch.linalg.solve(F_ref + lam * torch.eye(2, dtype=torch.float64), grad.unsqueeze(2)).squeeze(2)
    P = torch.stack([layer.weight.grad, layer.bias.grad], 1).double()
    torch.testing.assert_close(P, P_ref, rtol=1e-4, atol=1e-6)


def test_kfac_mc_fisher_converges_to_exact_fisher():
    """Sampled-label G of a softmax output layer converges to E_x[diag(p) - p p^T]."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin)
    x = torch.randn(8, 3).repeat(64, 1)
    pre = KFACPreconditioner(model, fisher="mc", factor_decay=1.0, factor_update_interval=1, kl_clip=None)
    total, refreshes = torch.zeros(4, 4), 150
    for _ in range(refreshes):
        model.zero_grad()
        F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
        pre.step()
        total += pre.blocks[0].factors["G"][0]
    with torch.no_grad():
        p = torch.softmax(model(x[:8]), 1)
    exact = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
    assert (total / refreshes - exact).abs().max() < 0.012  # ~5 standard errors of 76,800 samples
    assert (pre.blocks[0].factors["G"][0] - exact).abs().max() > 1e-3  # a single refresh is noisy


def test_kfac_woodbury_low_rank_inverse_equals_dense_inverse():
    """Fresh factors with fewer rows than d_A: the Woodbury A-side inverse gives the dense result."""
    grads = []
    for low_rank in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 3))
        pre = KFACPreconditioner(model, kl_clip=None, low_rank_inverse=low_rank, damping=1e-2)
        x, y = torch.randn(5, 8, 4, 4), torch.randint(0, 3, (5,))
        F.cross_entropy(model(x), y).backward()
        pre.step()
        assert all(isinstance(st.inverse, WoodburyKronecker) == low_rank for st in pre.blocks)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_kfac_fp64_model_gets_fp64_factors_and_an_fp64_preconditioned_gradient():
    """factor_dtype follows an fp64 model by default; the step matches a dense fp64 solve to 1e-10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    lam = 1e-3
    pre = KFACPreconditioner(model, damping=lam, kl_clip=None, inverse_method="eigen")
    model(torch.randn(16, 3, dtype=torch.float64)).pow(2).sum(1).mean().backward()
    grad = pre.blocks[0].grad_matrix()[0].clone()
    pre.step()
    A, G = pre.factors(model[0])["A"][0], pre.factors(model[0])["G"][0]
    assert pre.factor_dtype == torch.float64 and A.dtype == torch.float64
    M = torch.kron(G, A) + lam * torch.eye(16, dtype=torch.float64)
    ref = torch.linalg.solve(M, grad.reshape(-1)).reshape(4, 4)
    torch.testing.assert_close(pre.blocks[0].grad_matrix()[0], ref, rtol=1e-10, atol=1e-12)
    assert KFACPreconditioner(nn.Linear(2, 2)).factor_dtype == torch.float32
