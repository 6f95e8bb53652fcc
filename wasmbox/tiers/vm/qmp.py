"""A minimal QMP client: the few monitor commands snapshots need, every wait bounded.

Only commands QEMU 7.2 documents are used (``qmp_capabilities``, ``getfd``,
``migrate-set-capabilities``, ``migrate``, ``migrate-incoming``, ``query-migrate``,
``query-status``).
Replies are read line by line with a size cap; asynchronous events are skipped.
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
        try:
            while True:  # QEMU creates the socket a little after it starts
                try:
                    self._sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    if time.monotonic() >= end:
                        raise QmpError(f"no QEMU monitor at {path}: {exc}") from exc
                    time.sleep(0.005)
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
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.sendall(data)
            while True:
                reply = self._line()
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise QmpError(f"QEMU refused {command}: {reply['error']}")
                return reply.get("return")
        except OSError as exc:
            raise QmpError(f"QEMU monitor failed during {command}: {exc}") from exc

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
