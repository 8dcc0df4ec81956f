"""Which Fisher the factors estimate, and the sampled-label loss of the Monte-Carlo ("true") Fisher.

* ``Fisher.EMPIRICAL``: the output gradients of the training loss (no extra pass).
* ``Fisher.MC``: one label per example sampled from the model's predictive distribution
  (``Likelihood.CATEGORICAL``: softmax over the classes axis ``classes_dim`` of the logits, ``1`` for
  ``[N, C, *]``, ``-1`` for ``[N, T, V]``; ``Likelihood.GAUSSIAN``: unit-variance normal around the
  output), and a second backward of the *sum* of the sampled losses that computes gradients with
  respect to the layer outputs only (no weight gradients), on refresh steps only. The sum makes each
  example's output gradient its per-example gradient (the scaling convention of :mod:`.blocks`).

Sampling never raises and never reads the device: a categorical label is drawn with the
exponential race (the Gumbel-max trick), ``y = argmax_c (z_c - log E_c)`` with ``E_c ~ Exp(1)``,
which is an exact draw from ``softmax(z)`` (``P(y = c) = p_c``) and, unlike ``torch.multinomial``,
accepts non-finite logits: the label is then arbitrary, the sampled loss and the statistic are
non-finite, and the refresh is skipped like any non-finite statistic (on every rank).

The random numbers come from a :class:`LabelSampler`, not the global RNG: one seed, and each draw
reseeds a per-device generator from ``(seed, rank, draw count)``. The seed and the count are in the
preconditioner's checkpoint, so a resumed run samples the labels of the uninterrupted one, on every
rank (a checkpoint written by rank 0 restores all ranks), and the global RNG (dropout, data order)
is not consumed.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

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


#: the attribute by which a model declares the classes axis of its logits (``lightning_lbo.lm.GPT``: ``-1``)
CLASSES_DIM_ATTRIBUTE = "logits_classes_dim"

_MASK64 = (1 << 64) - 1


def check_mc_settings(fisher: Fisher, likelihood: Likelihood, classes_dim: int | None, mc_seed: int | None) -> None:
    """Refuse ``classes_dim`` / ``mc_seed`` where they would be ignored, and invalid values."""
    if classes_dim is not None:
        if fisher is not Fisher.MC or likelihood is not Likelihood.CATEGORICAL:
            raise ValueError(f"classes_dim={classes_dim!r} applies to fisher='mc' with likelihood='categorical' only "
                             f"(got fisher={fisher.value!r}, likelihood={likelihood.value!r}); remove it.")
        if isinstance(classes_dim, bool) or not isinstance(classes_dim, int) or classes_dim == 0:
            raise ValueError(f"Invalid classes_dim: {classes_dim!r}; use the logits' classes axis, a non-zero int "
                             "(1 for [N, C, *], -1 for [N, T, V]; axis 0 is the examples).")
    if mc_seed is not None:
        if fisher is not Fisher.MC:
            raise ValueError(f"mc_seed={mc_seed!r} seeds the labels of fisher='mc' only (got fisher="
                             f"{fisher.value!r}); remove it.")
        if isinstance(mc_seed, bool) or not isinstance(mc_seed, int) or not 0 <= mc_seed <= _MASK64:
            raise ValueError(f"Invalid mc_seed: {mc_seed!r}; use an int in [0, 2**64).")


def _mix(*values: int) -> int:
    """A 64-bit seed from ints (splitmix64 finaliser per value): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h


class LabelSampler:
    """The random stream of the MC Fisher's labels: ``seed`` and a count of draws, nothing else.

    Each :meth:`generator` call is one draw (one sampled-label backward): it returns this device's
    generator reseeded from ``(seed, rank, draws)``, so the stream depends only on the checkpointed
    ``seed`` and ``draws`` and on the rank (ranks sample independently). Reseeding is host-side only
    (no device synchronisation).

    Args:
        seed: the seed; ``None`` derives it from the global seed (``torch.initial_seed()``, what
            ``torch.manual_seed`` / ``seed_everything`` set) without consuming the global RNG.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int(torch.initial_seed() if seed is None else seed) & _MASK64
        self.rank = 0
        self.draws = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next draw, on ``device``."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(_mix(self.seed, self.rank, self.draws))
        self.draws += 1
        return generator

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed)) & _MASK64
        self.draws = int(state.get("draws", self.draws))


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One label per row of ``logits [M, C]`` drawn from ``softmax(logits)``: ``[M]`` int64.

    The exponential race ``argmax(logits - log E)``, ``E ~ Exp(1)`` (Gumbel-max); never raises (rows
    with non-finite logits get an arbitrary label), no host synchronisation.
    """
    race = torch.empty_like(logits).exponential_(generator=generator)
    return race.log_().neg_().add_(logits).argmax(dim=1)  # logits - log E, in one [M, C] buffer


def sampled_loss(output: torch.Tensor, likelihood: Likelihood, classes_dim: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum over examples of ``-log p(y_sampled | output)``, with ``y`` drawn from the model.

    ``output``: logits ``[N, C, *]`` (categorical, classes on ``classes_dim``: ``[N, *, C]`` with
    ``-1``) or predictions ``[N, *]`` (gaussian). ``generator``: the random stream (``None``: global).
    """
    out = output.float()
    if likelihood is Likelihood.GAUSSIAN:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return 0.5 * (out - (out.detach() + noise)).pow(2).sum()
    if out.dim() < 2 or not -out.dim() <= classes_dim < out.dim() or classes_dim % out.dim() == 0:
        raise ValueError(f"fisher='mc' samples labels over classes_dim={classes_dim} of the logits, which have shape "
                         f"{tuple(out.shape)}: pass the classes axis (1 for [N, C, *], -1 for [N, T, V]), not "
                         "axis 0 (the examples).")
    logits = out.movedim(classes_dim, -1).reshape(-1, out.shape[classes_dim]) if out.dim() > 2 else out
    with torch.no_grad():
        target = sample_categorical(logits.detach(), generator)
    return F.cross_entropy(logits, target, reduction="sum")
