"""Fast gradient sign method (FGSM; Goodfellow, Shlens, Szegedy 2015) as used by ABSA (Yao et al. 2018).

.. math:: x_{adv} = \\operatorname{clamp}(x + \\epsilon \\operatorname{sign}(\\nabla_x L(f(x), y)), lo, hi)

The gradient is taken with the network in eval mode (batch-norm running statistics are neither used
from the batch nor updated, dropout is off) and only with respect to the inputs (``torch.autograd.grad``:
no parameter's ``.grad`` is touched), inside :func:`lightning_lbo.capture.curvature_capture_paused`.
Every module's training flag is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_lbo.capture import curvature_capture_paused

#: ``loss_fn(logits, targets) -> mean loss``.
LogitLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, data_range: tuple[float, float],
         loss_fn: LogitLoss = nn.functional.cross_entropy) -> torch.Tensor:
    """FGSM examples of ``x`` ``[N, ...]`` for targets ``y``, clamped to ``data_range``; a new tensor.

    Example::

        x_adv = fgsm(model, x, y, epsilon=0.005, data_range=(-0.81, 2.02))
    """
    if not epsilon >= 0:
        raise ValueError(f"Invalid epsilon: {epsilon}; use a value >= 0.")
    lo, hi = data_range
    if not lo < hi:
        raise ValueError(f"Invalid data_range: {data_range}; give (low, high) with low < high.")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with curvature_capture_paused(), torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            loss = loss_fn(model(x_in), y)
            (grad,) = torch.autograd.grad(loss, x_in)
    finally:
        for m, flag in flags:
            m.training = flag
    return (x.detach() + epsilon * grad.sign()).clamp_(lo, hi)


def replace_with_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ratio: float, epsilon: float,
                             data_range: tuple[float, float], loss_fn: LogitLoss = nn.functional.cross_entropy) -> int:
    """Overwrite the first ``round(ratio * N)`` samples of ``x`` **in place** with their FGSM examples.

    Returns the number of samples replaced. The batch is shuffled by the sampler, so its first samples
    are a random subset.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"Invalid ratio: {ratio}; use a value in [0, 1].")
    n = int(round(ratio * x.shape[0]))
    if n == 0:
        return 0
    adv = fgsm(model, x[:n], y[:n], epsilon, data_range, loss_fn)
    with torch.no_grad():
        x[:n] = adv
    return n
