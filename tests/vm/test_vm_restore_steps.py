"""A restore's host side without QEMU: the monitor's pipelined commands and events, the
guest armed only after QEMU said RESUME, and the reaper that removes finished guests."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from wasmbox.tiers.vm.machine import Machine
from wasmbox.tiers.vm.qmp import Qmp, QmpError
from wasmbox.tiers.vm.reaper import Reaper
from wasmbox.tiers.vm.snapshot import SnapshotError, resume

Script = Callable[[socket.socket, list[dict[str, Any]]], None]


def _read(conn: socket.socket, buf: bytearray) -> dict[str, Any]:
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            raise EOFError
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return cast(dict[str, Any], json.loads(line))


def _send(conn: socket.socket, *messages: dict[str, Any]) -> None:
    conn.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in messages))


@pytest.fixture
def monitor() -> Iterator[Callable[[Script], Path]]:
    """A fake QEMU monitor: greets, accepts qmp_capabilities, then runs the test's script."""
    threads: list[threading.Thread] = []
    with tempfile.TemporaryDirectory(prefix="wbx-", dir="/tmp") as tmp:
        def serve(script: Script) -> Path:
            path = Path(tmp) / f"qmp{len(threads)}.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(1)

            def run() -> None:
                conn, _ = listener.accept()
                listener.close()
                with conn:
                    buf = bytearray()
                    _send(conn, {"QMP": {"version": {}}})
                    assert _read(conn, buf)["execute"] == "qmp_capabilities"
                    _send(conn, {"return": {}})
                    received: list[dict[str, Any]] = []
                    try:
                        script(conn, received)
                        while True:
                            received.append(_read(conn, buf))
                    except (EOFError, OSError):
                        pass

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            threads.append(thread)
            return path

        yield serve
        for thread in threads:
            thread.join(5)


def test_pipelined_commands_get_their_replies_in_order(
    monitor: Callable[[Script], Path],
) -> None:
    def script(conn: socket.socket, _: list[dict[str, Any]]) -> None:
        buf = bytearray()
        first, second = _read(conn, buf), _read(conn, buf)
        assert (first["execute"], second["execute"]) == ("a", "b")
        _send(conn, {"event": "X"}, {"return": 1}, {"return": {"n": second["arguments"]["n"]}})

    qmp = Qmp(monitor(script), 5.0)
    try:
        assert qmp.execute_all([("a", {}), ("b", {"n": 2})]) == [1, {"n": 2}]
    finally:
        qmp.close()


def test_a_refused_command_raises(monitor: Callable[[Script], Path]) -> None:
    def script(conn: socket.socket, _: list[dict[str, Any]]) -> None:
        buf = bytearray()
        _read(conn, buf)
        _send(conn, {"error": {"class": "GenericError", "desc": "no"}})

    qmp = Qmp(monitor(script), 5.0)
    try:
        with pytest.raises(QmpError, match="refused a"):
            qmp.execute_all([("a", {})])
    finally:
        qmp.close()


def test_an_event_sent_before_a_reply_is_not_lost(monitor: Callable[[Script], Path]) -> None:
    def script(conn: socket.socket, _: list[dict[str, Any]]) -> None:
        _read(conn, bytearray())
        _send(conn, {"event": "RESUME"}, {"return": {}})

    qmp = Qmp(monitor(script), 5.0)
    try:
        qmp.execute("migrate-incoming")
        qmp.wait_event("RESUME", 1.0)  # already seen: no wait for another
    finally:
        qmp.close()


def test_waiting_for_an_event_is_bounded(monitor: Callable[[Script], Path]) -> None:
    qmp = Qmp(monitor(lambda conn, _: _send(conn, {"event": "STOP"})), 5.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(QmpError):
            qmp.wait_event("RESUME", 0.2)
        assert time.monotonic() - t0 < 3.0
    finally:
        qmp.close()


class FakeMachine:
    """What `resume` uses of a `Machine`: the monitor, arming, readiness, close."""

    def __init__(self, monitor_path: Path) -> None:
        self.monitor_path = monitor_path
        self.incoming_fd = 7
        self.events: list[str] = []
        self.closed = False

    def arm(self) -> None:
        self.events.append("arm")

    def wait_ready(self, timeout: float) -> bool:
        return True

    def qemu_errors(self) -> str:
        return "load of migration failed"

    def serial_tail(self) -> str:
        return ""

    def close(self) -> None:
        self.closed = True


def test_a_restored_guest_is_armed_only_after_qemu_resumed_it(
    monitor: Callable[[Script], Path],
) -> None:
    machine: FakeMachine

    def script(conn: socket.socket, received: list[dict[str, Any]]) -> None:
        buf = bytearray()
        commands = [_read(conn, buf), _read(conn, buf)]
        assert [c["execute"] for c in commands] == ["migrate-set-capabilities",
                                                     "migrate-incoming"]
        assert commands[1]["arguments"] == {"uri": "fd:7"}
        _send(conn, {"return": {}}, {"return": {}})
        time.sleep(0.3)  # the state loads
        machine.events.append("resumed")
        _send(conn, {"event": "RESUME"})

    machine = FakeMachine(monitor(script))
    assert resume(cast(Machine, machine), 5.0) is cast(Machine, machine)
    assert machine.events == ["resumed", "arm"]
    assert not machine.closed


def test_a_restore_whose_qemu_dies_while_loading_is_closed(
    monitor: Callable[[Script], Path],
) -> None:
    def script(conn: socket.socket, _: list[dict[str, Any]]) -> None:
        buf = bytearray()
        _read(conn, buf), _read(conn, buf)
        _send(conn, {"return": {}}, {"return": {}})
        conn.close()  # a failed load ends QEMU, and its monitor with it

    machine = FakeMachine(monitor(script))
    with pytest.raises((QmpError, SnapshotError)):
        resume(cast(Machine, machine), 5.0)
    assert machine.closed and machine.events == []


class Closing:
    """A stand-in for a finished guest: counts its closes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.closes = 0

    def close(self) -> None:
        time.sleep(self.delay)
        self.closes += 1


def test_the_reaper_closes_what_it_is_handed() -> None:
    reaper = Reaper()
    try:
        machines = [Closing() for _ in range(3)]
        for m in machines:
            reaper.reap(cast(Machine, m))
        assert reaper.wait_idle(5.0)
        assert [m.closes for m in machines] == [1, 1, 1]
    finally:
        reaper.close()


def test_closing_the_reaper_closes_every_guest_still_queued() -> None:
    reaper = Reaper()
    machines = [Closing(delay=0.1) for _ in range(4)]
    for m in machines:
        reaper.reap(cast(Machine, m))
    reaper.close()
    assert [m.closes for m in machines] == [1, 1, 1, 1]


def test_a_closed_reaper_closes_at_once() -> None:
    reaper = Reaper()
    reaper.close()
    late = Closing()
    reaper.reap(cast(Machine, late))
    assert late.closes == 1
