"""Threat: a task (or a local user) shapes /task/output, or the workspace root, to break the host.

- Deep trees (issue 11 class 3): ~1,100 nested directories put paths past PATH_MAX; cleanup
  and reclaim that recurse or use paths raise, leak the workspace, and then every later
  `Sandbox()` on that root fails. Removal must be iterative and fd-relative, every failure in
  cleanup and reclaim contained, and depth stopped while the guest runs.
- Output hidden where a path-based walk cannot see it (class 4) must still count against the
  caps: the walk is fd-relative and what it cannot inspect counts as over the cap.
- The in-run size stop must really stop the guest early (issue 20 item 4).
- Symlinks are never followed: no host byte is collected through one (issue 20 item 5).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasmbox import Policy, Resources, Sandbox, Status, Task, apply
from wasmbox.models import OutputPolicy, TierName
from wasmbox.workspace import PREFIX, RUNNING, Workspace, reclaim_stale, remove_tree, workspace_root

MakeSandbox = Callable[..., Sandbox]
SECRET = b"host-secret-7f3a9c"
DEEP = 2_000


@pytest.fixture(autouse=True)
def no_workspace_left_behind() -> Iterator[None]:
    before = {p.name for p in workspace_root().glob(PREFIX + "*")}
    yield
    after = {p.name for p in workspace_root().glob(PREFIX + "*")}
    assert after <= before, f"workspaces leaked: {after - before}"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant_chain(top: Path, levels: int, name: str = "dddddddd") -> None:
    """A chain of directories `levels` deep, built fd-relative (paths would pass PATH_MAX)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
            f.write(b"bottom")
    finally:
        os.close(fd)


# --- deep trees: the run, the cleanup, the next sandbox -------------------------------------


def test_a_deep_tree_is_stopped_while_the_guest_runs(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    task = Task.wasm(guests["deep_tree"], input={"levels": 1100, "spin": 1},
                     resources=Resources(timeout=10))
    with make_sandbox() as sb:
        r = sb.run(task)
    # Only the live check can stop a guest that spins after building: without it, TIMEOUT.
    assert r.status is Status.OUTPUT_REJECTED
    assert r.reason == f"{RUNNING}output nests deeper than 8 directories"
    assert r.files == {}


def test_a_tree_past_path_max_is_cleaned_up_and_the_next_sandbox_starts(
    make_sandbox: MakeSandbox, guests: dict[str, Path], tmp_path: Path
) -> None:
    # The policy allows the depth, so the guest really leaves 1,100 levels behind.
    policy = Policy(output=OutputPolicy(max_depth=5000, max_files=5000))
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["deep_tree"], input={"levels": 1100}))
    assert r.status is Status.COMPLETED, r.reason
    assert r.stdout.strip() == "deep_tree reached 1100"
    # (the autouse fixture asserts the workspace is gone)
    with Sandbox(workspace_root=tmp_path) as later:
        assert later.doctor()


def test_a_deep_tree_with_the_default_policy_is_rejected_and_removed(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    with make_sandbox() as sb:
        r = sb.run(Task.wasm(guests["deep_tree"], input={"levels": 1100}))
        again = sb.run(Task.wasm(guests["hello"]))
    assert r.status is Status.OUTPUT_REJECTED
    assert "deeper than 8 directories" in (r.reason or "")
    assert again.status is Status.COMPLETED


def test_a_planted_deep_tree_is_reclaimed_and_sandboxes_start(tmp_path: Path) -> None:
    host_file = tmp_path / "outside"
    host_file.write_bytes(SECRET)
    stale = tmp_path / f"{PREFIX}{_dead_pid()}-planted"
    _plant_chain(stale, DEEP)
    os.symlink(host_file, stale / "link")  # removed, never followed
    os.symlink(tmp_path, stale / "dirlink")
    locked = stale / "locked"
    locked.mkdir()
    (locked / "f").write_bytes(b"x")
    locked.chmod(0o000)
    with Sandbox(workspace_root=tmp_path) as sb:
        assert sb.doctor()
    assert not stale.exists()
    assert host_file.read_bytes() == SECRET


def test_remove_tree_handles_depth_links_and_locked_dirs(tmp_path: Path) -> None:
    target = tmp_path / "keep"
    target.mkdir()
    (target / "f").write_bytes(SECRET)
    tree = tmp_path / "tree"
    _plant_chain(tree, DEEP)
    (tree / "ro").mkdir()
    (tree / "ro" / "f").write_bytes(b"x")
    (tree / "ro").chmod(0o500)
    os.symlink(target, tree / "to-dir")
    remove_tree(tree)
    assert not tree.exists()
    assert (target / "f").read_bytes() == SECRET
    remove_tree(tree)  # already gone: not an error
    link = tmp_path / "link"
    os.symlink(target, link)
    remove_tree(link)  # a symlink is removed, its target kept
    assert not link.exists()
    assert (target / "f").exists()


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_reclaim_survives_a_tree_it_cannot_remove(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = tmp_path / f"{PREFIX}{_dead_pid()}-stuck"
    stuck.mkdir()
    pinned = stuck / "pinned"
    pinned.write_bytes(b"x")
    if subprocess.run(["chattr", "+i", str(pinned)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    other = tmp_path / f"{PREFIX}{_dead_pid()}-other"
    other.mkdir()
    try:
        with caplog.at_level("WARNING", logger="wasmbox"):
            reclaimed = reclaim_stale(tmp_path)
            with Sandbox(workspace_root=tmp_path) as sb:
                assert sb.doctor()
        assert reclaimed == [str(other)]
        assert any(str(stuck) in rec.getMessage() for rec in caplog.records)
    finally:
        subprocess.run(["chattr", "-i", str(pinned)], check=False)


# --- outputs a path-based walk cannot see ---------------------------------------------------


def test_a_big_file_past_path_max_counts_against_the_cap(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    policy = Policy(output=OutputPolicy(max_depth=5000, max_files=5000,
                                        max_file_bytes="1M", max_total_bytes="1M"))
    task = Task.wasm(guests["deep_tree"],
                     input={"levels": 1100, "bytes": 64 << 20, "spin": 1},
                     resources=Resources(timeout=20))
    with make_sandbox(policy) as sb:
        r = sb.run(task)
    # A walk that skips what it cannot scandir never sees big.bin: the guest spins to TIMEOUT.
    assert r.status is Status.OUTPUT_REJECTED
    assert (r.reason or "").startswith(RUNNING)
    assert "big.bin exceeds 1048576 bytes" in (r.reason or "")


def test_output_that_cannot_be_inspected_counts_as_over_the_cap(tmp_path: Path) -> None:
    plan = apply(Policy(), Task.wasm(b"\0asm\1\0\0\0"))
    with Workspace(plan, tmp_path) as ws:
        os.rmdir(ws.output_dir)
        os.symlink(tmp_path, ws.output_dir)  # not a directory the walk may enter
        reason = ws.over_cap()
        collected = ws.collect()
    assert reason is not None and reason.startswith(RUNNING)
    assert collected.rejection is not None
    assert collected.files == {}


# --- the in-run size stop is early --------------------------------------------------------


def test_the_output_size_cap_stops_the_guest_early(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    policy = Policy(output=OutputPolicy(max_file_bytes="1M", max_total_bytes="1M"))
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["output_writer"], input={"mib": 256},
                             resources=Resources(timeout=60)))
    assert r.status is Status.OUTPUT_REJECTED
    assert r.reason == f"{RUNNING}big.bin exceeds 1048576 bytes"
    assert "output_writer done" not in r.stdout
    progress = [int(line.split()[-1]) for line in r.stdout.splitlines()
                if line.startswith("output_writer wrote")]
    assert max(progress, default=0) < 128  # stopped far below the 256 MiB it meant to write


# --- symlinks: behaviour, not wording -------------------------------------------------------


def _leaked(r_files: dict[str, bytes], *texts: object) -> bool:
    blobs = [*r_files.values(), *(str(t).encode() for t in texts)]
    return any(SECRET in blob for blob in blobs)


@pytest.mark.parametrize("layout", ["file", "dir", "nested"])
def test_no_host_byte_is_collected_through_a_symlink(tmp_path: Path, layout: str) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_bytes(SECRET)
    plan = apply(Policy(), Task.wasm(b"\0asm\1\0\0\0"))
    with Workspace(plan, tmp_path) as ws:
        out = Path(ws.output_dir)
        if layout == "file":
            os.symlink(host / "secret", out / "link")
        elif layout == "dir":
            os.symlink(host, out / "link")
        else:
            (out / "a").mkdir()
            os.symlink(host / "secret", out / "a" / "link")
        (out / "ok.txt").write_bytes(b"fine")
        collected = ws.collect()
    assert collected.rejection is not None
    assert collected.files == {}
    assert not _leaked(collected.files, collected.output, collected.rejection)


def test_a_guest_planted_symlink_yields_no_host_bytes(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    r = sandbox.run(Task.wasm(guests["symlink_plant"]))
    created = "symlink_plant CREATED" in r.stdout
    if created:
        assert r.status is Status.OUTPUT_REJECTED
    assert r.files == {}
    passwd = Path("/etc/passwd").read_bytes()[:32]
    assert not any(passwd in blob for blob in [r.model_dump_json().encode()])


# --- fuzzed trees ---------------------------------------------------------------------------

_names = st.text(alphabet="ab.-_x", min_size=1, max_size=3).filter(lambda n: n not in (".", ".."))
_tree = st.recursive(
    st.one_of(st.binary(max_size=16), st.just(("symlink",)), st.just(("fifo",))),
    lambda children: st.dictionaries(_names, children, max_size=4),
    max_leaves=12,
)


def _build(path: Path, node: object, outside: Path) -> None:
    if isinstance(node, dict):
        path.mkdir()
        for name, child in node.items():
            _build(path / name, child, outside)
    elif node == ("symlink",):
        os.symlink(outside, path)
    elif node == ("fifo",):
        os.mkfifo(path)
    else:
        assert isinstance(node, bytes)
        path.write_bytes(node)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(_names, _tree, max_size=5), max_depth=st.integers(1, 4))
def test_fuzzed_output_trees_are_collected_or_rejected_and_always_removed(
    tmp_path: Path, tree: dict[str, object], max_depth: int
) -> None:
    outside = tmp_path / "outside"
    if not outside.exists():
        outside.write_bytes(SECRET)
    plan = apply(Policy(output=OutputPolicy(max_depth=max_depth)), Task.wasm(b"\0asm\1\0\0\0"))
    ws = Workspace(plan, tmp_path)
    try:
        for name, node in tree.items():
            _build(Path(ws.output_dir) / name, node, outside)
        assert isinstance(ws.over_cap(), str | None)
        collected = ws.collect()
    finally:
        ws.close()
    assert not Path(ws.path).exists()
    assert outside.read_bytes() == SECRET
    assert not _leaked(collected.files)
    if collected.rejection is None:
        for rel in collected.files:
            assert ".." not in rel.split("/") and not rel.startswith("/")


# --- the container tier builds the same tree ------------------------------------------------


@pytest.fixture(scope="module")
def container_sandbox() -> Iterator[Sandbox]:
    from wasmbox.tiers.container import ContainerTier

    if shutil.which("crun") is None and shutil.which("runc") is None:
        pytest.skip("no OCI runtime installed")
    sb = Sandbox(tiers={TierName.CONTAINER: ContainerTier})
    available = sb.availability(TierName.CONTAINER)
    if not available.ok:
        sb.close()
        pytest.skip(f"container tier unavailable: {available.reason}")
    with contextlib.closing(sb):
        yield sb


def test_a_deep_tree_in_a_container_is_stopped_and_removed(
    container_sandbox: Sandbox,
) -> None:
    script = ("cd /task/output && i=0; while [ $i -lt 1100 ]; do "
              "mkdir dddddddd && cd dddddddd || break; i=$((i+1)); done; "
              "echo reached $i; sleep 30")
    r = container_sandbox.run(Task.command(["/bin/sh", "-c", script],
                                           resources=Resources(timeout=20)))
    assert r.status is Status.OUTPUT_REJECTED, (r.status, r.reason, r.stderr)
    assert r.reason == f"{RUNNING}output nests deeper than 8 directories"
    again = container_sandbox.run(Task.command(["/bin/true"]))
    assert again.status is Status.COMPLETED
