"""Workspace: input staging and output collection under caps, links and filters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasmbox import InputRejected, Policy, Task, apply
from wasmbox.models import DenyAction, Limits, OutputPolicy
from wasmbox.workspace import PREFIX, RUNNING, Workspace, encode_input

MODULE = b"\0asm\1\0\0\0"


def workspace(tmp_path: Path, policy: Policy | None = None, **task: object) -> Workspace:
    return Workspace(apply(policy or Policy(), Task.wasm(MODULE, **task)), tmp_path)


def test_input_is_staged_read_only(tmp_path: Path) -> None:
    with workspace(tmp_path, input={"a": 1}) as ws:
        assert Path(ws.input_path).read_bytes() == b'{"a":1}'
        assert os.stat(ws.input_path).st_mode & 0o222 == 0


def test_oversized_input_is_rejected_before_anything_is_created(tmp_path: Path) -> None:
    policy = Policy(limits=Limits(input_bytes=16))
    with pytest.raises(InputRejected,
                       match=r"over the 16 cap \(the policy.s \[limits\] input_bytes\)"):
        workspace(tmp_path, policy, input={"data": "x" * 100})
    assert list(tmp_path.iterdir()) == []


def test_input_failing_its_schema_is_rejected(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["n"]}
    with pytest.raises(InputRejected, match="schema"):
        workspace(tmp_path, input={"m": 1}, input_schema=schema)


def test_nan_is_not_json(tmp_path: Path) -> None:
    with pytest.raises(InputRejected, match="not JSON"):
        workspace(tmp_path, input=[float("nan")])


def test_close_removes_everything_even_read_only_dirs(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    nested = Path(ws.output_dir) / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "f").write_text("x")
    nested.chmod(0o500)
    ws.close()
    assert not Path(ws.path).exists()
    assert Path(ws.path).name.startswith(PREFIX)


def test_result_json_is_parsed(tmp_path: Path) -> None:
    with workspace(tmp_path) as ws:
        Path(ws.output_dir, "result.json").write_text('{"ok": true}')
        collected = ws.collect()
    assert collected.rejection is None
    assert collected.output == {"ok": True}


def test_result_failing_the_output_schema_is_rejected(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["sum"]}
    with workspace(tmp_path, output_schema=schema) as ws:
        Path(ws.output_dir, "result.json").write_text('{"total": 1}')
        assert "fails its schema" in (ws.collect().rejection or "")


def test_a_missing_result_is_rejected_when_a_schema_expects_one(tmp_path: Path) -> None:
    with workspace(tmp_path, output_schema={"type": "object"}) as ws:
        assert "result.json" in (ws.collect().rejection or "")


def test_invalid_result_json_is_rejected(tmp_path: Path) -> None:
    with workspace(tmp_path) as ws:
        Path(ws.output_dir, "result.json").write_text("{not json")
        assert "not valid JSON" in (ws.collect().rejection or "")


def test_a_symlink_is_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    with workspace(tmp_path) as ws:
        os.symlink(secret, Path(ws.output_dir, "link"))
        Path(ws.output_dir, "plain").write_text("fine")
        collected = ws.collect()
    # Behaviour, not wording: the run is refused and no host byte comes back.
    assert collected.rejection is not None
    assert collected.files == {} and collected.output is None
    assert "host secret" not in collected.rejection
    assert secret.read_text() == "host secret"


def test_a_hard_link_is_rejected(tmp_path: Path) -> None:
    host_file = tmp_path / "host"
    host_file.write_text("host data")
    with workspace(tmp_path) as ws:
        os.link(host_file, Path(ws.output_dir, "hard"))
        assert ws.collect().rejection == "hard is a hard link"


def test_a_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    with workspace(tmp_path) as ws:
        os.mkfifo(Path(ws.output_dir, "pipe"))
        assert ws.collect().rejection == "pipe is not a regular file"


def test_too_many_files_are_rejected(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_files=3))
    with workspace(tmp_path, policy) as ws:
        for i in range(4):
            Path(ws.output_dir, f"f{i}").write_text("x")
        assert ws.collect().rejection == "more than 3 output files"
        assert ws.over_cap() == "more than 3 output files"


def test_a_file_over_the_per_file_cap_is_rejected(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_file_bytes=10, max_total_bytes=100))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "big").write_bytes(b"x" * 11)
        assert ws.collect().rejection == "big exceeds 10 bytes"


def test_outputs_over_the_total_cap_are_rejected(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_file_bytes=10, max_total_bytes=15))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "a").write_bytes(b"x" * 8)
        Path(ws.output_dir, "b").write_bytes(b"x" * 8)
        assert ws.collect().rejection == "outputs exceed 15 bytes in total"


def test_deep_nesting_is_rejected(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_depth=2))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "a/b").mkdir(parents=True)
        assert ws.over_cap() is None and ws.collect().rejection is None
        Path(ws.output_dir, "a/b/c/d").mkdir(parents=True)
        assert ws.collect().rejection == "output nests deeper than 2 directories"
        # While running the same cap trips, with a reason of its own.
        assert ws.over_cap() == f"{RUNNING}output nests deeper than 2 directories"


def test_size_caps_while_running_have_reasons_of_their_own(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_file_bytes=10, max_total_bytes=15))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "d").mkdir()
        Path(ws.output_dir, "d", "a").write_bytes(b"x" * 8)
        assert ws.over_cap() is None
        assert ws.output_bytes() == 8
        Path(ws.output_dir, "d", "b").write_bytes(b"x" * 8)
        assert ws.over_cap() == f"{RUNNING}outputs exceed 15 bytes in total"
        assert ws.collect().rejection == "outputs exceed 15 bytes in total"


def test_input_encoded_early_is_staged_as_given(tmp_path: Path) -> None:
    plan = apply(Policy(), Task.wasm(MODULE, input={"a": 1}))
    data = encode_input(plan)
    with Workspace(plan, tmp_path, data=data) as ws:
        assert Path(ws.input_path).read_bytes() == data == b'{"a":1}'


def test_close_removes_unreadable_dirs_and_dangling_links(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    locked = Path(ws.output_dir, "locked")
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_text("x")
    os.symlink("/nonexistent", locked / "dangling")
    (locked / "inner").chmod(0)
    locked.chmod(0)
    ws.close()
    assert not Path(ws.path).exists()


@pytest.mark.parametrize("plant", ["root-file", "root-dir", "task-dir", "deep", "no-streams"])
def test_close_removes_whatever_is_left_beside_the_known_layout(tmp_path: Path,
                                                                 plant: str) -> None:
    # close() removes the usual layout by name; anything else must still go, and a link
    # out of the workspace is removed, never followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (tmp_path / "root").mkdir()
    ws = workspace(tmp_path / "root")
    Path(ws.stdout_path).write_text("out")
    Path(ws.stderr_path).write_text("err")
    os.symlink(outside, Path(ws.output_dir, "link"))
    Path(ws.output_dir, "result.json").write_text("{}")
    if plant == "root-file":
        Path(ws.path, "pasta.log").write_text("x")
    elif plant == "root-dir":
        Path(ws.path, "bundle", "rootfs").mkdir(parents=True)
    elif plant == "task-dir":
        Path(ws.task_dir, "code").mkdir()
    elif plant == "deep":
        Path(ws.output_dir, "a", "b", "c", "d").mkdir(parents=True)
    else:
        os.unlink(ws.stdout_path)
        os.unlink(ws.stderr_path)
    ws.close()
    assert list((tmp_path / "root").iterdir()) == []
    assert (outside / "keep").read_text() == "x"


def test_close_after_collect_removes_files_that_appeared_since(tmp_path: Path) -> None:
    # close() removes what collect() listed by name; rmdir proves nothing else is there.
    ws = workspace(tmp_path)
    Path(ws.output_dir, "result.json").write_text("{}")
    assert ws.collect().rejection is None
    Path(ws.output_dir, "late").write_text("x")
    Path(ws.output_dir, "later", "deeper").mkdir(parents=True)
    ws.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, (1 << 20) + 5, (2 << 20) + 1])
def test_streams_and_outputs_are_read_whole_or_cut_at_their_cap(tmp_path: Path,
                                                                  size: int) -> None:
    # Reads stop at a short read (a regular file's end); the caps hold at every boundary.
    from wasmbox._outputs import read_stream

    cap = 10 if size < 1 << 20 else 2 << 20
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "stream"
    path.write_bytes(data)
    assert read_stream(str(path), cap) == (data[:cap], size > cap)
    os.symlink(path, tmp_path / "link")  # never followed, empty target or not
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        read_stream(str(tmp_path / "link"), cap)
    policy = Policy(output=OutputPolicy(max_file_bytes=cap, max_total_bytes=4 << 20))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "f").write_bytes(data)
        collected = ws.collect()
    if size > cap:
        assert collected.rejection == f"f exceeds {cap} bytes"
    else:
        assert collected.rejection is None and collected.files == {"f": data}


def test_deny_pattern_rejects_naming_the_file(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(deny_patterns=("AKIA[0-9A-Z]{16}",)))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "leak.txt").write_text("key=AKIAABCDEFGHIJKLMNOP")
        assert "matched in leak.txt" in (ws.collect().rejection or "")


def test_deny_pattern_can_redact_instead(tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(deny_patterns=("secret-[0-9]+",),
                                        on_deny=DenyAction.REDACT))
    with workspace(tmp_path, policy) as ws:
        Path(ws.output_dir, "out.txt").write_text("a secret-123 b")
        collected = ws.collect()
    assert collected.rejection is None
    assert collected.files["out.txt"] == b"a [REDACTED] b"


def test_stream_flood_is_detected_while_running(tmp_path: Path) -> None:
    policy = Policy(limits=Limits(stdout_bytes=1024))
    with workspace(tmp_path, policy) as ws:
        with open(ws.stdout_path, "wb") as f:
            f.truncate(10 << 20)
        assert "stdout flood" in (ws.over_cap() or "")


_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
    min_size=1, max_size=12,
).filter(lambda n: n not in (".", ".."))


@settings(max_examples=60, deadline=None,  # no timed assertion: the machine is shared
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(st.lists(_names, min_size=1, max_size=4), min_size=1, max_size=6))
def test_no_collected_path_escapes_the_output_dir(tmp_path: Path, paths: list[list[str]]) -> None:
    with workspace(tmp_path) as ws:
        root = Path(ws.output_dir)
        for parts in paths:
            target = root.joinpath(*parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.write_bytes(b"x")
            except OSError:
                continue  # a name used both as a file and a directory, or too long
        collected = ws.collect()
        for rel in collected.files:
            assert not rel.startswith("/")
            assert ".." not in rel.split("/")
            assert (root / rel).resolve().is_relative_to(root.resolve())


def test_workspaces_of_dead_processes_are_reclaimed(tmp_path: Path) -> None:
    import subprocess

    from wasmbox.workspace import reclaim_stale

    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f"{PREFIX}{proc.pid}-abc"
    (stale / "task").mkdir(parents=True)
    live = tmp_path / f"{PREFIX}{os.getpid()}-xyz"
    live.mkdir()
    assert reclaim_stale(tmp_path) == [str(stale)]
    assert not stale.exists()
    assert live.exists()
