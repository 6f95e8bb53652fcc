"""What runs inside the VM: the generated ``/init`` and the per-task job it sources.

The base initramfs holds `INIT_SCRIPT` (and `PRESTART`). Before it prints the ready marker
the guest does everything task-independent: modules, cgroup, tmpfs mounts sized by the ``wbx=``
kernel argument and, for Python shapes, a pre-started interpreter waiting on a fifo. A task
then arrives as a *bundle* (``job/job.sh``, the ``task/`` directory, ``job/py/`` for Python),
either appended to the initramfs as a cpio (cold boot) or sent as a length-prefixed tar over
the virtio-serial port (a pre-booted or restored guest). A guest waiting on the port first
reads one line from the host, fresh entropy and the time: `SEED_HELPER` credits the entropy
(``RNDADDENTROPY``, then ``RNDRESEEDCRNG``), prints ``WASMBOX-ARMED``, then reads the bundle
to its announced length and unpacks it itself (directories and regular files under ``job/``
and ``task/`` only, never through a link). Snapshot templates are saved before the entropy
line, so every restored guest reseeds before any task. The
task runs as uid 1000 in a cgroup (memory.max, pids.max, cpu.max; cgroup.kill when its time
is up); a command runs chrooted in `TASK_ROOT`, where `RUN_HELPER` has just mounted the host's
userland and the policy's packages (read-only 9p shares: mounted per task, because a mounted
share blocks QEMU's migration and templates are migrated), as in a container. Then the
guest writes ``output/`` and ``streams/`` as a tar to the raw output disk (unless both are
empty) and prints one framed line ``WASMBOX-EXIT <nonce> <code> peak=<bytes> cpu_us=<n>
[timeout] [oom] [ship] [empty]`` on the serial console. The nonce
sits in a root-only file and the console is root-only, so the task cannot forge that line.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shlex
import tarfile
from dataclasses import dataclass

from wasmbox.models import TaskKind
from wasmbox.policy import Plan
from wasmbox.runner import runner_source
from wasmbox.tiers.vm.cpio import CpioWriter
from wasmbox.tiers.vm.guest_helpers import RUN_HELPER, SEED_HELPER
from wasmbox.tiers.vm.guest_init import (
    ARMED,
    EXIT,
    GETLINE,
    GUEST_PATH,
    INIT_SCRIPT,
    OUTPUT_SLACK,
    PACKAGES_DIR,
    PRESTART,
    PYTHON_MOUNTPOINTS,
    READY,
    SHARE_OPTIONS,
    STREAM_SLACK,
    TASK_ROOT,
    TASK_UID,
)

# The init script, the helpers' sources and the words they share live in `guest_init` and
# `guest_helpers`; they stay importable from here.
__all__ = [
    "ARMED", "EXIT", "GETLINE", "GUEST_PATH", "INIT_SCRIPT", "OUTPUT_SLACK", "PACKAGES_DIR",
    "PRESTART", "PYTHON_MOUNTPOINTS", "READY", "RUN_HELPER", "SEED_HELPER", "SHARE_OPTIONS",
    "STREAM_SLACK",
    "TASK_ROOT", "TASK_UID", "Bundle", "guest_sizes", "job_script", "make_bundle",
    "output_disk_bytes", "package_env", "package_paths",
]


@dataclass(frozen=True)
class Bundle:
    """One task's files for the guest, and the nonce its exit line must carry."""

    files: dict[str, tuple[bytes, int]]  # guest path -> (data, mode)
    dirs: tuple[str, ...]
    nonce: str

    def as_tar(self) -> bytes:
        """The bundle as a tar, prefixed by its length, for the virtio-serial port."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for d in self.dirs:
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for name, (data, mode) in self.files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        return b"%d\n" % len(data) + data

    def as_cpio(self) -> bytes:
        """The bundle as a cpio to append to the base initramfs."""
        cpio = CpioWriter()
        for d in self.dirs:
            cpio.directory(d)
        for name, (data, mode) in self.files.items():
            cpio.file(name, data, mode)
        return cpio.finish()


def output_disk_bytes(plan: Plan) -> int:
    """Size of the raw output disk: everything the guest may ship, plus tar overhead.

    Sized from the policy's caps (not the task's), so one pooled shape serves every task of a
    policy; the task's own, lower caps are applied by the host when it collects.
    """
    caps, limits = plan.policy.output, plan.policy.limits
    raw = (caps.max_total_bytes + OUTPUT_SLACK + limits.stdout_bytes + limits.stderr_bytes
           + 2 * STREAM_SLACK + 1024 * (caps.max_files + 16) + (1 << 20))
    return -(-raw // (1 << 20)) * (1 << 20)


def make_bundle(plan: Plan, task_dir: str, timeout: float,
                userland: tuple[str, ...] = ()) -> Bundle:
    """The bundle for `plan`, with the staged files of `task_dir` (output/ excluded).

    `userland` names the host directories the guest shares (``usr``): a command runs in
    `TASK_ROOT` with them mounted, like a container's root.
    """
    nonce = secrets.token_hex(16)
    files: dict[str, tuple[bytes, int]] = {}
    dirs = ["job", "task"]
    for dirpath, dirnames, filenames in os.walk(task_dir):
        rel = os.path.relpath(dirpath, task_dir)
        prefix = "task/" if rel == "." else f"task/{rel}/"
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != "output"]
        dirs += [prefix + d for d in dirnames]
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                files[prefix + name] = (f.read(), 0o644)
    task = plan.task
    if task.kind is TaskKind.PYTHON:
        dirs.append("job/py")
        files["job/py/runner.py"] = (runner_source(), 0o644)
        files["job/py/task.py"] = ((task.source or "").encode(), 0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **package_env(plan), **plan.env}
        go = {"entry": task.entry, "env": env, "path": package_paths(plan)}
        files["job/py/go.json"] = (json.dumps(go).encode(), 0o644)
    files["job/job.sh"] = (job_script(plan, nonce, timeout, userland).encode(), 0o700)
    return Bundle(files, tuple(dirs), nonce)


def package_paths(plan: Plan) -> list[str]:
    """Where the guest mounts the policy's package directories, in policy order."""
    return [f"{PACKAGES_DIR}/{i}" for i in range(len(plan.policy.python.packages))]


def package_env(plan: Plan) -> dict[str, str]:
    """``PYTHONPATH`` naming the package mounts, when the policy lists packages."""
    paths = package_paths(plan)
    return {"PYTHONPATH": ":".join(paths)} if paths else {}


def job_script(plan: Plan, nonce: str, timeout: float, userland: tuple[str, ...] = ()) -> str:
    """The per-task variables and the ``task`` function that `INIT_SCRIPT` sources."""
    python = plan.task.kind is TaskKind.PYTHON
    extra = {"HOME": "/tmp", **package_env(plan), **plan.env}
    env = {"PATH": "/usr/bin:/bin" if python else "/bin", **extra}
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    spawn = f"start-stop-daemon -S -q -c {TASK_UID}:{TASK_UID} -u {TASK_UID}"
    timeout = max(timeout, 0.05)
    argv = " ".join(shlex.quote(a) for a in plan.args)
    body = f"{spawn} -x /bin/busybox -- sh -c 'exec \"$@\"' sh {argv}"
    shares = [f"wbx-{name}=/{name}" for name in userland]
    shares += [f"wbx-pkg{i}={path}" for i, path in enumerate(package_paths(plan))]
    root_env = " ".join(shlex.quote(f"{k}={v}") for k, v in {"PATH": GUEST_PATH, **extra}.items())
    fast = (f"/bin/wbx-run {TASK_ROOT} {TASK_UID} {TASK_UID} {','.join(shares) or '-'} "
            f"{root_env} -- {argv}")
    lines = {
        "NONCE": nonce,
        "TIMEOUT": f"{timeout:.2f}",
        "MEM": str(plan.memory),
        "PIDS": str(plan.pids),
        "CPU_MAX": "" if plan.cpus == int(plan.cpus)
        else f"{max(1000, int(plan.cpus * 100000))} 100000",
    }
    out = [f"{k}={shlex.quote(v)}" for k, v in lines.items()]
    if not python:  # a Python task runs in the interpreter the guest pre-started
        # With wbx-run (assets built with a C compiler) the task sees the host's userland,
        # as in a container; without it, the initramfs root and busybox's tools.
        out.append(f"task() {{ [ -x /bin/wbx-run ] && exec {fast}; "
                   f"exec env -i {env_words} {body}; }}")
    return "\n".join(out) + "\n"


def guest_sizes(plan: Plan, python: bool) -> str:
    """The ``wbx=`` kernel argument: tmpfs sizes the guest mounts before it is ready."""
    caps, limits = plan.policy.output, plan.policy.limits
    return "wbx=" + ",".join(str(v) for v in (
        caps.max_total_bytes + OUTPUT_SLACK,
        caps.max_files + 8,
        limits.stdout_bytes + limits.stderr_bytes + 2 * STREAM_SLACK,
        plan.tmpfs,
        1 if python else 0,
        len(plan.policy.python.packages),
    ))
