"""Which Fisher the factors estimate, and the sampled-label loss of the Monte-Carlo ("true") Fisher.

* ``Fisher.EMPIRICAL``: the output gradients of the training loss (no extra pass).
* ``Fisher.MC``: one label per example sampled from the model's predictive distribution
  (``Likelihood.CATEGORICAL``: softmax over dim 1 of the logits; ``Likelihood.GAUSSIAN``: unit-variance
  normal around the output), and a second backward of the *sum* of the sampled losses that computes
  gradients with respect to the layer outputs only (no weight gradients), on refresh steps only.
  The sum makes each example's output gradient its per-example gradient (the scaling convention of
  :mod:`lightning_lbo.optim.kfac.layers`).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class Fisher(str, Enum):
    EMPIRICAL = "empirical"
    MC = "mc"


class Likelihood(str, Enum):
    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"


def parse_enum(cls: type[Enum], value: str, argument: str) -> Enum:
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"Invalid {argument}: {value!r}. Supported: {tuple(m.value for m in cls)}.") from None


def sampled_loss(output: torch.Tensor, likelihood: Likelihood) -> torch.Tensor:
    """Sum over examples of ``-log p(y_sampled | output)``, with ``y`` drawn from the model (global RNG).

    ``output``: logits ``[N, C, *]`` (categorical) or predictions ``[N, *]`` (gaussian).
    """
    out = output.float()
    if likelihood is Likelihood.GAUSSIAN:
        target = out.detach() + torch.randn_like(out)
        return 0.5 * (out - target).pow(2).sum()
    logits = out.movedim(1, -1).reshape(-1, out.shape[1]) if out.dim() > 2 else out
    with torch.no_grad():
        target = torch.multinomial(torch.softmax(logits.detach(), dim=1), 1).squeeze(1)
    return F.cross_entropy(logits, target, reduction="sum")
