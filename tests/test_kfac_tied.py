"""Tied input/output embeddings: the TiedEmbeddingBlock's factors and step against brute force (V=7, d=3)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import KFAC, TiedEmbeddingBlock
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner
from lightning_lbo.optim.kfac.tied import tied_factors

N, T, V, D = 4, 5, 7, 3


class _TiedNet(nn.Module):
    def __init__(self, head_bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def _run(model, damping=1e-3, seed=0, **kwargs):
    """One forward/backward/step; returns the preconditioner, the test's own records and the raw gradients."""
    seen = {}

    def record(input_key, grad_key):
        def hook(module, inputs, output):
            seen[input_key] = inputs[0].detach()
            output.register_hook(lambda g: seen.__setitem__(grad_key, g.detach()))
        return hook

    model.emb.register_forward_hook(record("tokens", "g_emb"))
    model.head.register_forward_hook(record("h", "g_head"))
    pre = KFACPreconditioner(model, damping=damping, factor_update_interval=1, inverse_update_interval=1,
                             kl_clip=None, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (N, T), generator=gen)
    targets = torch.randint(0, V, (N, T), generator=gen)
    nn.functional.cross_entropy(model(tokens).reshape(-1, V), targets.reshape(-1)).backward()
    grads = {name: p.grad.double().clone() for name, p in model.named_parameters()}
    pre.step()
    return pre, seen, grads


def _brute_force_statistics(seen, bias: bool):
    """The four statistics by explicit loops over examples and positions (fp64, per-example gradients N dL/dy)."""
    A, G = torch.zeros(V, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    d_out = D + bias
    A_head, G_head = torch.zeros(d_out, d_out, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for i in range(N):
        for t in range(T):
            A[seen["tokens"][i, t]] += 1.0 / N
            g = N * seen["g_emb"][i, t].double()
            G += torch.outer(g, g) / (N * T)
            h = seen["h"][i, t].double()
            h = torch.cat([h, torch.ones(1, dtype=torch.float64)]) if bias else h
            A_head += torch.outer(h, h) / N
            G_head += (N * seen["g_head"][i, t].double()) ** 2 / (N * T)
    return A, G, A_head, G_head


def _convention(A, G, A_head, G_head):
    """The trace-weighted Kronecker sum written out with dense matrices: U (V x V), W (d' x d')."""
    d_out = A_head.shape[0]
    U_e, U_h = torch.diag(A), torch.diag(G_head)
    W_e, W_h = torch.zeros(d_out, d_out, dtype=torch.float64), A_head
    W_e[:D, :D] = G
    tu = [U.trace() / V for U in (U_e, U_h)]
    tw = [W.trace() / d_out for W in (W_e, W_h)]
    mass = tu[0] * tw[0] + tu[1] * tw[1]
    return (tw[0] * U_e + tw[1] * U_h) / mass, tu[0] * W_e + tu[1] * W_h


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_tied_embedding_factors_and_step_match_brute_force(bias):
    """Statistics of both uses equal explicit loops; the step equals a dense fp64 solve of (U (x) W + lam I)."""
    torch.manual_seed(0)
    model = _TiedNet(head_bias=bias)
    pre, seen, grads = _run(model, damping=1e-3)
    block = pre.block(model.head)
    assert isinstance(block, TiedEmbeddingBlock) and block is pre.block(model.emb)
    A, G, A_head, G_head = _brute_force_statistics(seen, bias)
    factors = pre.factors(model.emb)
    for name, want in (("A", A), ("G", G), ("A_head", A_head), ("G_head", G_head)):
        got = factors[name][0].double()
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
    U, W = _convention(A, G, A_head, G_head)
    combined = tied_factors(factors, torch.float64)
    assert torch.allclose(torch.diag(combined["A"][0]), U, rtol=1e-10, atol=1e-14)
    assert torch.allclose(combined["G"][0], W, rtol=1e-10, atol=1e-14)
    grad = torch.cat([grads["emb.weight"], grads["head.bias"].unsqueeze(1)], 1) if bias else grads["emb.weight"]
    d_out = D + bias
    want = torch.linalg.solve(torch.kron(U, W) + 1e-3 * torch.eye(V * d_out, dtype=torch.float64),
                              grad.reshape(-1)).reshape(V, d_out)
    got = torch.cat([model.emb.weight.grad, model.head.bias.grad.unsqueeze(1)], 1) if bias else model.emb.weight.grad
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5


def test_kfac_tied_sum_is_exact_when_the_uses_share_a_factor_and_keeps_the_trace():
    """The convention's properties: exact for U_h = c U_e (and W_h = c W_e), trace-preserving, scale-invariant."""
    g = torch.Generator().manual_seed(3)

    def psd(n):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        return m @ m.T

    a, g_head = torch.rand(V, generator=g, dtype=torch.float64), torch.rand(V, generator=g, dtype=torch.float64)
    G, A_head = psd(D), psd(D)
    W_e = G

    def kron_sum(a, G, A_head, g_head):
        out = tied_factors({"A": a[None], "G": G[None], "A_head": A_head[None], "G_head": g_head[None]}, torch.float64)
        return torch.kron(torch.diag(out["A"][0]), out["G"][0])

    exact = torch.kron(torch.diag(a), W_e) + torch.kron(torch.diag(2.5 * a), A_head)
    assert torch.allclose(kron_sum(a, G, A_head, 2.5 * a), exact, rtol=1e-12)
    exact = torch.kron(torch.diag(a), W_e) + torch.kron(torch.diag(g_head), 0.3 * W_e)
    assert torch.allclose(kron_sum(a, G, 0.3 * G, g_head), exact, rtol=1e-12)
    full = torch.kron(torch.diag(a), W_e) + torch.kron(torch.diag(g_head), A_head)
    assert torch.allclose(kron_sum(a, G, A_head, g_head).trace(), full.trace(), rtol=1e-12)
    assert torch.allclose(kron_sum(4.0 * a, G / 4.0, A_head, g_head), kron_sum(a, G, A_head, g_head), rtol=1e-12)


def test_kfac_tied_model_is_fully_preconditioned_and_trains():
    """Every parameter of a tied model is in a K-FAC block (no plain-update warning); the loss goes down."""
    torch.manual_seed(0)
    model = _TiedNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=1, inverse_update_interval=1)
    covered = {id(p) for block in opt.preconditioner.blocks for p in block.params}
    assert covered == {id(p) for p in model.parameters()}
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (32, T), generator=gen)
    targets = (tokens + 1) % V
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, V), targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_kfac_tied_checkpoint_resumes_bit_for_bit():
    """state_dict / load_state_dict of the four statistics: a resumed preconditioner gives the same step."""
    torch.manual_seed(0)
    model = _TiedNet()
    pre, _, _ = _run(model)
    twin = _TiedNet()
    twin.load_state_dict(model.state_dict())
    copy = KFACPreconditioner(twin, damping=1e-3, factor_update_interval=1, inverse_update_interval=1, kl_clip=None)
    copy.load_state_dict(pre.state_dict())
    for net in (model, twin):
        net.zero_grad()
        tokens = torch.arange(N * T).reshape(N, T) % V
        nn.functional.cross_entropy(net(tokens).reshape(-1, V), tokens.reshape(-1)).backward()
    pre.discard_pending()
    copy.discard_pending()
    pre.step()
    copy.step()
    assert torch.equal(model.emb.weight.grad, twin.emb.weight.grad)


def test_kfac_shared_linear_weights_keep_the_plain_update_with_a_warning():
    """A sharing pattern no block covers (two nn.Linear layers): both get the plain update, named in a warning."""
    shared = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    shared[2].weight = shared[0].weight
    with pytest.warns(UserWarning, match=r"2 \(Linear, shares a parameter with 0\)"):
        pre = KFACPreconditioner(shared)
    assert [block.name for block in pre.blocks] == ["3"]


def test_kfac_gpt_with_tied_embeddings_is_fully_preconditioned():
    """lm.GPT(tie_embeddings=True): one tied block for token embedding + head, every parameter preconditioned."""
    from lightning_lbo.lm import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=11, seq_len=6, d_model=8, n_heads=2, n_layers=1, tie_embeddings=True)
    assert model.head.weight is model.token_embedding.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre = KFACPreconditioner(model, factor_update_interval=1, inverse_update_interval=1, kl_clip=None)
    assert isinstance(pre.block(model.head), TiedEmbeddingBlock)
    assert {id(p) for block in pre.blocks for p in block.params} == {id(p) for p in model.parameters()}
    tokens = torch.randint(0, 11, (3, 6))
    nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1)).backward()
    pre.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _tied_two_ranks(rank, world_size):
    from lightning_lbo.optim.kfac.comm import Communicator
    from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

    gen = torch.Generator().manual_seed(7)
    tokens, targets = torch.randint(0, V, (2 * N, T), generator=gen), torch.randint(0, V, (2 * N, T), generator=gen)
    results = []
    shard = slice(rank * N, (rank + 1) * N)
    for comm, rows in ((Communicator(), slice(None)), (TorchDistributedCommunicator(), shard)):
        torch.manual_seed(0)
        model = _TiedNet()
        pre = KFACPreconditioner(model, damping=1e-3, factor_update_interval=1, inverse_update_interval=1,
                                 kl_clip=None, comm=comm)
        logits = model(tokens[rows])
        nn.functional.cross_entropy(logits.reshape(-1, V), targets[rows].reshape(-1)).backward()
        pre.step()
        results.append(pre.factors(model.emb))
    for name, want in results[0].items():  # 2 ranks x N examples == 1 process x 2N examples
        torch.testing.assert_close(results[1][name], want, rtol=1e-10, atol=1e-12)


def test_kfac_tied_block_two_ranks_match_one_process():
    """The four tied statistics averaged over 2 gloo ranks (half the batch each) equal one process's."""
    from tests.helpers.ddp import spawn_gloo

    spawn_gloo(_tied_two_ranks, world_size=2)


def test_kfac_tied_block_with_mc_fisher_samples_both_uses():
    """fisher='mc': the sampled-label backward reaches both uses (embedding output and logits)."""
    torch.manual_seed(0)
    model = _TiedNet()
    pre, _, _ = _run(model, fisher="mc")
    factors = pre.factors(model.head)
    assert set(factors) == {"A", "G", "A_head", "G_head"}
    assert all(torch.isfinite(f).all() for f in factors.values())
    assert pre.block(model.head).refreshes == {"A": 1, "G": 1, "A_head": 1, "G_head": 1}
    assert factors["G_head"].sum() > 0 and factors["G"].diagonal(dim1=1, dim2=2).sum() > 0
