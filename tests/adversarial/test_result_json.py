"""Threat: deep or huge JSON from a guest (result.json) or a client (the task input).

Python's json parser recurses once per nesting level: 100,000 brackets raise RecursionError
out of `Sandbox.run` (issue 11 class 9), and a few hundred are enough to blow a smaller
stack. Depth is measured on the bytes without parsing, before `json.loads`, against the
policy (`OutputPolicy.max_json_depth`, `Limits.input_depth`); size is capped
(`OutputPolicy.max_json_bytes`). A guest's JSON becomes OUTPUT_REJECTED, a client's
`InputRejected`; neither ever raises anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wasmbox import InputRejected, Policy, Sandbox, Status, Task, apply
from wasmbox.models import Limits, OutputPolicy, TaskKind
from wasmbox.workspace import Workspace, encode_input, json_depth, json_too_deep

MakeSandbox = Callable[..., Sandbox]
MODULE = b"\0asm\1\0\0\0"


def _depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (iterative)."""
    best, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list | dict):
            best = max(best, depth + 1)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict)
                                                  else node))
    return best


# --- result.json from a guest -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [0, 1], ids=["arrays", "objects"])
def test_a_100k_deep_result_is_output_rejected_not_an_exception(
    sandbox: Sandbox, guests: dict[str, Path], shape: int
) -> None:
    r = sandbox.run(Task.wasm(guests["json_bomb"], input={"depth": 100_000, "object": shape}))
    assert r.status is Status.OUTPUT_REJECTED
    assert r.reason == "result.json nests deeper than 64 levels"
    assert r.output is None and r.files == {}


@pytest.mark.parametrize(("depth", "ok"), [(64, True), (65, False), (300, False)])
def test_result_depth_is_bounded_by_the_policy(
    sandbox: Sandbox, guests: dict[str, Path], depth: int, ok: bool
) -> None:
    # 300 parses fine in Python, so only the depth bound rejects it.
    r = sandbox.run(Task.wasm(guests["json_bomb"], input={"depth": depth}))
    if ok:
        assert r.status is Status.COMPLETED, r.reason
        assert _depth(r.output) == depth
    else:
        assert r.status is Status.OUTPUT_REJECTED
        assert "nests deeper than 64" in (r.reason or "")


def test_the_policy_can_allow_deeper_results(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    with make_sandbox(Policy(output=OutputPolicy(max_json_depth=200))) as sb:
        r = sb.run(Task.wasm(guests["json_bomb"], input={"depth": 150, "object": 1}))
    assert r.status is Status.COMPLETED, r.reason
    assert _depth(r.output) == 150


def _collect(tmp_path: Path, raw: bytes, policy: Policy | None = None) -> tuple[object, str | None]:
    with Workspace(apply(policy or Policy(), Task.wasm(MODULE)), tmp_path) as ws:
        Path(ws.output_dir, "result.json").write_bytes(raw)
        collected = ws.collect()
    return collected.output, collected.rejection


def test_a_result_over_the_json_size_cap_is_rejected(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_json_bytes=1024))
    output, rejection = _collect(tmp_path, b"[" + b"1," * 1000 + b"1]", policy)
    assert output is None
    assert rejection == "result.json is 2003 bytes, over the 1024 cap"


def test_a_result_that_is_not_utf8_is_rejected(tmp_path: Path) -> None:
    # json.loads would guess UTF-16 from the bytes; the depth scan reads UTF-8 only.
    raw = ("[" * 100 + "]" * 100).encode("utf-16")
    output, rejection = _collect(tmp_path, raw)
    assert output is None
    assert rejection is not None and "not UTF-8" in rejection


@pytest.mark.parametrize("raw", [
    b'["' + b"[" * 5000 + b'"]',  # brackets inside a string do not nest
    b'{"a": "\\"[[[[[[[[[[", "b": [1]}',  # nor after an escaped quote
    b'"\\\\"',
])
def test_brackets_in_strings_do_not_count(tmp_path: Path, raw: bytes) -> None:
    output, rejection = _collect(tmp_path, raw)
    assert rejection is None
    assert output == json.loads(raw)


# --- the depth scan itself --------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(alphabet=st.sampled_from('[]{}"\\,:ab \u00e9\n')),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(alphabet=st.sampled_from('[]{}"\\ab'), max_size=4), children,
                      max_size=3),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=_json, ascii_only=st.booleans())
def test_json_depth_is_exact_on_valid_json(value: object, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(raw) == _depth(value)


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(alphabet='[]{}"\\,:1 ').map(str.encode))
def test_json_depth_never_underestimates_what_a_parser_reaches(raw: bytes) -> None:
    found = json_depth(raw)  # never raises
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return
    assert _depth(value) <= found


@settings(max_examples=300, deadline=None)
@given(value=_json, ascii_only=st.booleans(), limit=st.integers(1, 8), repeat=st.integers(1, 3))
def test_the_fast_depth_check_agrees_with_the_exact_scan(
    value: object, ascii_only: bool, limit: int, repeat: int
) -> None:
    raw = json.dumps([value] * repeat, ensure_ascii=ascii_only).encode()
    assert json_too_deep(raw, limit) == (json_depth(raw) > limit)


@settings(max_examples=500, deadline=None)
@given(raw=st.text(alphabet='[]{}"\\,:1 ', max_size=60).map(str.encode), limit=st.integers(1, 6))
def test_the_fast_depth_check_never_passes_what_a_parser_would_nest_deeper(
    raw: bytes, limit: int
) -> None:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        json_too_deep(raw, limit)  # never raises
        return
    if _depth(value) > limit:
        assert json_too_deep(raw, limit)


@settings(max_examples=200, deadline=None)
@given(value=_json, garbage=st.binary(max_size=40))
def test_collection_never_raises_on_hostile_json(
    tmp_path_factory: pytest.TempPathFactory, value: object, garbage: bytes
) -> None:
    raw = json.dumps(value).encode()
    for blob in (raw, raw + garbage, garbage + raw, raw[: len(raw) // 2]):
        output, rejection = _collect(tmp_path_factory.mktemp("ws"), blob)
        assert (output is None) or rejection is None


# --- the task input from a client ---------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_a_deep_input_is_rejected_before_the_run(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    with pytest.raises(InputRejected, match="input nests deeper than 64 levels"):
        sandbox.run(Task.wasm(guests["hello"], input=_nested(65)))
    r = sandbox.run(Task.wasm(guests["hello"], input=_nested(64)))
    assert r.status is Status.COMPLETED


def test_the_input_depth_comes_from_the_policy() -> None:
    policy = Policy(limits=Limits(input_depth=3))
    assert encode_input(apply(policy, Task.wasm(MODULE, input=_nested(3)))) == b"[[[1]]]"
    with pytest.raises(InputRejected, match="deeper than 3"):
        encode_input(apply(policy, Task.wasm(MODULE, input=_nested(4))))


def test_an_input_too_deep_to_serialise_is_rejected() -> None:
    # Pydantic refuses such an input; a Task built without validation must be refused too.
    task = Task.model_construct(kind=TaskKind.WASM, module_bytes=MODULE, input=_nested(100_000),
                                id="deep")
    plan = apply(Policy(), Task.wasm(MODULE))
    object.__setattr__(plan, "task", task)
    with pytest.raises(InputRejected, match="nests deeper"):
        encode_input(plan)
