"""Parameter groups for large-batch training: no weight decay / no layer-wise adaptation on norms and biases.

Goyal et al. 2017 apply no weight decay to BatchNorm's gamma and beta; LARS practice (MLPerf, VICReg,
Barlow Twins) excludes biases and all normalisation parameters from both the weight decay and the
trust ratio. Parameters are classified by the **module type** that owns them and their ``ndim``,
never by name substrings (torchvision calls a downsample BatchNorm ``downsample.1``).

Keys every group built here carries (the contract with :mod:`lightning_lbo.optim.lars` and any
optimizer that reads group flags):

* ``"params"``: the parameters;
* ``"weight_decay"`` (float): ``weight_decay`` for decayed groups, ``0.0`` for the others;
* ``"lars_adapt"`` (bool): ``True`` if LARS/LAMB should apply the layer-wise trust ratio to the group;
* ``"name"`` (str): ``"decay"`` / ``"no_decay"`` when the two filters agree (the default), else
  ``"decay_adapt"``, ``"decay_no_adapt"``, ``"no_decay_adapt"``, ``"no_decay_no_adapt"``;
  :class:`~lightning_lbo.callbacks.LRSchedule` logs the group's LR under it;
* ``"lr"`` (float): only if ``lr`` is given: ``lr`` times the group's multipliers.

:func:`zero_init_last_bn` sets gamma = 0 in the last BatchNorm of each residual block (Goyal et al.:
each block starts as the identity), for torchvision's ``BasicBlock.bn2`` / ``Bottleneck.bn3`` and
:class:`lightning_lbo.models.BasicBlock` ``.bn2``.

Example::

    groups = param_groups(model, weight_decay=5e-5, lr=0.1, lr_multipliers={"no_decay": 1.0})
    opt = LARS(groups, lr=0.1, momentum=0.9)   # or torch.optim.SGD(groups, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_lbo.compat import batch_norm_base

__all__ = ["NORM_TYPES", "is_norm_or_bias", "param_groups", "zero_init_last_bn", "last_bn_of_blocks"]

#: Normalisation layers: BatchNorm*, SyncBatchNorm, InstanceNorm* (:func:`~lightning_lbo.compat.batch_norm_base`),
#: GroupNorm, LayerNorm, LocalResponseNorm, RMSNorm.
NORM_TYPES: tuple[type[nn.Module], ...] = (batch_norm_base(), nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                           *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))

#: ``filter(module, param) -> True`` if ``param`` (owned directly by ``module``) is *excluded*.
ParamFilter = Callable[[nn.Module, nn.Parameter], bool]

_FLAGS = ("decay", "no_decay", "adapt", "no_adapt")


def _finite_nonneg(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def is_norm_or_bias(module: nn.Module, param: nn.Parameter) -> bool:
    """True for parameters of normalisation layers and for every 0-/1-D parameter (biases, scales)."""
    return isinstance(module, NORM_TYPES) or param.ndim <= 1


def param_groups(module: nn.Module, weight_decay: float, *, lr: float | None = None,
                 lr_multipliers: Mapping[str, float] | None = None, no_decay: ParamFilter = is_norm_or_bias,
                 no_adapt: ParamFilter = is_norm_or_bias) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into weight-decay and LARS-adaptation groups.

    Args:
        module: the model (every trainable parameter appears in exactly one group; shared
            parameters once; ``requires_grad=False`` parameters are left out).
        weight_decay: weight decay of the decayed group(s).
        lr: base LR; with it each group gets ``"lr" = lr * multipliers``.
        lr_multipliers: per-flag LR multipliers, keys among ``"decay"``, ``"no_decay"``, ``"adapt"``,
            ``"no_adapt"``; a group's LR is ``lr`` times the multipliers of its two flags.
        no_decay: which parameters get no weight decay (default: norm layers, biases, all ``ndim <= 1``).
        no_adapt: which parameters get no trust ratio (same default).

    Returns:
        Non-empty groups in the order decay/adapt, decay/no-adapt, no-decay/adapt, no-decay/no-adapt.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(module).__name__}.")
    if not _finite_nonneg(weight_decay):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; use a finite value >= 0.")
    if lr is not None and not _finite_nonneg(lr):
        raise ValueError(f"Invalid lr: {lr!r}; use a finite value >= 0.")
    multipliers = dict(lr_multipliers or {})
    for key, value in multipliers.items():
        if key not in _FLAGS:
            raise ValueError(f"Invalid lr_multipliers key: {key!r}. Supported: {_FLAGS}.")
        if not _finite_nonneg(value):
            raise ValueError(f"Invalid lr_multipliers[{key!r}]: {value!r}; use a finite value >= 0.")
    if multipliers and lr is None:
        raise ValueError("lr_multipliers need the base lr: pass param_groups(..., lr=...).")

    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(d, a): [] for d in (True, False) for a in (True, False)}
    seen: set[int] = set()
    for mod in module.modules():
        for param in mod.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            buckets[(not no_decay(mod, param), not no_adapt(mod, param))].append(param)
    if not seen:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to group.")

    mixed = bool(buckets[(True, False)] or buckets[(False, True)])
    groups = []
    for (decay, adapt), params in buckets.items():
        if not params:
            continue
        d_name, a_name = ("decay" if decay else "no_decay"), ("adapt" if adapt else "no_adapt")
        group: dict[str, Any] = {"params": params, "weight_decay": float(weight_decay) if decay else 0.0,
                                 "lars_adapt": adapt, "name": f"{d_name}_{a_name}" if mixed else d_name}
        if lr is not None:
            group["lr"] = lr * multipliers.get(d_name, 1.0) * multipliers.get(a_name, 1.0)
        groups.append(group)
    return groups


def _default_blocks() -> dict[type[nn.Module], str]:
    from lightning_lbo.models import BasicBlock

    blocks: dict[type[nn.Module], str] = {BasicBlock: "bn2"}
    try:
        from torchvision.models.resnet import BasicBlock as TVBasic
        from torchvision.models.resnet import Bottleneck as TVBottleneck
    except ImportError:  # torchvision is a declared dependency; stay usable without it
        return blocks
    blocks.update({TVBasic: "bn2", TVBottleneck: "bn3"})
    return blocks


def last_bn_of_blocks(model: nn.Module, blocks: Mapping[type[nn.Module], str] | None = None) -> list[nn.Module]:
    """The last BatchNorm of every residual block in ``model`` (``blocks``: block type -> attribute name)."""
    blocks = dict(_default_blocks() if blocks is None else blocks)
    found = []
    for mod in model.modules():
        for block_type, attr in blocks.items():
            if isinstance(mod, block_type):
                bn = getattr(mod, attr, None)
                if not isinstance(bn, batch_norm_base()) or bn.weight is None:
                    raise ValueError(f"{type(mod).__name__}.{attr} is {type(bn).__name__}, not an affine BatchNorm; "
                                     "pass blocks={BlockType: 'name_of_last_bn'}.")
                found.append(bn)
                break
    return found


@torch.no_grad()
def zero_init_last_bn(model: nn.Module, blocks: Mapping[type[nn.Module], str] | None = None) -> int:
    """Set gamma = 0 in the last BatchNorm of each residual block (Goyal et al. 2017, section 5.1).

    Args:
        model: a torchvision ResNet, :class:`lightning_lbo.models.ResNet`, or any model whose blocks
            are named in ``blocks``.
        blocks: block type -> attribute of its last BatchNorm; default: torchvision ``BasicBlock.bn2``,
            ``Bottleneck.bn3`` and :class:`lightning_lbo.models.BasicBlock` ``.bn2``.

    Returns:
        The number of BatchNorm layers zeroed.
    """
    bns = last_bn_of_blocks(model, blocks)
    if not bns:
        names = ", ".join(f"{t.__module__}.{t.__name__}" for t in (blocks or _default_blocks()))
        raise ValueError(f"{type(model).__name__} has no residual block of a known type ({names}); pass "
                         "blocks={BlockType: 'name_of_last_bn'}.")
    for bn in bns:
        bn.weight.zero_()
    return len(bns)
