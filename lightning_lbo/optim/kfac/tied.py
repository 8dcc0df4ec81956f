"""Moved to :mod:`lightning_lbo.optim.kfac.blocks.tied` (this name keeps working)."""

from lightning_lbo.optim.kfac.blocks.tied import TiedDiagonalKronecker, TiedEmbeddingBlock, tied_factors

__all__ = ["TiedEmbeddingBlock", "TiedDiagonalKronecker", "tied_factors"]
