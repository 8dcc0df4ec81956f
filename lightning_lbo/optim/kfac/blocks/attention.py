r"""K-FAC for ``nn.MultiheadAttention``: the q, k, v input projections and the output projection.

``nn.MultiheadAttention`` keeps its input projection as a bare parameter (``in_proj_weight``, the
q, k and v maps packed as ``[3E, E]``) and calls ``F.multi_head_attention_forward``, which uses
``out_proj.weight`` directly and never calls ``out_proj``'s forward: hooks on ``out_proj`` never fire.
This block therefore hooks the attention module itself and treats its four weight matrices as four
Kronecker *groups* of one block (the layout of a grouped convolution), each a linear map over the
sequence positions (the "expand" convention of :mod:`.blocks`):

.. math::

    q = x_q W_q^T + b_q,\quad k = x_k W_k^T + b_k,\quad v = x_v W_v^T + b_v,\quad
    y = c\, W_o^T + b_o,\quad c = \mathrm{attention}(q, k, v),

    A_j = \frac{1}{N}\sum_i \sum_t \bar a^{(j)}_{i,t} \bar a^{(j)\,T}_{i,t}, \qquad
    G_j = \frac{1}{N}\sum_i \frac{1}{T_j}\sum_t g^{(j)}_{i,t} g^{(j)\,T}_{i,t}, \qquad
    j \in \{q, k, v, o\},

with inputs ``a^(q) = x_q``, ``a^(k) = x_k``, ``a^(v) = x_v``, ``a^(o) = c`` and output gradients
``g^(j) = N dL/d(q, k, v, y)``. ``A: [4, E(+1), E(+1)]``, ``G: [4, E, E]``; the gradient matrix is
``[4, E, E(+1)]`` (rows of ``in_proj_weight`` split into q, k, v, then ``out_proj``; biases as the
last column). Treating q, k and v as three blocks drops their cross terms in ``G``; it is the
approximation K-FAC makes for any transformer whose q, k, v projections are separate ``nn.Linear``
layers, so packed and unpacked attention are preconditioned alike.

Neither ``c`` nor ``dL/d(q, k, v)`` exists outside ``F.multi_head_attention_forward``. On refresh
steps only, the block recomputes them from the hooked call (query, key, value and masks): ``c`` in
the forward hook (no graph), and ``dL/d(q, k, v)`` in the output-gradient hook by one backward of
the recomputed attention with the output gradient ``dL/dy``. The recomputation leaves out attention
dropout (exact with ``dropout=0`` or in evaluation; with dropout the factors are those of the
network without it, an approximation of the statistic, never of the gradient). Supported: packed
projections (``kdim == vdim == embed_dim``), no ``add_bias_kv`` / ``add_zero_attn``; other
configurations are rejected with the fix (exclude the layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim._torch_private import qkv_same_embed_dim
from lightning_lbo.optim.kfac.blocks.base import _gram, _gram_with_ones
from lightning_lbo.optim.kfac.blocks.kronecker import KroneckerBlock

__all__ = ["MultiheadAttentionBlock", "AttentionCall", "attention_context"]


@dataclass
class AttentionCall:
    """One call of a ``MultiheadAttention``, batch first and detached: what the recomputation needs.

    ``query: [N, T_q, E]``, ``key``/``value: [N, T_k, E]``; ``mask``: ``None`` or an additive float
    mask broadcastable to ``[N, H, T_q, T_k]`` (attention mask and key padding merged).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    context: torch.Tensor | None = None  # c = attention(q, k, v) before out_proj, [N, T_q, E]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (``True`` = may not attend, PyTorch's MHA convention) as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _merged_mask(module: nn.MultiheadAttention, n: int, t_q: int, t_k: int, attn_mask: torch.Tensor | None,
                 key_padding_mask: torch.Tensor | None, is_causal: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """Attention mask and key padding mask as one additive mask ``[N or 1, H or 1, T_q, T_k]``."""
    h = module.num_heads
    if attn_mask is None and is_causal:  # MHA requires the mask with the hint; kept for direct calls
        attn_mask = torch.ones(t_q, t_k, dtype=torch.bool, device=module.in_proj_weight.device).triu(1)
    mask = _additive(attn_mask, dtype)
    if mask is not None:
        mask = mask.view(1, 1, t_q, t_k) if mask.dim() == 2 else mask.view(n, h, t_q, t_k)
    padding = _additive(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.view(n, 1, 1, t_k)
        mask = padding if mask is None else mask + padding
    return mask


def attention_context(module: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """``c = softmax(q k^T / sqrt(d) + mask) v`` per head, from projected ``q: [N, T_q, E]``, ``k, v: [N, T_k, E]``.

    Returns ``[N, T_q, E]`` (heads concatenated), the input of ``out_proj``.
    """
    n, t_q, e = q.shape
    h = module.num_heads
    heads = [t.reshape(n, t.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v)]
    context = F.scaled_dot_product_attention(*heads, attn_mask=mask)
    return context.transpose(1, 2).reshape(n, t_q, e)


class MultiheadAttentionBlock(KroneckerBlock):
    """K-FAC block of ``nn.MultiheadAttention``: four Kronecker groups (q, k, v, out); see the module docstring.

    Args:
        module: the attention layer.
        name: its qualified name.
        factor_dtype: dtype of the factors.
    """

    groups = 4

    def __init__(self, module: nn.MultiheadAttention, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        if not qkv_same_embed_dim(module):
            raise ValueError(f"K-FAC supports {name} (nn.MultiheadAttention) only with kdim == vdim == embed_dim "
                             "(packed in_proj_weight); exclude it (exclude=[nn.MultiheadAttention]).")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"K-FAC does not support add_bias_kv / add_zero_attn in {name}; exclude it "
                             "(exclude=[nn.MultiheadAttention]).")
        if (module.in_proj_bias is None) != (module.out_proj.bias is None):
            raise ValueError(f"{name}: in_proj and out_proj must both have a bias or both have none for K-FAC's "
                             "grouped layout; exclude it (exclude=[nn.MultiheadAttention]).")
        # The base class reads the block's weight and bias off the module; here they are in_proj's.
        super().__init__(SimpleNamespace(weight=module.in_proj_weight, bias=module.in_proj_bias), name, factor_dtype)
        self.module = module

    @classmethod
    def trainable(cls, module: nn.Module) -> bool:
        return isinstance(getattr(module, "in_proj_weight", None), nn.Parameter)

    @property
    def params(self) -> list[nn.Parameter]:
        out = self.module.out_proj
        if self.bias is None:
            return [self.weight, out.weight]
        return [self.weight, self.bias, out.weight, out.bias]

    @property
    def dims(self) -> tuple[int, int]:
        e = self.module.embed_dim
        return e + (self.bias is not None), e

    # ---- layout: [4, E, E(+1)] = q, k, v rows of in_proj, then out_proj ------------------------------------
    def _matrix(self, in_w: torch.Tensor, in_b: torch.Tensor | None, out_w: torch.Tensor,
                out_b: torch.Tensor | None) -> torch.Tensor:
        e = self.module.embed_dim
        w = torch.cat([in_w.reshape(3, e, e), out_w.reshape(1, e, e)]).float()
        if in_b is None:
            return w
        return torch.cat([w, torch.cat([in_b.reshape(3, e, 1), out_b.reshape(1, e, 1)]).float()], dim=2)

    def grad_matrix(self) -> torch.Tensor:
        out = self.module.out_proj
        bias = self.bias is not None
        return self._matrix(self.weight.grad, self.bias.grad if bias else None, out.weight.grad,
                            out.bias.grad if bias else None)

    def param_matrix(self) -> torch.Tensor:
        out = self.module.out_proj
        return self._matrix(self.weight, self.bias, out.weight, out.bias if self.bias is not None else None)

    def set_grad(self, matrix: torch.Tensor) -> None:
        e = self.module.embed_dim
        out = self.module.out_proj
        w = matrix[:, :, :e]
        self.weight.grad.copy_(w[:3].reshape(3 * e, e))
        out.weight.grad.copy_(w[3])
        if self.bias is not None:
            self.bias.grad.copy_(matrix[:3, :, e].reshape(3 * e))
            out.bias.grad.copy_(matrix[3, :, e])

    # ---- capture -------------------------------------------------------------------------------------------
    def hook_io(self, inputs: tuple, kwargs: dict[str, Any], output: Any) -> tuple[AttentionCall, int, torch.Tensor]:
        """The hooked call as ``(AttentionCall, examples, attention output)``, batch first and detached."""
        m = self.module
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        call = dict(zip(names, inputs, strict=False))
        call.update(kwargs)
        y = output[0] if isinstance(output, tuple) else output
        query, key, value = (call[n].detach() for n in ("query", "key", "value"))
        if query.dim() == 2:  # unbatched [T, E]: one example
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not m.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, t_q, _ = query.shape
        kpm = call.get("key_padding_mask")
        mask = _merged_mask(m, n, t_q, key.shape[1], call.get("attn_mask"),
                            kpm.reshape(n, -1) if kpm is not None else None, bool(call.get("is_causal", False)),
                            query.dtype)
        return AttentionCall(query, key, value, mask), n, y

    def _projections(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.module  # its live attributes: under fully_shard the gathered parameters while FSDP computes
        w = m.in_proj_weight.detach().chunk(3)
        b = m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, wi, bi) for x, wi, bi in zip((call.query, call.key, call.value), w, b, strict=True))

    def input_statistics(self, x: AttentionCall, due: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
        if "A" not in due:
            return {}, x
        with torch.no_grad():
            x.context = attention_context(self.module, *self._projections(x), x.mask)
        gram = _gram_with_ones if self.bias is not None else _gram
        rows = [t.reshape(1, -1, t.shape[-1]) for t in (x.query, x.key, x.value, x.context)]
        return {"A": torch.cat([gram(r, self.factor_dtype) for r in rows])}, x

    def output_statistic(self, grad: torch.Tensor, context: AttentionCall) -> torch.Tensor:
        """``G`` of the four groups from ``dL/dy`` (``[N, T_q, E]`` or the module's layout) and the call."""
        m = self.module
        if grad.dim() == 2:
            grad = grad.unsqueeze(0)
        elif not m.batch_first:
            grad = grad.transpose(0, 1)
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in self._projections(context)]
            y = F.linear(attention_context(m, *qkv, context.mask), m.out_proj.weight.detach(),
                         None if m.out_proj.bias is None else m.out_proj.bias.detach())
            d_qkv = torch.autograd.grad(y, qkv, grad.to(y.dtype))
        grams = [self._g_gram(g.reshape(1, -1, g.shape[-1]), g.shape[1]) for g in (*d_qkv, grad)]
        return torch.cat(grams)

