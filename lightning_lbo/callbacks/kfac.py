"""``KFACCallback``: K-FAC's Lightning lifecycle owner (the hooks live in :mod:`.kfac_lifecycle`).

Every Trainer has one (an automatic, silent instance from Lightning's ``callbacks_factory`` entry
point); pass ``KFACCallback()`` to log ``kfac/*`` metrics. See docs/kfac.md ("One lifecycle owner").
"""

from __future__ import annotations

from lightning_lbo.callbacks.kfac_lifecycle import (  # noqa: F401  (the lifecycle's functions, re-exported)
    KFACLifecycle,
    attach_kfac,
    detach_kfac,
    find_kfac,
    kfac_signature,
)
from lightning_lbo.compat import callback_bases


class KFACCallback(KFACLifecycle, *callback_bases()):
    """Attach K-FAC to the run (:func:`attach_kfac`), handle AMP and accumulation, log K-FAC's state.

    Args:
        log_every_n_steps: log the ``kfac/*`` metrics every this many optimizer steps (0: never).

    Example::

        trainer = Trainer(precision="16-mixed", callbacks=[KFACCallback()])
        trainer.fit(ClassifierModule("cnn", optimizer=lambda m: KFAC(m, lr=0.1)))
    """
