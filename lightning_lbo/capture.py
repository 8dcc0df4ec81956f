"""A process-wide switch that pauses curvature capture during auxiliary forward/backward passes.

Statistic estimation (precise BN), Hessian-vector products, adversarial example generation and
similar passes run the model outside the training step. Hooks that capture curvature (K-FAC's
Kronecker factors) must ignore them, or the optimizer would precondition with statistics of the
wrong data. Code that runs such passes wraps them in :func:`curvature_capture_paused`; capture hooks
check :func:`capture_paused` (a Python bool, no device sync) before recording anything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def capture_paused() -> bool:
    """True inside a :func:`curvature_capture_paused` block (of this thread)."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def curvature_capture_paused() -> Iterator[None]:
    """Pause curvature capture for the duration of the block (nestable).

    Example::

        with curvature_capture_paused():
            model(batch)  # K-FAC hooks record nothing here
    """
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
