"""Moved to :mod:`lightning_lbo.optim.kfac.blocks.attention` (this name keeps working)."""

from lightning_lbo.optim.kfac.blocks.attention import AttentionCall, MultiheadAttentionBlock, attention_context

__all__ = ["MultiheadAttentionBlock", "AttentionCall", "attention_context"]
