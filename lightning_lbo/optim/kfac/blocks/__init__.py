"""Curvature blocks: one object per preconditioned layer, owning its statistics, factors and inverse.

One file per block type (:mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.unitwise`,
:mod:`.attention`, :mod:`.tied`) on the base (:mod:`.base`: state, verbs, the scaling convention) and
the Kronecker layout (:mod:`.kronecker`); :mod:`.registry` maps module types to block types and walks a
model. Importing this package registers nothing: the default map is built explicitly.
"""

from lightning_lbo.optim.kfac.blocks.attention import MultiheadAttentionBlock
from lightning_lbo.optim.kfac.blocks.base import (
    BlockUse,
    CurvatureBlock,
    Restored,
    _bordered,
    _gram,
    _gram_with_ones,
    _work,
)
from lightning_lbo.optim.kfac.blocks.conv import Conv1dBlock, Conv2dBlock
from lightning_lbo.optim.kfac.blocks.embedding import EmbeddingBlock
from lightning_lbo.optim.kfac.blocks.kronecker import KroneckerBlock
from lightning_lbo.optim.kfac.blocks.linear import EXPAND, REDUCE, LinearBlock, LinearVariant
from lightning_lbo.optim.kfac.blocks.registry import (
    BLOCK_TYPES,
    SHARED_BLOCK_FACTORIES,
    BlockFactory,
    BlockRegistry,
    block_type_for,
    default_block_types,
    find_blocks,
    make_block,
    make_shared_block,
    register_block,
    register_shared_block,
)
from lightning_lbo.optim.kfac.blocks.tied import TiedEmbeddingBlock
from lightning_lbo.optim.kfac.blocks.unitwise import UnitWiseBlock

__all__ = ["BLOCK_TYPES", "SHARED_BLOCK_FACTORIES", "BlockFactory", "BlockRegistry", "BlockUse", "Conv1dBlock",
           "Conv2dBlock", "CurvatureBlock", "EXPAND", "EmbeddingBlock", "KroneckerBlock", "LinearBlock",
           "LinearVariant", "MultiheadAttentionBlock", "REDUCE", "Restored", "TiedEmbeddingBlock", "UnitWiseBlock",
           "block_type_for", "default_block_types", "find_blocks", "make_block", "make_shared_block",
           "register_block", "register_shared_block", "_bordered", "_gram", "_gram_with_ones", "_work"]
