"""How K-FAC talks to other ranks: the communicator interface and its single-process no-op.

K-FAC needs four kinds of collective, and nothing else:

1. averaging Kronecker factors (A after the forward, G during the backward) across ranks, possibly
   asynchronously, completed before inversion (``reduce_factors`` / ``wait``);
2. deciding which rank computes each layer's inverse (``assign``), by cost;
3. moving inverses or preconditioned gradients from the rank that computed them to the others
   (``broadcast``);
4. taking decisions that must be identical on every rank (``all_min``: e.g. "all factors finite",
   "this statistic changed little"), because a rank that takes a different branch deadlocks the
   others in the next collective.

The optimizer only ever calls these methods; in one process they do nothing (every tensor is
already "reduced", every layer belongs to rank 0). The torch.distributed implementation lives in
:mod:`lightning_lbo.optim.kfac.distributed` and is installed by the Lightning strategy, so the
numeric code never imports torch.distributed directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Communicator:
    """Single-process communicator: every collective is the identity.

    Subclasses override all methods; the contract of each is in its docstring. Tensors passed to
    collectives are fp32 and contiguous, and are modified in place.
    """

    rank: int = 0
    world_size: int = 1
    #: reduce each statistic from the capture hooks as it is finished (overlaps the backward, but needs
    #: every rank to run the same layers the same number of times); ``False``: the preconditioner reduces
    #: each block's summed statistic at step time, in block order, after the ranks agree which blocks
    #: captured (correct under rank-dependent control flow)
    reduce_in_hooks: bool = False

    def reduce_factors(self, factors: Sequence[torch.Tensor], symmetric: bool = True) -> None:
        """Start averaging ``factors`` in place over all ranks (may return before it completes).

        ``symmetric`` promises that each tensor is a symmetric matrix, which lets an implementation
        send only its upper triangle. The result must be visible after :meth:`wait`.
        """

    def wait(self) -> None:
        """Block until every reduction started by :meth:`reduce_factors` has completed."""

    def assign(self, costs: Sequence[float]) -> list[int]:
        """Owner rank of each work item (e.g. a layer's inverse) given its cost; identical on all ranks."""
        return [0] * len(costs)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int, symmetric: Sequence[bool] | None = None) -> None:
        """Overwrite ``tensors`` on every rank with their values on rank ``src``.

        ``symmetric[i]`` promises that ``tensors[i]`` is a (batch of) symmetric matrices, which lets an
        implementation send only upper triangles.
        """

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over ranks (in place, returned): the shared form of a collective decision.

        A flag tensor of ones/zeros reduced with ``all_min`` is the logical AND over ranks.
        """
        return tensor

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1
