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
submission and again at run time costs one compilation. The keywords and the budget live in
`wasmbox._schema_keywords`.

Internal: the sandbox, the workspace and the service call it; users pass schemas to `Task`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, cast

import jsonschema
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator

from wasmbox._schema_keywords import (
    FORMATS,
    MAX_MESSAGE,
    MAX_SECONDS,
    MAX_STEPS,
    OverBudget,
    hardened,
    regex,
    short,
    start_budget,
)
from wasmbox.errors import InputRejected

__all__ = [
    "CACHE_SIZE", "MAX_INSTANCE_DEPTH", "MAX_MESSAGE", "MAX_SCHEMA_BYTES", "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_NODES", "MAX_SECONDS", "MAX_STEPS", "REGISTRY", "compile_schema", "short",
    "validate",
]

MAX_SCHEMA_BYTES = 256 * 1024  # canonical JSON of one schema
MAX_SCHEMA_DEPTH = 64  # nested containers in a schema
MAX_SCHEMA_NODES = 50_000  # values in a schema (checked before the size, without recursing)
MAX_INSTANCE_DEPTH = 256  # a hard stop; callers bound JSON depth tighter (policy)
CACHE_SIZE = 256  # compiled validators kept

_REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")
_LATEST: type[Validator] = jsonschema.Draft202012Validator


def _retrieve(uri: str) -> referencing.Resource[Any]:
    """The registry's retriever: nothing is ever fetched, from the network or the disk."""
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


REGISTRY: referencing.Registry[Any] = referencing.Registry(
    retrieve=_retrieve,  # type: ignore[call-arg]
)

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
    cls: Any = hardened(_dialect(schema, what))
    try:
        cls.check_schema(schema, format_checker=FORMATS)
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
        regex(pattern)
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
    start_budget()
    try:
        error = best_match(validator.iter_errors(instance))
    except OverBudget:
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
