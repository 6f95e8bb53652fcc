"""Every JSON-schema check wasmbox makes. Schemas come from clients and instances from guests.

Both are hostile, so:

- a schema is bounded in size and depth before anything else looks at it, and checked
  against its meta-schema;
- ``$ref`` (and ``$dynamicRef``/``$recursiveRef``) must be local (``#...``); the registry
  behind every validator retrieves nothing, so no URL or file a schema names is ever opened;
- regexes (``pattern``, ``patternProperties``, ``additionalProperties``' view of them, and the
  meta-schema's ``format: regex``) run on RE2, which matches in linear time; a pattern RE2
  cannot compile is refused;
- validation has a budget of keyword evaluations (reference cycles, exponential ``anyOf``
  fan-out), and ``uniqueItems`` is checked in linear time.

Compiled validators are cached by the schema's canonical JSON, so checking a schema at
submission and again at run time costs one compilation.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, cast

import jsonschema
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator

from wasmbox.errors import InputRejected

MAX_SCHEMA_BYTES = 256 * 1024  # canonical JSON of one schema
MAX_SCHEMA_DEPTH = 64  # nested containers in a schema
MAX_SCHEMA_NODES = 50_000  # values in a schema (checked before the size, without recursing)
MAX_INSTANCE_DEPTH = 256  # a hard stop; callers bound JSON depth tighter (policy)
MAX_STEPS = 1_000_000  # keyword evaluations per validation
MAX_SECONDS = 5.0  # wall time per validation (a step through a $ref can cost 100 us;
#                   a legitimate 20,000-item result takes ~1.5 s on a busy machine)
MAX_MESSAGE = 300  # characters of a validation message kept in an error
CACHE_SIZE = 256  # compiled validators kept

_REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")
_LATEST: type[Validator] = jsonschema.Draft202012Validator

Keyword = Callable[[Any, Any, Any, dict[str, Any]], Iterator[ValidationError] | None]


def _retrieve(uri: str) -> referencing.Resource[Any]:
    """The registry's retriever: nothing is ever fetched, from the network or the disk."""
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


REGISTRY: referencing.Registry[Any] = referencing.Registry(
    retrieve=_retrieve,  # type: ignore[call-arg]
)

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is our error to report, not stderr noise


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    """A client regex compiled by RE2 (linear-time matching); raises `re2.error`."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _search(pattern: str, text: str) -> bool:
    try:
        return _regex(pattern).search(text) is not None
    except UnicodeEncodeError:  # a lone surrogate (valid in JSON, not in UTF-8)
        clean = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return _regex(pattern).search(clean) is not None


def short(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` cut to `limit` characters (messages quote hostile values)."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


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

_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("regex", raises=re2.error)
def _is_regex(instance: object) -> bool:
    if isinstance(instance, str):
        _regex(instance)
    return True


# --- the validation budget -----------------------------------------------------------------


class _OverBudget(Exception):
    pass


class _Budget(threading.local):
    steps = 0
    until = float("inf")


_STATE = _Budget()


def _counted(keyword: Keyword) -> Keyword:
    def counted(validator: Any, value: Any, instance: Any,
                schema: dict[str, Any]) -> Iterator[ValidationError] | None:
        steps = _STATE.steps = _STATE.steps + 1
        if steps > MAX_STEPS or (steps & 63 == 0 and time.monotonic() > _STATE.until):
            raise _OverBudget
        return keyword(validator, value, instance, schema)

    return counted


@functools.cache
def _hardened(base: type[Validator]) -> type[Validator]:
    """`base` with RE2 regexes, linear uniqueItems and every keyword charged to the budget."""
    keywords = {name: _counted(_OVERRIDES.get(name) or fn)
                for name, fn in base.VALIDATORS.items() if fn is not None}
    cls: type[Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        base, keywords, format_checker=_FORMATS,
    )
    return cls


# --- compiling -----------------------------------------------------------------------------

_CACHE: OrderedDict[str, Validator] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def compile_schema(schema: object, *, what: str = "schema") -> Validator:
    """A validator for a client-supplied JSON schema, or `InputRejected` saying what is wrong.

    The schema is bounded in size and depth, its references must be local and resolvable,
    its regexes must compile on RE2, and it must pass its meta-schema. Results are cached
    (bounded LRU keyed by canonical JSON), so calling this twice costs one compilation.
    `what` names the schema in messages (``"output_schema"``).
    """
    refs, nested_ids = _scan(schema, what)
    try:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputRejected(f"{what} is not JSON: {exc}") from None
    if len(key) > MAX_SCHEMA_BYTES:
        raise InputRejected(f"{what} is {len(key)} bytes of JSON, over the "
                            f"{MAX_SCHEMA_BYTES} limit")
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    cls: Any = _hardened(_dialect(schema, what))
    try:
        cls.check_schema(schema, format_checker=_FORMATS)
    except SchemaError as exc:
        raise InputRejected(f"{what} is not a valid JSON schema: {short(exc.message)}") from None
    validator: Validator = cls(schema, registry=REGISTRY)
    if not nested_ids:  # with nested $ids a reference's base moves; checked when validating
        _check_refs(schema, refs, what)
    with _CACHE_LOCK:
        _CACHE[key] = validator
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return validator


def _scan(schema: object, what: str) -> tuple[list[str], bool]:
    """Bounds, local-only references and RE2-compilable regexes, checked without recursion.

    Returns the ``$ref`` values and whether a subschema sets its own ``$id``.
    """
    if not isinstance(schema, dict | bool):
        raise InputRejected(f"{what} must be a JSON object or a boolean")
    refs: list[str] = []
    nested_ids = unevaluated = pattern_properties = False
    stack: list[tuple[object, int]] = [(schema, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InputRejected(f"{what} has more than {MAX_SCHEMA_NODES} values")
        if depth > MAX_SCHEMA_DEPTH:
            raise InputRejected(f"{what} nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
            continue
        if not isinstance(node, dict):
            continue
        for name, value in node.items():
            if name in _REF_KEYS and isinstance(value, str):
                if not value.startswith("#"):
                    raise InputRejected(
                        f"{what}: {name} {short(value, 100)!r} is not local; only references "
                        "inside the schema ('#...') are allowed (nothing is ever fetched)")
                if name == "$ref":
                    refs.append(value)
            elif name in ("$id", "id") and isinstance(value, str) and node is not schema:
                nested_ids = True
            elif name == "pattern" and isinstance(value, str):
                _compile_regex(value, what)
            elif name == "patternProperties" and isinstance(value, dict):
                pattern_properties = True
                for pattern in value:
                    _compile_regex(pattern, what)
            elif name == "unevaluatedProperties":
                unevaluated = True
            stack.append((value, depth + 1))
    if unevaluated and pattern_properties:
        # jsonschema evaluates that combination with Python's backtracking regexes.
        raise InputRejected(f"{what}: unevaluatedProperties together with patternProperties "
                            "is not supported")
    return refs, nested_ids


def _compile_regex(pattern: str, what: str) -> None:
    try:
        _regex(pattern)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise InputRejected(
            f"{what}: pattern {short(pattern, 100)!r} is not supported ({detail}); patterns "
            "run on RE2: no backreferences or lookaround") from None


def _dialect(schema: object, what: str) -> type[Validator]:
    if not isinstance(schema, dict) or "$schema" not in schema:
        return _LATEST
    uri = schema["$schema"]
    try:
        # An unknown $schema gets the default back; None marks it.
        found: Any = jsonschema.validators.validator_for(schema, default=cast(Any, None)) \
            if isinstance(uri, str) else None
    except ValueError:
        found = None
    if found is None:
        raise InputRejected(f"{what}: unknown $schema {short(str(uri), 100)!r}")
    return cast(type[Validator], found)


def _check_refs(schema: object, refs: list[str], what: str) -> None:
    if not refs:
        return
    resource = referencing.jsonschema.specification_with(
        dialect_id=_dialect(schema, what).META_SCHEMA.get("$id", ""),
        default=referencing.Specification.OPAQUE,
    ).create_resource(schema)
    resolver = REGISTRY.resolver_with_root(resource)
    for ref in set(refs):
        try:
            resolver.lookup(ref)
        except (referencing.exceptions.Unresolvable, ValueError, LookupError, TypeError):
            raise InputRejected(f"{what}: $ref {short(ref, 100)!r} points to nothing "
                                "in the schema") from None


# --- validating ----------------------------------------------------------------------------


def validate(schema: object, instance: object, *, what: str) -> None:
    """Check `instance` against `schema`; raises `InputRejected` if either is not acceptable.

    `what` names the instance (``"input"``, ``"result.json"``): messages read
    ``"<what> fails its schema: ..."``. The schema is compiled (or found in the cache) first.
    """
    validator: Any = compile_schema(schema, what=f"the schema of {what}")
    _check_depth(instance, what)
    _STATE.steps, _STATE.until = 0, time.monotonic() + MAX_SECONDS
    try:
        error = best_match(validator.iter_errors(instance))
    except _OverBudget:
        raise InputRejected(f"checking {what} against its schema took more than {MAX_STEPS} "
                            f"steps or {MAX_SECONDS} s (a combinatorial schema?)") from None
    except RecursionError:
        raise InputRejected(f"checking {what} against its schema recursed too deeply "
                            "(a reference cycle?)") from None
    except (referencing.exceptions.Unresolvable, re2.error) as exc:
        raise InputRejected(f"the schema of {what} cannot be applied: "
                            f"{short(str(exc))}") from None
    if error is not None:
        raise InputRejected(f"{what} fails its schema: {short(error.message)}")


def _check_depth(instance: object, what: str) -> None:
    stack: list[tuple[object, int]] = [(instance, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_INSTANCE_DEPTH:
            raise InputRejected(f"{what} nests deeper than {MAX_INSTANCE_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
