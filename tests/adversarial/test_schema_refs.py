"""Threat: a client-supplied JSON schema makes the host fetch or read what it names.

Issue 11 class 1 (critical): ``input_schema``/``output_schema`` were validated with jsonschema's
default resolver, which follows ``http://`` and ``file://`` references: a client could make the
server fetch URLs (SSRF, port scans), read host JSON files back through the error message, or
read ``/dev/zero`` until memory ran out. Now every schema goes through `wasmbox.validation`:
non-local references are refused with `InputRejected` before any tier work, the registry
behind every validator retrieves nothing (even a reference that only becomes remote through
a nested ``$id``), and compiled validators are cached.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import referencing.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.adversarial._hang import finishes
from wasmbox import InputRejected, Sandbox, Status, Task
from wasmbox.validation import CACHE_SIZE, REGISTRY, compile_schema, validate


class Listener:
    """A TCP port that records every connection made to it (a fetch would connect)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n'
                             b'{"type": "integer"}')

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def host_json(tmp_path: Path) -> Path:
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"type": "string", "description": "host-secret-51c2"}))
    return path


def _remote_schemas(port: int, host_json: Path) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/schema.json"
    return [
        {"$ref": url},
        {"$ref": host_json.as_uri()},
        {"$ref": "file:///dev/zero"},
        {"properties": {"a": {"$ref": url}}},
        {"$defs": {"x": {"$ref": host_json.as_uri() + "#/type"}}, "$ref": "#/$defs/x"},
        {"$dynamicRef": url},
        {"$schema": "https://json-schema.org/draft/2019-09/schema", "$recursiveRef": url},
        {"$schema": "http://json-schema.org/draft-07/schema#", "items": {"$ref": url}},
    ]


@pytest.mark.parametrize("which", range(8))
@pytest.mark.parametrize("field", ["input_schema", "output_schema"])
def test_a_non_local_ref_is_refused_before_the_run_and_nothing_is_fetched(
    sandbox: Sandbox, guests: dict[str, Path], listener: Listener, host_json: Path,
    which: int, field: str,
) -> None:
    schema = _remote_schemas(listener.port, host_json)[which]
    with pytest.raises(InputRejected, match="is not local") as caught:
        sandbox.run(Task.wasm(guests["hello"], input=1, **{field: schema}))
    assert field in str(caught.value)
    assert listener.connections == 0
    assert "host-secret" not in str(caught.value)


def test_refusal_comes_before_any_tier_work(sandbox: Sandbox, listener: Listener,
                                            tmp_path: Path) -> None:
    # The module does not exist: preparing it would raise something else first.
    missing = tmp_path / "missing.wasm"
    schema = {"$ref": f"http://127.0.0.1:{listener.port}/s"}
    with pytest.raises(InputRejected):
        sandbox.run(Task.wasm(missing, output_schema=schema))
    with pytest.raises(InputRejected):
        sandbox.run(Task.wasm(missing, input="x", input_schema={"type": "integer"}))


def test_refs_under_a_nested_id_resolve_inside_the_schema(listener: Listener) -> None:
    # "#/$defs/n" under a nested $id means http://127.0.0.1:<port>/sub#/$defs/n: a resource
    # of the schema itself, found without a fetch.
    base = f"http://127.0.0.1:{listener.port}/"
    sub = {"$id": "sub", "$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}
    schema = {"$id": base + "root", "properties": {"a": sub}}
    validate(schema, {"a": 1}, what="input")
    with pytest.raises(InputRejected, match="fails its schema"):
        validate(schema, {"a": "x"}, what="input")
    assert listener.connections == 0


def test_the_validators_registry_fetches_nothing(listener: Listener) -> None:
    # Whatever reaches a compiled validator's registry (the scan refuses it first), nothing
    # is fetched: the registry is ours, not jsonschema's default that warns and downloads.
    validator = compile_schema({"type": "object"})
    remote = validator.evolve(schema={"$ref": f"http://127.0.0.1:{listener.port}/s"})
    with pytest.raises(referencing.exceptions.Unresolvable):
        remote.is_valid(1)
    assert listener.connections == 0


def test_the_registry_retrieves_nothing(listener: Listener, host_json: Path) -> None:
    for uri in (f"http://127.0.0.1:{listener.port}/x", host_json.as_uri()):
        with pytest.raises((referencing.exceptions.NoSuchResource,
                            referencing.exceptions.Unretrievable)):
            REGISTRY.get_or_retrieve(uri)
    assert listener.connections == 0


def test_local_refs_work(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    schema = {"$defs": {"n": {"type": "integer", "minimum": 0}},
              "type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}
    validate(schema, {"n": 3}, what="input")
    with pytest.raises(InputRejected, match="input fails its schema"):
        validate(schema, {"n": -1}, what="input")
    r = sandbox.run(Task.wasm(guests["hello"], input={"n": 1}, input_schema=schema))
    assert r.status is Status.COMPLETED


def test_a_dangling_local_ref_is_refused_when_compiled() -> None:
    with pytest.raises(InputRejected, match="points to nothing"):
        compile_schema({"$ref": "#/$defs/missing"}, what="output_schema")


def test_a_reference_cycle_is_refused_not_a_crash() -> None:
    schema = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    with pytest.raises(InputRejected, match="recursed too deeply"):
        validate(schema, 1, what="input")


def test_an_exponential_schema_is_cut_off() -> None:
    # 2**40 paths through the references; without the budget this never ends.
    out = finishes(
        "from wasmbox.errors import InputRejected\n"
        "from wasmbox.validation import validate\n"
        "defs = {'d40': {'type': 'string'}}\n"
        "for k in range(40):\n"
        "    defs[f'd{k}'] = {'anyOf': [{'$ref': f'#/$defs/d{k + 1}'}] * 2}\n"
        "try:\n"
        "    validate({'$defs': defs, '$ref': '#/$defs/d0'}, 1, what='input')\n"
        "except InputRejected as exc:\n"
        "    print(exc)\n", within=120)
    assert "took more than" in out


def test_compiled_validators_are_cached_and_bounded() -> None:
    schema = {"type": "object", "properties": {"k": {"type": "string"}}}
    first = compile_schema(schema)
    assert compile_schema(json.loads(json.dumps(schema))) is first  # by content, not identity
    for i in range(CACHE_SIZE + 10):
        compile_schema({"const": i})
    from wasmbox.validation import _CACHE

    assert len(_CACHE) <= CACHE_SIZE
    assert compile_schema(schema) is not first  # evicted, compiled again


@pytest.mark.parametrize("schema", [
    {"type": "strin"},
    {"$schema": "http://example.com/not-a-dialect"},
    {"properties": 1},
    "not a schema",
    {"a": float("nan")},
])
def test_an_invalid_schema_is_input_rejected(schema: object) -> None:
    with pytest.raises(InputRejected):
        compile_schema(schema, what="input_schema")


def test_a_huge_or_deep_schema_is_refused_without_recursing() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(100_000):
        node["not"] = {}
        node = node["not"]  # type: ignore[assignment]
    with pytest.raises(InputRejected, match="nests deeper"):
        compile_schema(deep)
    wide = {"enum": list(range(100_000))}
    with pytest.raises(InputRejected, match="more than"):
        compile_schema(wide)


_keys = st.sampled_from([
    "type", "properties", "items", "$ref", "$defs", "anyOf", "allOf", "oneOf", "not",
    "pattern", "patternProperties", "additionalProperties", "enum", "const", "minimum",
    "required", "$id", "$schema", "format", "uniqueItems", "unevaluatedProperties", "x",
])
_leaf = (st.none() | st.booleans() | st.integers() | st.text(max_size=12)
         | st.sampled_from(["#", "#/$defs/a", "http://127.0.0.1:9/x", "file:///etc/passwd",
                            "string", "object", "(a+)+$", "(?=x)", "[", "\\1"]))
_schemas = st.recursive(
    _leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(schema=_schemas, instance=_schemas)
def test_fuzzed_schemas_compile_or_are_input_rejected(schema: object, instance: object) -> None:
    try:
        compile_schema(schema)
    except InputRejected:
        return
    with contextlib.suppress(InputRejected):
        validate(schema, instance, what="input")
