"""The checkpoint entry of a block: the nested form of its flat state (the format of every K-FAC checkpoint).

A block's :meth:`~lightning_lbo.optim.kfac.blocks.CurvatureBlock.state` is a flat dict of named tensors and
numbers (``factor.A``, ``interval.A``, ``inverse.A.rows``, ...), ready to live in per-parameter optimizer
state; :class:`~lightning_lbo.optim.kfac.KFACPreconditioner` checkpoints keep the nested entry
(``factors``, ``interval``, ``next_due``, ``refreshes``, ``estimated``, ``inverse_damping``,
``inverse_factors``) that earlier checkpoints have, so those load unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_lbo.optim.kfac import factors as fac

_SCHEDULE_KEYS = ("interval", "next_due", "refreshes", "estimated")


def nested_block_state(flat: dict[str, Any]) -> dict[str, Any]:
    """A block's flat state as its checkpoint entry (the format of every K-FAC checkpoint so far)."""
    entry: dict[str, Any] = {"factors": {}, **{key: {} for key in _SCHEDULE_KEYS}}
    for key, value in flat.items():
        head, _, stat = key.partition(".")
        if head == "factor":
            entry["factors"][stat] = value
        elif head in _SCHEDULE_KEYS:
            entry[head][stat] = value
    entry["inverse_damping"] = flat.get("inverse_damping")
    entry["inverse_factors"] = fac.nested_inverse_keys(flat, "inverse.")
    return entry


def flat_block_state(entry: dict[str, Any]) -> dict[str, Any]:
    """A block's checkpoint entry as its flat state."""
    flat: dict[str, Any] = {f"factor.{stat}": t for stat, t in entry.get("factors", {}).items()}
    for key in _SCHEDULE_KEYS:
        flat.update({f"{key}.{stat}": v for stat, v in entry.get(key, {}).items()})
    flat["inverse_damping"] = entry.get("inverse_damping")
    flat.update(fac.legacy_inverse_keys(entry.get("inverse_factors", {}), "inverse."))
    return flat


def check_block_states(blocks: list[Any], states: list[dict[str, Any]]) -> list[bool]:
    """Validate every block's flat state before any is restored (wrong shapes raise, naming the layer); a block
    with non-finite factors is reported (False) with a warning: it is reset and re-estimated."""
    valid = [block.check_state(state) for block, state in zip(blocks, states, strict=True)]
    for block, ok in zip(blocks, valid, strict=True):
        if not ok:
            warnings.warn(f"K-FAC checkpoint: layer {block.name!r} has non-finite factors; its statistics are reset "
                          "and re-estimated at the next step (the running average would never recover from NaN).",
                          RuntimeWarning, stacklevel=3)
    return valid
