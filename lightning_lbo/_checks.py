"""Argument checks shared by the package's constructors (pure Python: no torch, no Lightning)."""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive integer (``bool`` is not), else a ValueError naming ``name`` and the fix."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; use a positive integer.")
    return value
