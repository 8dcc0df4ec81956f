"""The checkpoint entry of a block: the nested form of its flat state (the format of every K-FAC checkpoint).

A block's :meth:`~lightning_lbo.optim.kfac.blocks.CurvatureBlock.state` is a flat dict of named tensors and
numbers (``factor.A``, ``interval.A``, ``inverse.A.rows``, ...), ready to live in per-parameter optimizer
state; :class:`~lightning_lbo.optim.kfac.KFACPreconditioner` checkpoints keep the nested entry
(``factors``, ``interval``, ``next_due``, ``refreshes``, ``estimated``, ``inverse_damping``,
``inverse_factors``) that earlier checkpoints have, so those load unchanged, plus ``low_rank``
(``{stat: (rows, n)}``, the Woodbury rows of current low-rank factors: the next inversion uses them).
Loading validates every entry (:func:`check_block_states`) before any block is restored.

:func:`preconditioner_state` assembles a preconditioner's checkpoint from its blocks and counters;
:func:`read_preconditioner_state` checks one against the bound blocks and returns what to restore
(:class:`LoadedState`); the preconditioner restores it (each block through its ``restore`` verb).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from lightning_lbo.optim.kfac import factors as fac

_SCHEDULE_KEYS = ("interval", "next_due", "refreshes", "estimated")


def nested_block_state(flat: dict[str, Any]) -> dict[str, Any]:
    """A block's flat state as its checkpoint entry (the format of every K-FAC checkpoint so far)."""
    entry: dict[str, Any] = {"factors": {}, **{key: {} for key in _SCHEDULE_KEYS}}
    for key, value in flat.items():
        head, _, stat = key.partition(".")
        if head == "factor" and stat.endswith((".rows", ".n")):  # the Woodbury rows of a current low-rank factor
            name, _, field = stat.partition(".")
            rows, n = entry.setdefault("low_rank", {}).get(name, (None, None))
            entry["low_rank"][name] = (value, n) if field == "rows" else (rows, value)
        elif head == "factor":
            entry["factors"][stat] = value
        elif head in _SCHEDULE_KEYS:
            entry[head][stat] = value
    entry["inverse_damping"] = flat.get("inverse_damping")
    entry["inverse_factors"] = fac.nested_inverse_keys(flat, "inverse.")
    return entry


def flat_block_state(entry: dict[str, Any]) -> dict[str, Any]:
    """A block's checkpoint entry as its flat state."""
    flat: dict[str, Any] = {f"factor.{stat}": t for stat, t in entry.get("factors", {}).items()}
    for stat, (rows, n) in entry.get("low_rank", {}).items():
        flat[f"factor.{stat}.rows"], flat[f"factor.{stat}.n"] = rows, n
    for key in _SCHEDULE_KEYS:
        flat.update({f"{key}.{stat}": v for stat, v in entry.get(key, {}).items()})
    flat["inverse_damping"] = entry.get("inverse_damping")
    flat.update(fac.legacy_inverse_keys(entry.get("inverse_factors", {}), "inverse."))
    return flat


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(block: Any, state: dict[str, Any], steps: int, max_interval: int | None) -> None:
    """A checkpointed schedule must be one a run could have written: positive int intervals (at most
    ``max_interval``, the stale-statistics policy's, when set), each ``next_due`` an int at most one interval
    after the checkpoint's step (``next_due=1e9`` would stop refreshing for good)."""
    for stat in block.stat_names:
        interval = state.get(f"interval.{stat}", block.interval[stat])
        due = state.get(f"next_due.{stat}", steps)
        where = f"K-FAC checkpoint: layer {block.name!r}, statistic {stat!r}"
        if not _is_int(interval) or interval < 1:
            raise ValueError(f"{where} has interval {interval!r}; a refresh interval is a positive int. The "
                             "checkpoint is corrupt: resume from an earlier one.")
        if max_interval is not None and interval > max_interval:
            raise ValueError(f"{where} has interval {interval} > stale_statistics.max_interval={max_interval}; "
                             "raise max_interval to resume this run, or resume from another checkpoint.")
        if not _is_int(due) or due > steps + interval:
            raise ValueError(f"{where} has next_due {due!r}, more than its interval {interval} after the "
                             f"checkpoint's step {steps}: K-FAC would not refresh it again. The checkpoint is "
                             "corrupt: resume from an earlier one.")


def check_block_states(blocks: list[Any], states: list[dict[str, Any]], steps: Any = 0,
                       max_interval: int | None = None, stacklevel: int = 3) -> list[bool]:
    """Validate every block's flat state before any is restored: the checkpoint's ``steps`` and each schedule
    (:func:`check_schedule`) and factor shape raise ``ValueError`` naming the entry; a block with non-finite
    factors is reported (False) with a warning: it is reset and re-estimated."""
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"K-FAC checkpoint: steps {steps!r} is not a non-negative int; the checkpoint is corrupt.")
    for block, state in zip(blocks, states, strict=True):
        check_schedule(block, state, steps, max_interval)
    valid = [block.check_state(state) for block, state in zip(blocks, states, strict=True)]
    for block, ok in zip(blocks, valid, strict=True):
        if not ok:
            warnings.warn(f"K-FAC checkpoint: layer {block.name!r} has non-finite factors; its statistics are reset "
                          "and re-estimated at the next step (the running average would never recover from NaN).",
                          RuntimeWarning, stacklevel=stacklevel)
    return valid


def preconditioner_state(blocks: list[Any], block_states: list[dict[str, Any]], steps: int,
                         skipped_refreshes: torch.Tensor, inverse_fallbacks: int, mc_sampling: dict[str, Any]
                         ) -> dict[str, Any]:
    """A preconditioner's checkpoint: per block its name, type and nested entry (:func:`nested_block_state` of its
    flat state, ``block_states``: each block's ``state()``, or its owner's under the owner placement), and the
    preconditioner-wide counters."""
    entries = [{"name": block.name, "type": block.description, **nested_block_state(state)}
               for block, state in zip(blocks, block_states, strict=True)]
    return {"steps": steps, "blocks": entries, "skipped_refreshes": skipped_refreshes.clone(),
            "inverse_fallbacks": inverse_fallbacks, "mc_sampling": mc_sampling}


class LoadedState(NamedTuple):
    """A checked preconditioner checkpoint: the counters, and per block its flat state and whether it is finite."""

    steps: int
    skipped_refreshes: torch.Tensor
    inverse_fallbacks: int
    mc_sampling: dict[str, Any]
    block_states: list[dict[str, Any]]
    valid: list[bool]


def read_preconditioner_state(state: dict[str, Any], blocks: list[Any], max_interval: int | None) -> LoadedState:
    """Check a :func:`preconditioner_state` against the bound ``blocks`` (same layers in the same order, each entry
    by :func:`check_block_states`) before anything is restored; raises ``ValueError`` naming what differs."""
    entries = state.get("blocks", [])
    names = [block.name for block in blocks]
    if [e["name"] for e in entries] != names:
        raise ValueError(f"K-FAC checkpoint layers {[e['name'] for e in entries]} do not match the model's {names}.")
    flats = [flat_block_state(entry) for entry in entries]
    steps = state.get("steps", 0)
    valid = check_block_states(blocks, flats, steps, max_interval, stacklevel=4)
    return LoadedState(steps, state.get("skipped_refreshes", torch.zeros((), dtype=torch.long)),
                       int(state.get("inverse_fallbacks", 0)), state.get("mc_sampling", {}), flats, valid)
