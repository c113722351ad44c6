"""Numbers and flags read from an adapter's JSON config, each checked for type, finiteness and
range at registration, so that no value can fail later inside a scheduling step.

JSON allows `1e308`, `NaN`, `Infinity`, `"8"` and `true` where a number is meant; every one
of them is refused here with a message naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from peftserve.adapters.errors import InvalidAdapter
from peftserve.errors import shorten

# Scale factors are held in float32 (and multiplied into bf16 activations): anything near
# float32's range would overflow at the first token. No trained adapter comes close.
MAX_SCALE = 1e6


def number(value: Any, field: str, lo: float, hi: float) -> float:
    """A finite int or float (not a bool, not a string) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidAdapter(f"{field} must be a number, got {type(value).__name__} "
                             f"{shorten(value)}")
    if not math.isfinite(value):
        raise InvalidAdapter(f"{field} must be finite, got {value}")
    if not lo <= value <= hi:
        raise InvalidAdapter(f"{field} must be in [{lo:g}, {hi:g}], got {value:g}")
    return float(value)


def integer(value: Any, field: str, lo: int, hi: int) -> int:
    """An int (or a float with an integral value, as some writers emit) in [lo, hi]."""
    x = number(value, field, lo, hi)
    if x != int(x):
        raise InvalidAdapter(f"{field} must be a whole number, got {value}")
    return int(x)


def flag(value: Any, field: str) -> bool:
    """A JSON boolean; `null` (absent) is false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidAdapter(f"{field} must be true or false, got {shorten(value)}")
    return value


def mapping(value: Any, field: str) -> dict[str, Any]:
    """A JSON object (`null` is empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidAdapter(f"{field} must be an object, got {type(value).__name__}")
    return value


def scale(value: float, field: str) -> float:
    """A derived scale factor: finite and at most MAX_SCALE in magnitude."""
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise InvalidAdapter(f"{field} is {value:g}; it must be finite and at most {MAX_SCALE:g} "
                             "in magnitude")
    return value
