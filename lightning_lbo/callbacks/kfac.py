"""``KFACCallback``: K-FAC's Lightning lifecycle owner (the hooks live in :mod:`.kfac_lifecycle`).

Pass ``KFACCallback()`` to a run that trains with K-FAC: it binds, scales, connects and checks K-FAC and
logs ``kfac/*`` metrics. ``strategy="ddp_kfac"`` adds a silent one itself when none is passed. Nothing
adds one to a Trainer that did not ask. See docs/kfac.md ("One lifecycle owner").
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

    Needed when K-FAC needs something from Lightning that it cannot find itself: several ranks under
    plain ``strategy="ddp"`` (the curvature communicator), an AMP grad scaler (``precision="16-mixed"``),
    ``KFAC(params)`` built without its module (LightningCLI). Without it, K-FAC fails at its first step
    with a message naming this callback. ``strategy="ddp_kfac"`` adds one when none is passed.

    Args:
        log_every_n_steps: log the ``kfac/*`` metrics every this many optimizer steps (0: never); built
            on the device, so logging every step makes no host synchronisation.
        require_kfac: raise at ``on_fit_start`` when the run has no K-FAC optimizer.

    Example::

        trainer = Trainer(precision="16-mixed", callbacks=[KFACCallback()])
        trainer.fit(ClassifierModule("cnn", optimizer=lambda m: KFAC(m, lr=0.1)))
    """
