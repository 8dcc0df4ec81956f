"""K-FAC / SP-NGD natural-gradient preconditioner and optimizer (pure torch, no Lightning import).

``KFACPreconditioner`` preconditions gradients in place in front of any optimizer; ``KFAC`` is the
preconditioner plus momentum SGD. Factor types (:mod:`.factors`), curvature blocks (:mod:`.blocks`,
extensible per preconditioner with ``block_types=`` or globally with :func:`register_block`), inverse
methods (:mod:`.inverses`), capture hooks (:mod:`.capture`), settings (:mod:`.settings`) and the
communicator contract (:mod:`.comm`) are the parts. See docs/kfac.md.
"""

from lightning_lbo.optim.kfac.blocks import (
    BLOCK_TYPES,
    Conv1dBlock,
    Conv2dBlock,
    CurvatureBlock,
    EmbeddingBlock,
    KroneckerBlock,
    LinearBlock,
    LinearVariant,
    MultiheadAttentionBlock,
    TiedEmbeddingBlock,
    UnitWiseBlock,
    register_block,
)
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.factors import DenseFactor, DiagonalFactor, Factor, LowRankFactor
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood
from lightning_lbo.optim.kfac.inverses import BlockInverse, InverseMethod
from lightning_lbo.optim.kfac.optimizer import KFAC
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner
from lightning_lbo.optim.kfac.settings import CurvatureSettings, InverseSettings, ScheduleSettings
from lightning_lbo.optim.kfac.stale import StaleStatistics

__all__ = ["KFAC", "KFACPreconditioner", "Communicator", "Fisher", "Likelihood", "InverseMethod", "StaleStatistics",
           "BLOCK_TYPES", "BlockInverse", "CurvatureBlock", "KroneckerBlock", "LinearBlock", "Conv1dBlock",
           "Conv2dBlock", "EmbeddingBlock", "UnitWiseBlock", "MultiheadAttentionBlock", "TiedEmbeddingBlock",
           "register_block", "LinearVariant", "Factor", "DenseFactor", "DiagonalFactor", "LowRankFactor",
           "CurvatureSettings", "ScheduleSettings", "InverseSettings"]
