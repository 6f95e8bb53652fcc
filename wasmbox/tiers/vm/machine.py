"""One QEMU guest: launch, wait for the ready marker, hand over a task, read its exit line.

The serial console is parsed for exactly three framed lines (`guest.READY`, `guest.ARMED`,
`guest.EXIT` with the task's nonce); nothing else on it is trusted. A guest that waits for its
task on the virtio-serial port is *armed* first: the host sends fresh entropy (and the time),
the guest credits it and says ARMED. A guest is booted, or restored from a snapshot
(``-incoming``, the RAM file mapped private so siblings share its untouched pages). A
`Machine` owns its process, sockets and files and removes them all in `close()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from wasmbox import _procstat as procstat
from wasmbox.errors import HostFailure
from wasmbox.lifecycle import Closeable
from wasmbox.tiers.vm.assets import Assets
from wasmbox.tiers.vm.console import ExitLine, arming_line, parse_exit
from wasmbox.tiers.vm.guest import ARMED, EXIT, READY
from wasmbox.tiers.vm.janitor import PID_FILE
from wasmbox.tiers.vm.qemu import (
    CMDLINE,
    GUEST_OVERHEAD_MIB,
    MIN_GUEST_MIB,
    QEMU,
    TB_SIZE_MIB,
    RamFile,
    Shape,
    guest_memory_mib,
    qemu_argv,
)
from wasmbox.workspace import remove_tree

# The command line and shapes live in `qemu`, the console's lines in `console`; they stay
# importable from here.
__all__ = [
    "CMDLINE", "GUEST_OVERHEAD_MIB", "MIN_GUEST_MIB", "QEMU", "TB_SIZE_MIB", "ExitLine",
    "Machine", "RamFile", "Shape", "arming_line", "guest_memory_mib", "probe_kvm", "qemu_argv",
]

_SERIAL_KEEP = 16384
# A reader thread the host runs late gets this long to read what an ended QEMU left in the
# pipe; a pipe holds 64 KiB at most.
_DRAIN_WAIT = 5.0
_STARVED_WAIT = 4.0  # a starved boot may take this many boot timeouts of wall time


class Machine(Closeable):
    """A running QEMU process in its own directory under the tier's run directory."""

    def __init__(self, directory: Path, assets: Assets, shape: Shape, *, kvm: bool,
                 initrd: Path | None = None, extra_cmdline: str = "", arm: bool = False,
                 ram: RamFile | None = None, incoming_fd: int | None = None,
                 monitor: bool = False) -> None:
        """Start QEMU. With `arm`, the guest is armed as soon as it is ready (pooled boots);
        with `incoming_fd`, QEMU waits for ``migrate-incoming`` on its monitor (a restore).

        Raises `HostFailure` when QEMU cannot be started.
        """
        self.dir = directory
        self.shape = shape
        self.restored = incoming_fd is not None
        self.incoming_fd = incoming_fd  # the state's fd number, inside QEMU too
        self.started = time.monotonic()
        self.ready_at: float | None = None
        # QEMU's CPU time when the guest became ready: what its boot or restore cost, apart
        # from the task's share (under TCG mostly translating code this process never ran).
        self.ready_cpu_s: float | None = None
        self._arm_on_ready = arm
        self._arm_lock = threading.Lock()
        self._ready = threading.Event()
        self._booted = threading.Event()
        self._exited = threading.Event()
        self._nonce: str | None = None
        self._exit: ExitLine | None = None
        self._serial = bytearray()
        self._conn: socket.socket | None = None
        self.dir.mkdir(mode=0o700)
        try:
            self.output_image = self.dir / "out.img"
            with open(self.output_image, "wb") as f:
                f.truncate(shape.output_bytes)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(self.dir / "task.sock"))
            self._listener.listen(1)
            argv = qemu_argv(self.dir, assets, shape, kvm=kvm,
                             initrd=initrd or assets.initramfs, extra_cmdline=extra_cmdline,
                             ram=ram, monitor=monitor or incoming_fd is not None,
                             incoming=incoming_fd is not None)
            self._stderr = open(self.dir / "qemu.stderr", "wb")  # noqa: SIM115 (closed in _release)
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
                start_new_session=True,
                pass_fds=() if incoming_fd is None else (incoming_fd,),
            )
            (self.dir / PID_FILE).write_text(str(self.process.pid))
            self._reader = threading.Thread(target=self._read_serial, daemon=True,
                                            name=f"wasmbox-vm-serial-{self.process.pid}")
            self._reader.start()
        except OSError as exc:
            self.close()
            raise HostFailure(f"cannot start QEMU: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def monitor_path(self) -> Path:
        """The QMP socket (only a template or a restore has one)."""
        return self.dir / "qmp.sock"

    def wait_booted(self, timeout: float) -> bool:
        """True once the guest printed READY (a template is snapshotted then); a boot the
        host is too busy to run is given time as in `wait_ready`."""
        return self._wait(self._booted, timeout, starved_grace=True)

    def arm(self) -> None:
        """Send the guest its entropy and the time; it says ARMED once they are credited.

        Raises `HostFailure` when QEMU never connected the task channel.
        """
        line = arming_line()
        with self._arm_lock:
            self._listener.settimeout(5.0)
            try:
                if self._conn is None:
                    self._conn, _ = self._listener.accept()
                self._conn.sendall(line)
            except OSError as exc:
                raise HostFailure(f"cannot arm the guest: {exc}") from exc

    def wait_ready(self, timeout: float, *, starved_grace: bool = False) -> bool:
        """True once the guest can take a task (READY, or ARMED for an armed guest); False on
        timeout or early death.

        With `starved_grace`, time QEMU spent runnable but waiting for a CPU (a host too busy
        to run it) does not count: a slow boot is not a hung one. The wait still ends at
        `_STARVED_WAIT` times `timeout`.
        """
        return self._wait(self._ready, timeout, starved_grace=starved_grace)

    def _wait(self, event: threading.Event, timeout: float, *, starved_grace: bool) -> bool:
        start = time.monotonic()
        queued_start = self.queued_seconds() if starved_grace else None
        end = start + timeout
        while not event.wait(min(0.05, max(0.0, end - time.monotonic()))):
            if self._exited.is_set():
                return event.is_set()
            now = time.monotonic()
            if now < end:
                continue
            queued = self.queued_seconds() if queued_start is not None else None
            if (queued is None or queued_start is None
                    or now - start - (queued - queued_start) >= timeout
                    or now - start >= _STARVED_WAIT * timeout):
                return event.is_set()
            end = now + min(0.5, timeout)  # starved, not hung: look again shortly
        return True

    def send(self, payload: bytes, nonce: str, timeout: float) -> None:
        """Hand a task bundle to a waiting guest over the virtio-serial socket."""
        self._nonce = nonce
        with self._arm_lock:
            self._listener.settimeout(max(timeout, 0.01))
            try:
                if self._conn is None:
                    self._conn, _ = self._listener.accept()
                self._conn.settimeout(max(timeout, 0.01))
                self._conn.sendall(payload)
            except OSError as exc:
                raise HostFailure(f"cannot hand the task to the guest: {exc}") from exc

    def expect(self, nonce: str) -> None:
        """Set the nonce of the task that was built into the initramfs (cold boot)."""
        self._nonce = nonce

    def wait_exit(self, timeout: float) -> ExitLine | None:
        """The guest's exit line, or None if it did not come within `timeout` (or QEMU died
        without it).

        QEMU ends milliseconds after the guest powers off, and its last console lines, the
        exit line among them, may still be in the pipe when it has: a busy host runs the
        serial reader late. Once QEMU has ended, the console is read to its end (within
        `_DRAIN_WAIT`) before the line counts as missing.
        """
        if not self._exited.wait(max(timeout, 0.0)) and self.process.poll() is not None:
            self._exited.wait(_DRAIN_WAIT)
        return self._exit

    @property
    def alive(self) -> bool:
        """True while QEMU runs."""
        return self.process.poll() is None and not self._exited.is_set()

    def serial_tail(self, size: int = 2000) -> str:
        """The last `size` bytes of the serial log (16 KiB at most), for error messages only."""
        return bytes(self._serial[-size:]).decode(errors="replace")

    def exit_status(self, timeout: float = 1.0) -> str:
        """How QEMU ended (its exit code or the signal that killed it), waiting up to
        `timeout` for it to end once its console closed; for error messages only."""
        try:
            code = self.process.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return "QEMU still runs"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"QEMU was killed by {name}"
        return f"QEMU exited with status {code}"

    def qemu_errors(self) -> str:
        """What QEMU printed on stderr."""
        try:
            return (self.dir / "qemu.stderr").read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def rss_bytes(self) -> int | None:
        """Resident memory of the QEMU process."""
        return procstat.rss_bytes(self.process.pid)

    def cpu_seconds(self) -> float | None:
        """CPU time QEMU has used (all its threads)."""
        return procstat.cpu_seconds(self.process.pid)

    def queued_seconds(self) -> float | None:
        """The longest time one QEMU thread was runnable but waiting for a CPU."""
        return procstat.queued_seconds(self.process.pid)

    def _read_serial(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        try:
            for raw in stream:
                self._on_serial_line(raw)
        except (ValueError, OSError):
            pass  # close() shut the pipe under us: the machine is going away
        finally:
            self._exited.set()

    def _on_serial_line(self, raw: bytes) -> None:
        self._serial += raw
        del self._serial[:-_SERIAL_KEEP]
        line = raw.decode(errors="replace").strip()
        # A kernel message may share the line: look for the frame, not the line start.
        if line.endswith(READY) and not self._booted.is_set():
            self._booted.set()
            if self._arm_on_ready:
                try:
                    self.arm()
                except HostFailure:
                    with contextlib.suppress(ProcessLookupError):  # never armed: unusable
                        os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self._set_ready()
        elif line.endswith(ARMED) and not self._ready.is_set():
            self._set_ready()
        elif EXIT + " " in line and self._nonce is not None:
            parsed = parse_exit(line[line.index(EXIT + " "):], self._nonce)
            if parsed is not None and self._exit is None:
                self._exit = parsed
                self._exited.set()

    def _set_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.ready_cpu_s = self.cpu_seconds()
        self._ready.set()

    def stop(self) -> None:
        """Kill QEMU now; the files stay until `close()`."""
        process = getattr(self, "process", None)
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if process.stdout is not None:
                process.stdout.close()

    def _release(self) -> None:
        self.stop()
        for sock in (self._conn, getattr(self, "_listener", None)):
            if sock is not None:
                sock.close()
        stderr = getattr(self, "_stderr", None)
        if stderr is not None:
            stderr.close()
        if self.dir.exists():
            remove_tree(self.dir)


KVM_PROBE_FILE = "kvm-probe.json"  # the probe's answer, in the assets directory


def probe_kvm(assets: Assets, work: Path, cache_file: Path, timeout: float = 8.0) -> bool:
    """Whether KVM really runs our guest here: /dev/kvm alone proves nothing. Cached on disk."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = _probe_key(assets)
    cached = _cached_probe(cache_file, key)
    if cached is not None:
        return cached
    shape = Shape(MIN_GUEST_MIB, 1, 1 << 20, python=False, sizes="wbx=65536,8,65536,65536,0")
    machine = Machine(work / "kvm-probe", assets, shape, kvm=True)
    try:
        works = machine.wait_ready(timeout)
    finally:
        machine.close()
    with contextlib.suppress(OSError):
        cache_file.write_text(json.dumps({"key": key, "kvm": works}))
    return works


def accelerator_note(assets: Assets, cache_file: Path) -> str:
    """Which accelerator guests get here, as far as known without booting one: ``kvm``,
    ``tcg`` (and why), or that the first VM task will probe it."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg (no usable /dev/kvm)"
    cached = _cached_probe(cache_file, _probe_key(assets))
    if cached is None:
        return "not probed yet (the first VM task boots a KVM probe guest)"
    return "kvm" if cached else "tcg (/dev/kvm is present but the KVM probe guest did not boot)"


def _probe_key(assets: Assets) -> str:
    """What the KVM probe's answer depends on: QEMU, the host kernel, the guest kernel."""
    return f"{_qemu_version()}|{os.uname().release}|{assets.kernel_version}"


def _cached_probe(cache_file: Path, key: str) -> bool | None:
    """The probe's answer recorded for `key`, or None (no record, another key, unreadable)."""
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and cached.get("key") == key:
            return bool(cached["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    return None


def _qemu_version() -> str:
    """QEMU's version line, asked once a process (the probe and availability both need it);
    "unknown" when it cannot be asked, then asked again next time."""
    global _qemu_version_line
    if _qemu_version_line is None:
        try:
            _qemu_version_line = subprocess.run(
                [QEMU, "--version"], capture_output=True, text=True, timeout=10,
            ).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError):
            return "unknown"
    return _qemu_version_line


_qemu_version_line: str | None = None
