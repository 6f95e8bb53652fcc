"""Internal: sizes, durations and the frozen base model every wasmbox model derives from.

Sizes accept integers (bytes) or strings such as ``"64M"``/``"64MiB"`` (binary) and ``"64MB"``
(decimal); durations accept seconds or strings such as ``"250ms"``, ``"5s"``, ``"2m"``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> Any:
    """Turn ``"64M"``, ``"64MiB"`` (binary) or ``"64MB"`` (decimal) into bytes."""
    if not isinstance(value, str):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (try 65536, '64K', '64MiB' or '64MB')")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base**power)


def parse_duration(value: Any) -> Any:
    """Turn ``"250ms"``, ``"5s"``, ``"2m"`` into seconds."""
    if not isinstance(value, str):
        return value
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (try 5, '250ms', '5s' or '2m')")
    scale = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return float(m.group(1)) * scale[(m.group(2) or "s").lower()]


# Field before the validator, so the JSON schema says exclusiveMinimum (not a raw "gt").
Bytes = Annotated[int, Field(gt=0), BeforeValidator(parse_size)]
Seconds = Annotated[float, Field(gt=0), BeforeValidator(parse_duration)]


class Frozen(BaseModel):
    """Base of every wasmbox model: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")
