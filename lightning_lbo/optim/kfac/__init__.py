"""K-FAC / SP-NGD natural-gradient preconditioner and optimizer (pure torch).

``KFACPreconditioner`` preconditions gradients in place in front of any optimizer; ``KFAC`` is the
preconditioner plus momentum SGD. See docs/kfac.md.
"""

from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood
from lightning_lbo.optim.kfac.inverses import InverseMethod
from lightning_lbo.optim.kfac.optimizer import KFAC
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner
from lightning_lbo.optim.kfac.stale import StaleStatistics

__all__ = ["KFAC", "KFACPreconditioner", "Communicator", "Fisher", "Likelihood", "InverseMethod", "StaleStatistics"]
