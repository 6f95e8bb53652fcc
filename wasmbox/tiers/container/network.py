"""Internal: one container task's own network namespace, pasta, and an egress filter.

Only tasks whose plan has network access get one; every other container keeps the runtime's
fresh, empty network namespace (only ``lo``).

- The namespace is made by a short-lived thread of ours (``unshare(CLONE_NEWNET)``), held by
  an fd; the runtime joins it through ``/proc/<our pid>/fd/<fd>``. pasta needs a path it can
  open, so the namespace is bound to ``/run/netns/wbx-<pid>-<hex>`` only until pasta is
  ready, then unbound (pasta runs with ``--no-netns-quit``).
- pasta (Debian package ``passt``) gives the namespace a tap interface copying the host's
  address and routes, and turns the task's connections into the host's own sockets. It maps
  nothing inbound (``-t none -u none``), never maps the gateway to the host
  (``--no-map-gw``), and forwards a host loopback port only when an allowed endpoint names
  it: ``127.0.0.1:PORT`` is then reached at the same address inside (``-T``/``-U PORT``).
  pasta starts as root (it must join a root-owned namespace) and then confines itself (own
  user and mount namespaces, seccomp), as it does for rootless containers.
- nftables rules inside the namespace (``table inet wasmbox``) accept exactly the allowed
  endpoints/ports (and DNS to the one resolver) and reject everything else at once: a TCP
  reset, an ICMP admin-prohibited for the rest; nothing leaves to hang.
- ``net_rx_bytes``/``net_tx_bytes`` are the namespace's interface counters (the tap, plus
  ``lo``, which carries the traffic to forwarded loopback ports).

What the network is (pasta's command line, the filter) is worked out in `_netrules`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from wasmbox.errors import HostFailure, TierUnavailable
from wasmbox.policy import NetworkPlan
from wasmbox.tiers.container import reaper
from wasmbox.tiers.container._netrules import loopback_of, resolve_names
from wasmbox.tiers.container._netrules import nft_rules as nft_rules
from wasmbox.tiers.container._netrules import pasta_argv as pasta_argv
from wasmbox.tiers.container._netrules import unsupported as unsupported

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "wbx-"
PASTA_MARK = f"{NETNS_DIR}/{NETNS_PREFIX}"  # in every pasta command line of ours
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MNT_DETACH = 2
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_READY_TIMEOUT = 10.0
_NFT_TIMEOUT = 10.0
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def missing_tools() -> str | None:
    """Why networked containers cannot run here (pasta or nft missing), or None."""
    for tool, package in (("pasta", "passt"), ("nft", "nftables")):
        if not any(os.access(f"{d}/{tool}", os.X_OK) for d in _ENV["PATH"].split(":")):
            return f"networked containers need {tool} (Debian package {package!r})"
    return None


class TaskNetwork:
    """The namespace, filter and pasta of one task; `close()` releases all on every path."""

    def __init__(self, plan: NetworkPlan, log_path: str) -> None:
        self.plan = plan
        self.name = f"{NETNS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self.bind_path = f"{NETNS_DIR}/{self.name}"
        self._fd: int | None = None
        self._pasta: subprocess.Popen[bytes] | None = None
        self._bound = False
        try:
            self._open(log_path)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        """The namespace as a path the runtime (running as root) can open."""
        assert self._fd is not None
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    def resolv_conf(self) -> str | None:
        """The task's /etc/resolv.conf: the one resolver, or None without DNS."""
        if self.plan.resolver is None:
            return None
        ip, _ = self.plan.resolver
        inside = loopback_of(ip) if ipaddress.ip_address(ip).is_loopback else ip
        return f"nameserver {inside}\noptions attempts:1 timeout:2\n"

    def _open(self, log_path: str) -> None:
        rules = nft_rules(self.plan, resolve_names(self.plan.endpoints))
        os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
        with open(self.bind_path, "x"):
            pass
        self._bound = True
        self._fd = _in_new_netns(lambda: _setup_inside(self.bind_path, rules))
        pid_file = log_path + ".pid"
        argv = pasta_argv(self.plan, self.bind_path, pid_file)
        with open(log_path, "wb") as log:
            try:
                self._pasta = reaper.popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=log, env=_ENV)
            except OSError as exc:
                raise TierUnavailable("container", f"cannot start pasta: {exc}") from exc
        self._wait_ready(pid_file, log_path)
        self._unbind()

    def _wait_ready(self, pid_file: str, log_path: str) -> None:
        """pasta writes its pid file once the namespace's interface is configured."""
        assert self._pasta is not None
        give_up = time.monotonic() + _READY_TIMEOUT
        delay = 0.0005
        while time.monotonic() < give_up:
            if self._pasta.poll() is not None:
                raise HostFailure(f"pasta exited {self._pasta.returncode}: {_tail(log_path)}")
            with contextlib.suppress(OSError):
                if os.path.getsize(pid_file) > 0:
                    return
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        raise HostFailure(f"pasta was not ready in {_READY_TIMEOUT:g} s: {_tail(log_path)}")

    def counters(self) -> tuple[int, int]:
        """Bytes received and sent on the namespace's interfaces so far."""
        if self._fd is None:
            return 0, 0
        return _in_netns(self._fd, _read_counters)

    def _unbind(self) -> None:
        if self._bound:
            _libc.umount2(self.bind_path.encode(), _MNT_DETACH)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.bind_path)
            self._bound = False

    def close(self) -> None:
        """Stop pasta, drop the namespace; idempotent."""
        pasta, self._pasta = self._pasta, None
        if pasta is not None:
            try:
                # pasta keeps no state worth flushing: SIGKILL, and a blocking wait (the
                # timed wait of subprocess polls in sleeps of up to 50 ms).
                if pasta.poll() is None:
                    pasta.kill()
                pasta.wait()
            finally:
                reaper.release(pasta.pid)
        self._unbind()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def bound_namespaces() -> list[str]:
    """Namespace binds of ours under /run/netns (each lives only until pasta is ready)."""
    try:
        return [f"{NETNS_DIR}/{n}" for n in os.listdir(NETNS_DIR) if n.startswith(NETNS_PREFIX)]
    except FileNotFoundError:
        return []


def pasta_processes() -> list[tuple[int, str]]:
    """pasta processes started for a task namespace of any wasmbox process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read(8192).split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"pasta" and any(
                a.startswith(PASTA_MARK.encode()) for a in argv):
            found.append((int(entry), b" ".join(argv).decode(errors="replace").strip()))
    return found


def sweep(dead: Callable[[str], bool]) -> None:
    """Remove the binds and stop the pasta processes of wasmbox processes that died."""
    for path in bound_namespaces():
        if dead(os.path.basename(path)):
            _libc.umount2(path.encode(), _MNT_DETACH)
            with contextlib.suppress(OSError):
                os.unlink(path)
    for pid, cmd in pasta_processes():
        names = [os.path.basename(a) for a in cmd.split() if a.startswith(PASTA_MARK)]
        if names and all(dead(n) for n in names):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # re-parented to us (the subreaper): reap it


def _setup_inside(bind_path: str, rules: str) -> int:
    """In the new namespace: bind it for pasta, bring lo up, load the filter; its fd."""
    if _libc.mount(b"/proc/thread-self/ns/net", bind_path.encode(), None, _MS_BIND, None):
        _raise_errno("bind the network namespace")
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _lo_up()
        proc = subprocess.run(["nft", "-f", "-"], input=rules.encode(), capture_output=True,
                              env=_ENV, timeout=_NFT_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise HostFailure(f"nft refused the egress filter: "
                              f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _read_counters() -> tuple[int, int]:
    rx = tx = 0
    with open("/proc/thread-self/net/dev", encoding="ascii", errors="replace") as f:
        for line in f.read(1 << 16).splitlines()[2:]:
            _, _, data = line.partition(":")
            fields = data.split()
            if len(fields) >= 9:
                rx, tx = rx + int(fields[0]), tx + int(fields[8])
    return rx, tx


def _in_new_netns(body: Callable[[], T]) -> T:
    """Run `body` in a thread that has just entered a new network namespace."""
    def enter() -> None:
        if _libc.unshare(_CLONE_NEWNET) != 0:
            _raise_errno("unshare(CLONE_NEWNET)")
    return _in_thread(enter, body)


def _in_netns(fd: int, body: Callable[[], T]) -> T:
    """Run `body` in a thread that has joined the namespace of `fd`."""
    def enter() -> None:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            _raise_errno("setns")
    return _in_thread(enter, body)


def _in_thread(enter: Callable[[], None], body: Callable[[], T]) -> T:
    # Namespaces are per thread: this thread leaves the process's namespace and ends, so
    # no other thread ever runs in the task's namespace.
    box: dict[str, T] = {}
    fail: list[BaseException] = []

    def main() -> None:
        try:
            enter()
            box["value"] = body()
        except BaseException as exc:  # handed to the caller
            fail.append(exc)

    thread = threading.Thread(target=main, name="wasmbox-netns", daemon=True)
    thread.start()
    thread.join()
    if fail:
        raise fail[0]
    return box["value"]


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno() or errno.EIO
    raise HostFailure(f"{what} failed: {os.strerror(err)}")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 2000))
            return f.read().decode(errors="replace").strip() or "(no message)"
    except OSError:
        return "(no log)"
