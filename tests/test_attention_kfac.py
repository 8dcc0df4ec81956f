"""K-FAC for nn.MultiheadAttention (q, k, v, out groups) against brute force; user-registered blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.lm import GPT
from lightning_lbo.optim.kfac import KFACPreconditioner
from lightning_lbo.optim.kfac.attention import MultiheadAttentionBlock
from lightning_lbo.optim.kfac.blocks import BLOCK_TYPES, LinearBlock, register_block

E, H = 6, 2


def _reference_attention(mha: nn.MultiheadAttention, xq, xk, xv, mask):
    """Explicit batch-first MHA (matmuls and softmax, no torch attention kernel): output and q, k, v, c."""
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (0, 0, 0)
    q, k, v = xq @ w_q.T + b_q, xk @ w_k.T + b_k, xv @ w_v.T + b_v
    for t in (q, k, v):
        t.retain_grad()
    n, tq, _ = q.shape
    d = E // H
    heads = [t.reshape(n, t.shape[1], H, d).transpose(1, 2) for t in (q, k, v)]
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(d) + mask
    c = (scores.softmax(-1) @ heads[2]).transpose(1, 2).reshape(n, tq, E)
    c.retain_grad()
    y = c @ mha.out_proj.weight.T + (mha.out_proj.bias if mha.out_proj.bias is not None else 0)
    return y, (q, k, v, c)


def _problem(batch_first: bool, bias: bool, seed: int = 0):
    """Cross-attention (T_q = 4, T_k = 5) with a banded mask and one padded key, on fixed random data."""
    g = torch.Generator().manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first)
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    n, tq, tk = 3, 4, 5
    xq, xk = torch.randn(n, tq, E, generator=g), torch.randn(n, tk, E, generator=g)
    attn_mask = torch.ones(tq, tk, dtype=torch.bool).triu(2)  # True: may not attend
    padding = torch.zeros(n, tk, dtype=torch.bool)
    padding[1, -1] = True
    weights = torch.randn(n, tq, E, generator=g)  # the loss: mean over examples of sum <y, weights>
    additive = (torch.zeros(tq, tk).masked_fill(attn_mask, float("-inf")).view(1, 1, tq, tk)
                + torch.zeros(n, tk).masked_fill(padding, float("-inf")).view(n, 1, 1, tk))
    return mha, xq, xk, attn_mask, padding, weights, additive


class _Wrapper(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, xq, xk, attn_mask, padding):
        if not self.mha.batch_first:
            xq, xk = xq.transpose(0, 1), xk.transpose(0, 1)
        y = self.mha(xq, xk, xk, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]
        return y if self.mha.batch_first else y.transpose(0, 1)


def _brute_force_factors(mha, xq, xk, additive, weights):
    """A and G of the four groups from explicit per-example tensors (the convention of kfac/blocks.py)."""
    y, (q, k, v, c) = _reference_attention(mha, xq, xk, xk, additive)
    n = xq.shape[0]
    ((y * weights).sum() / n).backward()
    ones = mha.in_proj_bias is not None
    A, G = [], []
    for a, out in ((xq, q), (xk, k), (xk, v), (c.detach(), None)):
        rows = torch.cat([a, torch.ones(*a.shape[:2], 1)], -1) if ones else a
        A.append(sum(torch.outer(r, r) for r in rows.reshape(-1, rows.shape[-1]).double()) / n)
        grad = (out.grad if out is not None else weights / n) * n  # per-example output gradients
        per_position = [torch.outer(gv, gv) for gv in grad.reshape(-1, E).double()]
        G.append(sum(per_position) / (n * grad.shape[1]))
    return torch.stack(A).float(), torch.stack(G).float()


def _attention_block(pre: KFACPreconditioner) -> MultiheadAttentionBlock:
    blocks = [b for b in pre.blocks if isinstance(b, MultiheadAttentionBlock)]
    assert len(blocks) == 1
    return blocks[0]


def test_reference_attention_equals_torch():
    """The brute-force reference reproduces nn.MultiheadAttention (masks, padding, cross-attention)."""
    mha, xq, xk, attn_mask, padding, _, additive = _problem(batch_first=True, bias=True)
    expected = mha(xq, xk, xk, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]
    torch.testing.assert_close(_reference_attention(mha, xq, xk, xk, additive)[0], expected)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_factors_match_brute_force(batch_first, bias):
    """A and G of q, k, v and out_proj equal explicit per-example sums (cross-attention, causal mask, padding)."""
    mha, xq, xk, attn_mask, padding, weights, additive = _problem(batch_first, bias)
    model = _Wrapper(mha)
    pre = KFACPreconditioner(model, fisher="empirical", factor_update_interval=1, inverse_update_interval=1,
                             kl_clip=None, damping=1e-2)
    ((model(xq, xk, attn_mask, padding) * weights).sum() / xq.shape[0]).backward()
    pre.step()
    block = _attention_block(pre)
    a_ref, g_ref = _brute_force_factors(mha, xq, xk, additive, weights)
    torch.testing.assert_close(block.factors["A"], a_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.factors["G"], g_ref, rtol=1e-4, atol=1e-6)


def test_attention_update_is_the_dense_solve_including_out_proj():
    """Every group's gradient, out_proj's too, becomes (A (x) G + lambda I)^-1 grad (exact damping)."""
    mha, xq, xk, attn_mask, padding, weights, _ = _problem(batch_first=True, bias=True)
    model = _Wrapper(mha)
    damping = 0.05
    pre = KFACPreconditioner(model, fisher="empirical", factor_update_interval=1, inverse_update_interval=1,
                             kl_clip=None, damping=damping, inverse_method="eigen")
    ((model(xq, xk, attn_mask, padding) * weights).sum() / xq.shape[0]).backward()
    block = _attention_block(pre)
    raw = block.grad_matrix().clone()
    raw_out = mha.out_proj.weight.grad.clone()
    pre.step()
    new = block.grad_matrix()
    for j in range(4):
        a, g = block.factors["A"][j].double(), block.factors["G"][j].double()
        # vec (column-major) of G^-1-like solve: (A (x) G) vec(X) = vec(G X A).
        dense = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
        expected = torch.linalg.solve(dense, raw[j].double().T.reshape(-1)).reshape(a.shape[0], g.shape[0]).T
        torch.testing.assert_close(new[j].double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(mha.out_proj.weight.grad, raw_out)  # the old bug: out_proj kept its plain gradient


def test_transformer_layers_and_gpt_fully_preconditioned():
    """Encoder/decoder layers and the reference GPT have every parameter in a K-FAC block (MC Fisher runs)."""
    for model in (nn.TransformerEncoderLayer(E, H, 12, batch_first=True),
                  nn.TransformerDecoderLayer(E, H, 12), GPT(vocab_size=16, seq_len=8, d_model=8, n_heads=2,
                                                            n_layers=2, classes_last=False)):
        pre = KFACPreconditioner(model, fisher="mc" if isinstance(model, GPT) else "empirical")
        covered = {id(p) for b in pre.blocks for p in b.params}
        assert [n for n, p in model.named_parameters() if id(p) not in covered] == []
    tokens = torch.randint(0, 16, (4, 8))
    F.cross_entropy(model(tokens), tokens).backward()
    pre.step(lr=0.1)
    block = [b for b in pre.blocks if isinstance(b, MultiheadAttentionBlock)][0]
    assert torch.isfinite(block.factors["G"]).all() and block.factors["G"].abs().sum() > 0


def test_attention_unsupported_configuration_names_the_fix():
    """kdim != embed_dim and add_bias_kv are rejected with the exclude fix."""
    with pytest.raises(ValueError, match="exclude"):
        MultiheadAttentionBlock(nn.MultiheadAttention(E, H, kdim=4, vdim=4), "attn")
    with pytest.raises(ValueError, match="exclude"):
        MultiheadAttentionBlock(nn.MultiheadAttention(E, H, add_bias_kv=True), "attn")


class _MyLinear(nn.Module):
    """A user's own linear layer (not an nn.Linear subclass)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.3)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_register_block_for_a_user_module_type():
    """register_block(MyLinear, LinearBlock): the user's layer gets the same K-FAC update as nn.Linear."""
    torch.manual_seed(0)
    mine = nn.Sequential(_MyLinear(5, 4), nn.Tanh(), _MyLinear(4, 3))
    torch_linear = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    torch_linear.load_state_dict(mine.state_dict())
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    register_block(_MyLinear, LinearBlock)
    try:
        grads = []
        for model in (mine, torch_linear):
            pre = KFACPreconditioner(model, fisher="empirical", factor_update_interval=1, inverse_update_interval=1)
            assert len(pre.blocks) == 2
            F.cross_entropy(model(x), y).backward()
            raw = model[0].weight.grad.clone()
            pre.step(lr=0.1)
            assert not torch.allclose(model[0].weight.grad, raw)
            grads.append([p.grad for p in model.parameters()])
        for mine_grad, torch_grad in zip(*grads, strict=True):
            torch.testing.assert_close(mine_grad, torch_grad)
    finally:
        BLOCK_TYPES.pop(_MyLinear)


def test_attention_block_resumes_from_checkpoint():
    """A preconditioner restored from state_dict gives the attention layer the same next update."""
    mha, xq, xk, attn_mask, padding, weights, _ = _problem(batch_first=True, bias=True)

    def step(model, pre):
        model.zero_grad()
        ((model(xq, xk, attn_mask, padding) * weights).sum() / xq.shape[0]).backward()
        pre.step()
        return _attention_block(pre).grad_matrix().clone()

    kwargs = dict(fisher="empirical", factor_update_interval=2, inverse_update_interval=2, kl_clip=None)
    model = _Wrapper(mha)
    pre = KFACPreconditioner(model, **kwargs)
    step(model, pre)
    state = pre.state_dict()
    with torch.no_grad():  # an optimizer step: fresh statistics would now differ from the checkpointed ones
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = step(model, pre)  # a step that reuses the checkpointed factors and inverse
    restored = KFACPreconditioner(model, **kwargs)
    restored.load_state_dict(state)
    torch.testing.assert_close(step(model, restored), expected)


def test_mc_fisher_capture_frees_each_steps_graph():
    """With fisher='mc' the forward's graph is freed after the backward (the MC hook once kept it alive)."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    pre = KFACPreconditioner(model, fisher="mc", factor_update_interval=1, inverse_update_interval=1, kl_clip=None)
    out = model(torch.randn(16, 4))
    alive = weakref.ref(out)
    F.cross_entropy(out, torch.randint(0, 3, (16,))).backward()
    del out
    gc.collect()
    assert alive() is None
    pre.step()
    assert all(b.refreshes["G"] == 1 for b in pre.blocks)
