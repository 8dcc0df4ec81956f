"""K-FAC / SP-NGD natural-gradient preconditioner and optimizer (pure torch, no Lightning import).

``KFACPreconditioner`` preconditions gradients in place in front of any optimizer; ``KFAC`` is the
preconditioner plus momentum SGD. Curvature blocks (:mod:`.blocks`, extensible with
:func:`register_block`), inverse methods (:mod:`.inverses`), capture hooks (:mod:`.capture`) and the
communicator contract (:mod:`.comm`) are the parts. See docs/kfac.md.
"""

from lightning_lbo.optim.kfac.attention import MultiheadAttentionBlock
from lightning_lbo.optim.kfac.blocks import (
    BLOCK_TYPES,
    Conv1dBlock,
    Conv2dBlock,
    CurvatureBlock,
    EmbeddingBlock,
    KroneckerBlock,
    LinearBlock,
    UnitWiseBlock,
    register_block,
)
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood
from lightning_lbo.optim.kfac.inverses import BlockInverse, InverseMethod
from lightning_lbo.optim.kfac.optimizer import KFAC
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner
from lightning_lbo.optim.kfac.stale import StaleStatistics
from lightning_lbo.optim.kfac.tied import TiedEmbeddingBlock

__all__ = ["KFAC", "KFACPreconditioner", "Communicator", "Fisher", "Likelihood", "InverseMethod", "StaleStatistics",
           "BLOCK_TYPES", "BlockInverse", "CurvatureBlock", "KroneckerBlock", "LinearBlock", "Conv1dBlock",
           "Conv2dBlock", "EmbeddingBlock", "UnitWiseBlock", "MultiheadAttentionBlock", "TiedEmbeddingBlock",
           "register_block"]
