"""Threat: a client's regex (in a JSON schema) stalls the host: regex denial of service.

Issue 11 class 2: ``pattern`` like ``^(a+)+$`` against a crafted result held the GIL for
seconds (exponential backtracking in Python's `re`), outside the task's deadline and
uncharged; ``/healthz`` stalled. Every client regex now runs on RE2 (linear time): ``pattern``,
``patternProperties``, the pattern matching inside ``additionalProperties``, and the
meta-schema's ``format: regex`` check. A pattern RE2 cannot compile (backreferences,
lookaround) is refused with `InputRejected` when the schema is compiled.

A backtracking regex cannot be interrupted in-process, so each check that would hang without
RE2 runs in a child interpreter with a generous bound that only detects the hang.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.adversarial._hang import finishes
from wasmbox import InputRejected, Sandbox, Task
from wasmbox.validation import compile_schema, validate

EVIL = "^(a+)+$"
ATTACK = "a" * 64 + "!"  # about 2**64 backtracking steps for EVIL on Python's re


def _verdict(schema: dict[str, object], instance: object, *, code: str | None = None) -> str:
    """What `validate` says, computed in a child interpreter that must finish.

    `code` is a Python expression building the instance (when its repr would be huge).
    """
    return finishes(
        "from wasmbox.errors import InputRejected\n"
        "from wasmbox.validation import validate\n"
        f"schema, instance = {schema!r}, {code or repr(instance)}\n"
        "try:\n"
        "    validate(schema, instance, what='result.json')\n"
        "    print('valid')\n"
        "except InputRejected as exc:\n"
        "    print(exc)\n").strip()


def test_pattern_runs_in_linear_time() -> None:
    verdict = _verdict({"type": "string", "pattern": EVIL}, ATTACK)
    assert verdict.startswith("result.json fails its schema:")
    assert "does not match" in verdict


def test_pattern_properties_run_in_linear_time() -> None:
    verdict = _verdict({"patternProperties": {EVIL: {"type": "integer"}}}, {ATTACK: "x"})
    assert verdict == "valid"  # the key does not match, so nothing applies


def test_additional_properties_match_pattern_properties_in_linear_time() -> None:
    schema = {"patternProperties": {EVIL: {}}, "additionalProperties": False}
    verdict = _verdict(schema, {ATTACK: 1})
    assert "additional properties are not allowed" in verdict


def test_property_names_pattern_runs_in_linear_time() -> None:
    verdict = _verdict({"propertyNames": {"pattern": EVIL}}, {ATTACK: 1})
    assert "does not match" in verdict


def test_the_regex_semantics_are_kept() -> None:
    schema = {"type": "object",
              "properties": {"id": {"type": "string", "pattern": "^[a-z]{2}-[0-9]+$"}},
              "patternProperties": {"^x-": {"type": "integer"}},
              "additionalProperties": False}
    validate(schema, {"id": "ab-12", "x-a": 1}, what="input")
    for bad in ({"id": "AB-12"}, {"x-a": "s"}, {"y": 1}):
        with pytest.raises(InputRejected, match="input fails its schema"):
            validate(schema, bad, what="input")


@pytest.mark.parametrize(("where", "schema"), [
    ("pattern", {"type": "string", "pattern": "(a)\\1"}),
    ("pattern", {"pattern": "(?=a)b"}),
    ("patternProperties", {"patternProperties": {"(?<!x)y": {}}}),
    ("propertyNames", {"propertyNames": {"pattern": "(?!a)"}}),
    ("draft4", {"$schema": "http://json-schema.org/draft-04/schema#",
                "patternProperties": {"(a)\\1": {}}}),
])
def test_a_pattern_re2_cannot_compile_is_refused_at_compile_time(
    where: str, schema: dict[str, object]
) -> None:
    with pytest.raises(InputRejected, match="RE2"):
        compile_schema(schema, what="output_schema")


def test_a_refused_pattern_never_reaches_a_run(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    with pytest.raises(InputRejected, match="output_schema: pattern"):
        sandbox.run(Task.wasm(guests["hello"], output_schema={"pattern": "(x+x+)+y(?=z)"}))


def test_unevaluated_properties_with_pattern_properties_is_refused() -> None:
    # jsonschema evaluates this combination with Python's re, out of our reach.
    with pytest.raises(InputRejected, match="unevaluatedProperties"):
        compile_schema({"patternProperties": {EVIL: {}}, "unevaluatedProperties": False})


def test_unique_items_is_linear() -> None:
    # jsonschema compares unhashable items pairwise: 10**10 comparisons here.
    verdict = _verdict({"uniqueItems": True}, None,
                       code="[{'k': i} for i in range(100_000)] + [{'k': 0}]")
    assert "non-unique" in verdict
    validate({"uniqueItems": True}, [1, True, "1", [1], {"a": 1}], what="input")
    for dup in ([1, 1.0], [{"a": [1]}, {"a": [1]}], [None, None]):
        with pytest.raises(InputRejected, match="non-unique"):
            validate({"uniqueItems": True}, dup, what="input")


_regex = st.text(alphabet=st.sampled_from(list("ab()[]{}*+?|^$\\.-,0123456789=!<:dws")),
                 max_size=16)


@settings(max_examples=300, deadline=None)
@given(pattern=_regex, text=st.text(alphabet="ab-1 ", max_size=40))
def test_fuzzed_patterns_compile_or_are_refused_and_never_crash(pattern: str, text: str) -> None:
    for schema in ({"pattern": pattern}, {"patternProperties": {pattern: {"type": "null"}}},
                   {"propertyNames": {"pattern": pattern}}):
        try:
            compile_schema(schema)
        except InputRejected:
            continue
        with contextlib.suppress(InputRejected):
            validate(schema, text, what="input")
        with contextlib.suppress(InputRejected):
            validate(schema, {text: 1}, what="input")
