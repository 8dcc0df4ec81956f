"""A process-wide switch that pauses curvature capture during auxiliary forward/backward passes.

Statistic estimation (precise BN), Hessian-vector products, adversarial example generation and
similar passes run the model outside the training step. Hooks that capture curvature (K-FAC's
Kronecker factors) must ignore them, or the optimizer would precondition with statistics of the
wrong data. Code that runs such passes wraps them in :func:`curvature_capture_paused`; capture hooks
check :func:`capture_paused` (a Python bool, no device sync) before recording anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# Process-wide, not thread-local: on GPUs autograd runs backward hooks in its own device threads,
# which must see the pause set by the thread that called backward.
_depth = 0


def capture_paused() -> bool:
    """True inside a :func:`curvature_capture_paused` block."""
    return _depth > 0


@contextmanager
def curvature_capture_paused() -> Iterator[None]:
    """Pause curvature capture for the duration of the block (nestable).

    Example::

        with curvature_capture_paused():
            model(batch)  # K-FAC hooks record nothing here
    """
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
