"""The one place the pure-torch core reads private names of torch (pure torch: no Lightning import).

Each accessor names the private attribute it reads, so that a torch release that moves it breaks here,
and tests/test_torch_private.py fails naming the accessor, instead of a K-FAC step failing far away.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def reversed_padding(conv: nn.Module) -> tuple[int, ...]:
    """``F.pad`` padding of a conv with a non-zero ``padding_mode``, as the layer pads its input itself
    (``_ConvNd._reversed_padding_repeated_twice``: last dimension first, each side repeated)."""
    return conv._reversed_padding_repeated_twice


def qkv_same_embed_dim(attention: nn.MultiheadAttention) -> bool:
    """Whether ``nn.MultiheadAttention`` packs q, k, v in one ``in_proj_weight`` (``_qkv_same_embed_dim``)."""
    return attention._qkv_same_embed_dim


def grad_scaler_scale(scaler: Any) -> torch.Tensor | None:
    """The current loss scale of an AMP ``GradScaler`` as a device tensor, without the host sync of
    ``get_scale()`` (``GradScaler._scale``; ``None`` before the first scaled backward)."""
    return getattr(scaler, "_scale", None)
