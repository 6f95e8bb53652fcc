"""A minimal QMP client: the few monitor commands snapshots need, every wait bounded.

Only commands QEMU 7.2 documents are used (``qmp_capabilities``, ``getfd``,
``migrate-set-capabilities``, ``migrate``, ``migrate-incoming``, ``query-migrate``) and one
event, ``RESUME``.
Replies are read line by line with a size cap; asynchronous events are set aside by name, so
`wait_event` finds one that arrived while a reply was awaited. Commands can be pipelined
(`execute_all`): one round trip for several.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from wasmbox.errors import HostFailure

_MAX_LINE = 1 << 16


class QmpError(HostFailure):
    """QEMU's monitor refused a command, went away, or did not answer in time."""


class Qmp:
    """One connection to a QEMU monitor socket; `close()` drops it."""

    def __init__(self, path: Path, timeout: float) -> None:
        end = time.monotonic() + timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._events: list[str] = []
        try:
            while True:  # QEMU creates the socket a little after it starts
                try:
                    self._sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    if time.monotonic() >= end:
                        raise QmpError(f"no QEMU monitor at {path}: {exc}") from exc
                    time.sleep(0.002)
            self._sock.settimeout(max(0.01, end - time.monotonic()))
            self._line()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def execute(self, command: str, fds: tuple[int, ...] = (), **arguments: Any) -> Any:
        """Run `command`, passing `fds` with it (SCM_RIGHTS); its ``return`` value.

        Raises `QmpError` when QEMU answers with an error or the connection fails.
        """
        return self.execute_all([(command, arguments)], fds)[0]

    def execute_all(self, commands: list[tuple[str, dict[str, Any]]],
                    fds: tuple[int, ...] = ()) -> list[Any]:
        """Send `commands` (name, arguments) at once, then read their replies in order: one
        round trip. `fds` go with the first. Raises `QmpError` at the first refusal (QEMU
        still runs the later commands: pipeline only commands that may follow a failure)."""
        data = b"".join(
            json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode()
            + b"\n" for name, args in commands)
        results = []
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.sendall(data)
            for name, _ in commands:
                reply = self._reply()
                if "error" in reply:
                    raise QmpError(f"QEMU refused {name}: {reply['error']}")
                results.append(reply.get("return"))
        except OSError as exc:
            raise QmpError(f"QEMU monitor failed during {commands[0][0]}: {exc}") from exc
        return results

    def wait_event(self, name: str, timeout: float) -> None:
        """Return once QEMU sent the event `name` (also if it came while a command's reply
        was awaited). Raises `QmpError` on timeout or when the monitor goes away."""
        if name in self._events:
            return
        self._sock.settimeout(max(0.01, timeout))
        try:
            while True:
                reply = self._line()
                if reply.get("event") == name:
                    return
        except OSError as exc:
            raise QmpError(f"QEMU monitor failed awaiting {name}: {exc}") from exc

    def _reply(self) -> dict[str, Any]:
        while True:
            reply = self._line()
            if "event" not in reply:
                return reply
            self._events = [*self._events[-15:], str(reply["event"])]

    def close(self) -> None:
        """Drop the connection."""
        self._sock.close()

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if len(self._buf) > _MAX_LINE:
                raise QmpError("QEMU monitor sent an overlong line")
            chunk = self._sock.recv(4096)
            if not chunk:
                raise QmpError("QEMU monitor closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"QEMU monitor sent bad JSON: {line[:200]!r}") from exc
        if not isinstance(reply, dict):
            raise QmpError("QEMU monitor sent a non-object")
        return reply
