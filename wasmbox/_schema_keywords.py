"""Internal: the hardened JSON-schema keywords behind `wasmbox.validation`.

Client regexes run on RE2 (linear time; ``pattern``, ``patternProperties``,
``additionalProperties``' view of them and ``format: regex``), ``uniqueItems`` is checked in
linear time, and every keyword evaluation is charged to a per-thread budget of steps and wall
time (`start_budget`), so no schema can make a validation run without end.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import re2
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

MAX_STEPS = 1_000_000  # keyword evaluations per validation
MAX_SECONDS = 5.0  # wall time per validation (a step through a $ref can cost 100 us;
#                   a legitimate 20,000-item result takes ~1.5 s on a busy machine)

MAX_MESSAGE = 300  # characters of a validation message kept in an error

Keyword = Callable[[Any, Any, Any, dict[str, Any]], Iterator[ValidationError] | None]


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is our error to report, not stderr noise


@functools.lru_cache(maxsize=1024)
def regex(pattern: str) -> Any:
    """A client regex compiled by RE2 (linear-time matching); raises `re2.error`."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _search(pattern: str, text: str) -> bool:
    try:
        return regex(pattern).search(text) is not None
    except UnicodeEncodeError:  # a lone surrogate (valid in JSON, not in UTF-8)
        clean = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return regex(pattern).search(clean) is not None


# --- keywords that would run client regexes on Python's backtracking engine ----------------


def _pattern(validator: Any, patrn: Any, instance: Any,
             schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(patrn, instance):
        yield ValidationError(f"{short(repr(instance), 80)} does not match {patrn!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any,
                        schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, extra: Any, instance: Any,
                           schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [key for key in instance
              if key not in properties and not any(_search(p, key) for p in patterns)]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        names = short(", ".join(repr(k) for k in sorted(extras)))
        yield ValidationError(f"additional properties are not allowed ({names})")


def _unique_items(validator: Any, unique: Any, instance: Any,
                  schema: dict[str, Any]) -> Iterator[ValidationError]:
    # jsonschema compares items pairwise (quadratic); a canonical key per item is linear.
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[object] = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield ValidationError(f"{short(repr(instance), 80)} has non-unique elements")
            return
        seen.add(key)


def _canonical(value: Any) -> object:
    """A hashable key with JSON equality (1 == 1.0, true != 1); depth is bounded by callers."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("l", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("d", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("z", None) if value is None else ("o", id(value))


_OVERRIDES: dict[str, Keyword] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("regex", raises=re2.error)
def _isregex(instance: object) -> bool:
    if isinstance(instance, str):
        regex(instance)
    return True


# --- the validation budget -----------------------------------------------------------------


class OverBudget(Exception):
    """A validation ran out of its budget."""


class _Budget(threading.local):
    steps = 0
    until = float("inf")


_STATE = _Budget()


def _counted(keyword: Keyword) -> Keyword:
    def counted(validator: Any, value: Any, instance: Any,
                schema: dict[str, Any]) -> Iterator[ValidationError] | None:
        steps = _STATE.steps = _STATE.steps + 1
        if steps > MAX_STEPS or (steps & 63 == 0 and time.monotonic() > _STATE.until):
            raise OverBudget
        return keyword(validator, value, instance, schema)

    return counted


@functools.cache
def hardened(base: type[Validator]) -> type[Validator]:
    """`base` with RE2 regexes, linear uniqueItems and every keyword charged to the budget."""
    keywords = {name: _counted(_OVERRIDES.get(name) or fn)
                for name, fn in base.VALIDATORS.items() if fn is not None}
    cls: type[Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        base, keywords, format_checker=FORMATS,
    )
    return cls


def start_budget() -> None:
    """Give this thread's next validation a fresh budget of `MAX_STEPS` and `MAX_SECONDS`."""
    _STATE.steps, _STATE.until = 0, time.monotonic() + MAX_SECONDS


def short(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` cut to `limit` characters (messages quote hostile values)."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
