"""Threat: a task gets a secret the policy's deny patterns cover out through some channel.

Issue 11 class 10: with ``on_deny = reject`` the secret still came back in stdout/stderr (and
after TIMEOUT); the parsed output (where a ``\\u0041KIA`` escape hides it from a byte match),
output file names and ``reason`` were not filtered at all. Every channel a `Result` carries is
filtered, for every status and both ``on_deny`` modes: the secret never appears anywhere in
the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial._hang import finishes
from wasmbox import Policy, Resources, Sandbox, Status, Task, apply
from wasmbox.models import DenyAction, OutputPolicy
from wasmbox.workspace import REDACTED, Workspace, filter_stream, redact_text

MakeSandbox = Callable[..., Sandbox]
SECRET = "AKIAABCDEFGHIJKLMNOP"
PATTERN = "AKIA[0-9A-Z]{16}"
MODULE = b"\0asm\1\0\0\0"


def _policy(mode: DenyAction, **caps: object) -> Policy:
    return Policy(output=OutputPolicy(deny_patterns=(PATTERN,), on_deny=mode, **caps))  # type: ignore[arg-type]


def _everything(r: object) -> bytes:
    """Every byte a result carries, as a client would receive it (files included)."""
    from wasmbox import Result

    assert isinstance(r, Result)
    return r.model_dump_json().encode() + b"".join(r.files.values()) + b"".join(
        k.encode() for k in r.files)


END_STATUS = {
    "exit": {Status.OUTPUT_REJECTED, Status.COMPLETED},
    "fail": {Status.OUTPUT_REJECTED, Status.FAILED},
    "loop": {Status.TIMEOUT},
    "trap": {Status.CRASHED},
}


@pytest.mark.parametrize("mode", list(DenyAction))
@pytest.mark.parametrize("end", list(END_STATUS))
def test_the_secret_leaves_through_no_channel_whatever_the_status(
    make_sandbox: MakeSandbox, guests: dict[str, Path], mode: DenyAction, end: str
) -> None:
    task = Task.wasm(guests["secret_leak"], input={"secret": SECRET, "end": end},
                     resources=Resources(timeout="1s"))
    with make_sandbox(_policy(mode)) as sb:
        r = sb.run(task)
    assert r.status in END_STATUS[end], (r.status, r.reason)
    if mode is DenyAction.REJECT and end in ("exit", "fail"):
        assert r.status is Status.OUTPUT_REJECTED
    assert SECRET.encode() not in _everything(r)
    assert "stdout says " in r.stdout  # the stream itself is kept, with the match redacted
    assert REDACTED.decode() in r.stdout and REDACTED.decode() in r.stderr


def test_redaction_reaches_the_decoded_result_and_file_names(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    with make_sandbox(_policy(DenyAction.REDACT)) as sb:
        r = sb.run(Task.wasm(guests["secret_leak"], input={"secret": SECRET, "end": "exit"}))
    assert r.status is Status.COMPLETED, r.reason
    assert r.output == {"value": REDACTED.decode(), REDACTED.decode(): 1}
    assert json.loads(r.files["result.json"]) == r.output  # the file is the redacted result
    assert sorted(r.files) == [f"0-{REDACTED.decode()}", "result.json"]


@pytest.mark.parametrize("mode", list(DenyAction))
def test_a_reason_naming_the_secret_is_redacted(
    make_sandbox: MakeSandbox, guests: dict[str, Path], mode: DenyAction
) -> None:
    # The file "0-<secret>" is over the per-file cap: the reason names it.
    policy = _policy(mode, max_file_bytes=8, max_total_bytes=1024)
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["secret_leak"], input={"secret": SECRET, "end": "exit"}))
    assert r.status is Status.OUTPUT_REJECTED
    assert r.reason is not None and "exceeds 8 bytes" in r.reason
    assert SECRET.encode() not in _everything(r)


def _collect(tmp_path: Path, mode: DenyAction, files: dict[str, bytes]) -> tuple[
        dict[str, bytes], object, str | None]:
    with Workspace(apply(_policy(mode), Task.wasm(MODULE)), tmp_path) as ws:
        for name, data in files.items():
            Path(ws.output_dir, name).write_bytes(data)
        c = ws.collect()
    return c.files, c.output, c.rejection


@pytest.mark.parametrize("mode", list(DenyAction))
def test_a_json_escape_does_not_hide_the_secret(tmp_path: Path, mode: DenyAction) -> None:
    escaped = json.dumps({"k": SECRET, "n": [SECRET, {SECRET: 1}]}, ensure_ascii=True)
    escaped = escaped.replace("AKIA", "\\u0041KIA")
    assert SECRET.encode() not in escaped.encode()
    files, output, rejection = _collect(tmp_path, mode, {"result.json": escaped.encode()})
    if mode is DenyAction.REJECT:
        assert rejection is not None and "result.json" in rejection
        assert files == {} or rejection is not None
    else:
        assert rejection is None
        assert SECRET not in json.dumps(output)
        assert SECRET not in json.loads(files["result.json"]).__repr__()


@pytest.mark.parametrize("mode", list(DenyAction))
def test_a_file_name_does_not_carry_the_secret(tmp_path: Path, mode: DenyAction) -> None:
    files, _, rejection = _collect(tmp_path, mode, {f"x-{SECRET}.txt": b"harmless"})
    if mode is DenyAction.REJECT:
        assert rejection is not None and SECRET not in rejection
    else:
        assert rejection is None
        assert list(files) == [f"x-{REDACTED.decode()}.txt"]


def test_a_rejected_stream_comes_back_redacted() -> None:
    caps = OutputPolicy(deny_patterns=(PATTERN,))
    data, rejection = filter_stream(f"key={SECRET}\n".encode(), caps, "stdout")
    assert rejection == f"deny pattern {PATTERN!r} matched in stdout"
    assert data == b"key=[REDACTED]\n"


def test_deny_patterns_run_in_linear_time_where_re2_can() -> None:
    # Operator patterns, but matched against task output: RE2 makes ^(a+)+$ harmless.
    out = finishes(
        "from wasmbox.models import OutputPolicy\n"
        "from wasmbox.workspace import filter_stream\n"
        "caps = OutputPolicy(deny_patterns=('^(a+)+$',))\n"
        "print(filter_stream(b'a' * 64 + b'!', caps, 'stdout'))\n")
    assert out.strip() == repr((b"a" * 64 + b"!", None))
    # A pattern RE2 cannot compile (lookahead) still works, on Python's engine.
    caps = OutputPolicy(deny_patterns=("secret(?=-[0-9])",), on_deny=DenyAction.REDACT)
    assert filter_stream(b"a secret-1 b", caps, "stdout") == (b"a [REDACTED]-1 b", None)


_noise = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0/"), max_size=20)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(list(DenyAction)), before=_noise, after=_noise,
       where=st.sampled_from(["content", "name", "json-value", "json-key", "json-escaped"]))
def test_fuzzed_placements_never_leak(tmp_path_factory: pytest.TempPathFactory,
                                      mode: DenyAction, before: str, after: str,
                                      where: str) -> None:
    text = before + SECRET + after
    if where == "content":
        files = {"out.txt": text.encode()}
    elif where == "name":
        files = {"n" + text.replace(".", "_")[:200]: b"x"}
    elif where == "json-value":
        files = {"result.json": json.dumps([text]).encode()}
    elif where == "json-key":
        files = {"result.json": json.dumps({text: 1}, ensure_ascii=False).encode()}
    else:
        files = {"result.json": json.dumps([text]).replace("AKIA", "\\u0041KIA").encode()}
    try:
        got, output, rejection = _collect(tmp_path_factory.mktemp("ws"), mode, files)
    except OSError:  # a generated name the filesystem refuses
        return
    if rejection is not None:
        assert got == {} or mode is DenyAction.REJECT
        assert SECRET not in redact_text(rejection, OutputPolicy(deny_patterns=(PATTERN,)))
        return
    assert mode is DenyAction.REDACT
    blob = json.dumps(output, ensure_ascii=False) + "".join(got) + "".join(
        v.decode("utf-8", "replace") for v in got.values())
    assert SECRET not in blob
    assert json.loads(got["result.json"]) == output if "result.json" in got else True
