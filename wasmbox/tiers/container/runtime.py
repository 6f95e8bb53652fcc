"""The OCI runtime driver: runs crun/runc/runsc commands, in a private mount namespace if needed.

crun 1.8 refuses a hybrid cgroup layout (v1 controllers plus a v2 tree at
``/sys/fs/cgroup/unified``). The runtime therefore runs inside a mount namespace of our own
where that v2 tree is unmounted; we keep the namespace alive by holding an fd to it, and enter
it with ``nsenter`` for each command. We read cgroup files through an fd of that namespace's
``/sys/fs/cgroup`` too, so the tier sees exactly the hierarchy the runtime uses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from wasmbox.errors import HostFailure, TierUnavailable
from wasmbox.lifecycle import Closeable, shielded
from wasmbox.tiers.container import reaper
from wasmbox.tiers.container.cgroups import CGROUP_ROOT, CgroupLayout, mounts_hiding_v1

STATE_ROOT = "/run/wasmbox"
_COMMAND_TIMEOUT = 30.0
# crun loads this BPF instead of compiling the config's seccomp section (crun(1)).
SECCOMP_BPF_ANNOTATION = "run.oci.seccomp_bpf_data"
_MAX_BPF_BYTES = 8 * 4096  # BPF_MAXINSNS instructions of 8 bytes


@dataclass(frozen=True)
class RuntimeChoice:
    """Which OCI runtime to use, or why none can be used."""

    name: str
    binary: str | None
    reason: str
    details: dict[str, str] = field(default_factory=dict)


def choose_runtime(requested: str | None) -> RuntimeChoice:
    """crun, else runc; ``gvisor`` asks for runsc. Never raises."""
    if requested in ("gvisor", "runsc"):
        binary = shutil.which("runsc")
        if binary is None:
            return RuntimeChoice("runsc", None, "gVisor's runsc is not installed "
                                 "(Debian package 'runsc': apt-get install runsc)")
        return RuntimeChoice("runsc", binary, "gVisor runsc (--platform=ptrace --network=none)")
    if requested not in (None, "crun", "runc"):
        return RuntimeChoice(str(requested), None, f"unknown container runtime {requested!r} "
                             "(use crun, runc or gvisor)")
    order = ("crun", "runc") if requested in (None, "crun") else ("runc",)
    for name in order:
        binary = shutil.which(name)
        if binary is not None:
            why = (f"{name} requested" if requested == name else "crun found" if name == "crun"
                   else "crun is not installed; runc is the fallback")
            return RuntimeChoice(name, binary, why)
    return RuntimeChoice("crun", None, "neither crun nor runc is installed "
                         "(Debian packages 'crun' or 'runc')")


class Runtime(Closeable):
    """One OCI runtime binary with its state root and, on hybrid hosts, a private mount ns."""

    def __init__(self, choice: RuntimeChoice) -> None:
        if choice.binary is None:
            raise TierUnavailable("container", choice.reason)
        self.name = choice.name
        self.binary = choice.binary
        self.state_root = f"{STATE_ROOT}/{self.name}"
        self._ns_fd: int | None = None
        self._cgroup_fd: int | None = None
        os.makedirs(self.state_root, mode=0o700, exist_ok=True)
        self._prefix: list[str] = []
        hide = mounts_hiding_v1()
        if hide:
            self._ns_fd, self._cgroup_fd = _private_mount_namespace(hide)
            self._prefix = ["nsenter", f"--mount=/proc/self/fd/{self._ns_fd}", "--"]
            self.cgroups = CgroupLayout.detect(f"/proc/self/fd/{self._cgroup_fd}")
        else:
            self.cgroups = CgroupLayout.detect()
        self._global = [self.binary, f"--root={self.state_root}"]
        if self.name == "crun":
            self._global.append("--cgroup-manager=cgroupfs")
        if self.name == "runsc":
            self._global += ["--platform=ptrace", "--network=none", "--oci-seccomp"]
        self._seccomp_bpf: dict[str, str] = {}  # profile digest -> base64 BPF crun compiled

    def reuse_seccomp(self, config: dict[str, Any]) -> str | None:
        """Give `config` the filter crun compiled for the same profile before, if any.

        Compiling the allowlist for three ABIs costs crun ~13 ms of CPU per container;
        crun writes the result into the container's state dir, and takes it back through
        an annotation. Returns the profile's digest when crun compiles it this time (pass
        it to `keep_seccomp` once the container exists); None otherwise.
        """
        profile = config.get("linux", {}).get("seccomp")
        if self.name != "crun" or profile is None:
            return None
        digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()
        bpf = self._seccomp_bpf.get(digest)
        if bpf is None:
            return digest
        config.setdefault("annotations", {})[SECCOMP_BPF_ANNOTATION] = bpf
        return None

    def keep_seccomp(self, digest: str, container_id: str) -> None:
        """Keep the filter crun compiled for container `container_id` (see `reuse_seccomp`)."""
        try:
            with open(f"{self.state_root}/{container_id}/seccomp.bpf", "rb") as f:
                bpf = f.read(_MAX_BPF_BYTES + 1)
        except OSError:
            return  # nothing to reuse: the next container compiles again
        if bpf and len(bpf) % 8 == 0 and len(bpf) <= _MAX_BPF_BYTES:
            self._seccomp_bpf[digest] = base64.b64encode(bpf).decode("ascii")

    @property
    def private_namespace(self) -> bool:
        """True when the runtime runs in our private mount namespace."""
        return self._ns_fd is not None

    def argv(self, *args: str) -> list[str]:
        """The full command line of a runtime command."""
        return [*self._prefix, *self._global, *args]

    def spawn(self, args: list[str], *, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
        """Start a runtime command whose stdio goes to the given fds (files, never pipes)."""
        return reaper.popen(
            self.argv(*args), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            pass_fds=self._pass_fds(), env=_RUNTIME_ENV,
        )

    def call(self, *args: str, stdout: int | None = None, stderr: int | None = None,
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a runtime command to completion; raises `HostFailure` when it fails."""
        try:
            child = reaper.popen(
                self.argv(*args), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout is None else stdout,
                stderr=subprocess.PIPE if stderr is None else stderr,
                pass_fds=self._pass_fds(), env=_RUNTIME_ENV,
            )
        except OSError as exc:
            raise HostFailure(f"{self.name} {args[0]} could not run: {exc}") from exc
        try:
            out, err = child.communicate(timeout=_COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            child.kill()
            child.wait()
            raise HostFailure(f"{self.name} {args[0]} hung for {_COMMAND_TIMEOUT} s") from exc
        except BaseException:  # interrupted: let the command end (it may be making a
            with shielded():  # container) and reap it, or it stays a zombie of ours
                try:
                    child.communicate(timeout=_COMMAND_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            raise
        finally:
            reaper.release(child.pid)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
        if check and proc.returncode != 0:
            raise HostFailure(f"{self.name} {args[0]} failed: {_message(proc)}")
        return proc

    def delete(self, container_id: str) -> None:
        """Force-delete a container; its cgroups and state go with it."""
        proc = self.call("delete", "--force", container_id, check=False)
        if proc.returncode != 0 and os.path.exists(f"{self.state_root}/{container_id}"):
            raise HostFailure(f"{self.name} delete failed: {_message(proc)}")

    def mount_table(self) -> str:
        """The mountinfo the runtime sees (its private namespace's, when it has one)."""
        if self._ns_fd is None:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                return f.read()
        proc = subprocess.run(
            [*self._prefix, "cat", "/proc/self/mountinfo"], capture_output=True,
            pass_fds=self._pass_fds(), env=_RUNTIME_ENV, timeout=_COMMAND_TIMEOUT, check=False,
        )
        return proc.stdout.decode(errors="replace")

    def _pass_fds(self) -> tuple[int, ...]:
        return () if self._ns_fd is None else (self._ns_fd,)

    def _release(self) -> None:
        for fd in (self._ns_fd, self._cgroup_fd):
            if fd is not None:
                os.close(fd)
        self._ns_fd = self._cgroup_fd = None


_RUNTIME_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def _private_mount_namespace(hide: list[str]) -> tuple[int, int]:
    """A mount namespace without the mounts in `hide`: fds of it and of its cgroup root."""
    script = "".join(f"umount {path} && " for path in hide) + "echo ready && read _"
    try:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_RUNTIME_ENV,
        )
    except OSError as exc:
        raise TierUnavailable("container", f"cannot start unshare: {exc}") from exc
    try:
        return _hold_namespace(proc)
    except OSError as exc:
        raise TierUnavailable("container", f"cannot hold the mount namespace: {exc}") from exc


def _hold_namespace(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != b"ready":
            proc.wait(5)
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise TierUnavailable(
                "container", f"cannot make a mount namespace without the v2 cgroup tree: {err}"
            )
        ns_fd = os.open(f"/proc/{proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            root_fd = os.open(f"/proc/{proc.pid}/root{CGROUP_ROOT}",
                              os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(ns_fd)
            raise
        return ns_fd, root_fd
    finally:
        proc.stdin.close()
        proc.wait(5)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def _message(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = b"\n".join(x for x in (proc.stderr, proc.stdout) if isinstance(x, bytes))
    return text.decode(errors="replace").strip()[-2000:] or f"exit {proc.returncode}"
