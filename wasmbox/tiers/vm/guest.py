"""What runs inside the VM: the generated ``/init`` and the per-task job it sources.

The base initramfs holds `INIT_SCRIPT` (and `PRESTART`). Before it prints the ready marker
the guest does everything task-independent: modules, cgroup, tmpfs mounts sized by the ``wbx=``
kernel argument and, for Python shapes, a pre-started interpreter waiting on a fifo. A task
then arrives as a *bundle* (``job/job.sh``, the ``task/`` directory, ``job/py/`` for Python),
either appended to the initramfs as a cpio (cold boot) or sent as a length-prefixed tar over
the virtio-serial port (a pre-booted or restored guest). A guest waiting on the port first
reads one line from the host, fresh entropy and the time: `SEED_HELPER` credits the entropy
(``RNDADDENTROPY``, then ``RNDRESEEDCRNG``) and the guest prints ``WASMBOX-ARMED``. Snapshot
templates are saved before that line, so every restored guest reseeds before any task. The
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

READY = "WASMBOX-READY"
ARMED = "WASMBOX-ARMED"  # printed once the host's entropy is credited; a task may follow
EXIT = "WASMBOX-EXIT"
TASK_UID = 1000
PYTHON_MOUNTPOINTS = ("/task", "/dev", "/proc", "/tmp", "/wasmbox", "/bin", "/opt")
TASK_ROOT = "/r"  # a command's root: the host's userland (9p, read-only), /task, /tmp, /dev, /proc
PACKAGES_DIR = "/opt/wasmbox/packages"  # policy.python.packages[n] is PACKAGES_DIR/n, read-only
GUEST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"  # as in a container
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,cache=loose,msize=262144"
STREAM_SLACK = 8192
OUTPUT_SLACK = 64 * 1024  # lets a flood overshoot the cap, so the host sees and rejects it

INIT_SCRIPT = r"""#!/bin/sh
# Everything before the ready marker is task-independent: a pooled guest does it while it
# waits, so the per-task path below forks as little as possible (each exec costs under TCG).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo -1000 > /proc/self/oom_score_adj
for m in /lib/wasmbox/*.ko; do insmod "$m"; done
echo 1 > /proc/sys/kernel/printk
read -r cmdline < /proc/cmdline
for w in $cmdline; do case $w in wbx=*) sizes=${w#wbx=};; esac; done
IFS=,
set -- $sizes
unset IFS
OUT_BYTES=$1 OUT_INODES=$2 STREAM_BYTES=$3 TMP_BYTES=$4 PY=$5 PKGS=$6
disk() {
  for d in /sys/block/vd*; do
    read -r serial < "$d/serial"
    [ "$serial" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  return 1
}
CG=/sys/fs/cgroup
SPAWN="start-stop-daemon -S -q -c 1000:1000 -u 1000"
mount -t cgroup2 cgroup2 $CG
echo "+memory +pids +cpu" > $CG/cgroup.subtree_control
mkdir $CG/task /ship/output /ship/streams /task/output
mkfifo -m 0600 /run/tick
mount -t tmpfs -o "size=$OUT_BYTES,nr_inodes=$OUT_INODES,mode=0755,uid=1000,gid=1000" \
  out /ship/output
mount -t tmpfs -o "size=$STREAM_BYTES,mode=0755" streams /ship/streams
mount --bind /ship/output /task/output
mount -t tmpfs -o "size=$TMP_BYTES,mode=1777" tmp /tmp
# A command's root (see TASK_ROOT); wbx-run mounts the host's userland there per task: a
# mounted 9p share blocks QEMU's migration, so a snapshot template must not have it mounted.
mount --rbind /task /r/task
mount --bind /tmp /r/tmp
mount --bind /dev /r/dev
mount -t proc proc /r/proc
if [ "$PY" = 1 ]; then
  for m in /lib/wasmbox/py/*.ko; do insmod "$m"; done
  mount -t ext4 -o ro,noload "$(disk wbxpy)" /py
  mount --rbind /task /py/task
  mount --bind /dev /py/dev
  mount -t proc proc /py/proc
  mount -t tmpfs -o "size=$TMP_BYTES,mode=1777" tmp /py/tmp
  mount --bind /job/py /py/wasmbox
  # Python shapes are never snapshotted, so their package shares are mounted ahead.
  mount -t tmpfs -o size=64k,mode=0755 opt /py/opt
  i=0
  while [ "$i" -lt "${PKGS:-0}" ]; do
    mkdir -p /py/opt/wasmbox/packages/$i
    mount -t 9p -o "ro,nosuid,nodev,@SHARE_OPTIONS@" "wbx-pkg$i" /py/opt/wasmbox/packages/$i
    i=$((i + 1))
  done
  # Pre-start the interpreter (seconds under TCG) as the task's uid, in the task's cgroup;
  # it waits on a fifo for its task and tells us, through another, once it is initialised.
  mkfifo -m 0644 /job/py/go
  mkfifo -m 0602 /job/py/ready
  ( echo 0 > $CG/task/cgroup.procs; echo 1000 > /proc/self/oom_score_adj; ulimit -c 0
    exec env -i PATH=/usr/bin:/bin HOME=/tmp chroot /py /bin/busybox sh -c \
      "cd /task && exec /bin/busybox $SPAWN -x /usr/bin/python3 -- -I -S /wasmbox/prestart.py"
  ) > /ship/streams/stdout 2> /ship/streams/stderr < /dev/null &
  pypid=$!
  read -r _ < /job/py/ready
fi
OUT_DISK=$(disk wbxout)
if [ ! -f /job/job.sh ]; then
  port=""
  # Up to ~10 s: on a loaded host under TCG the virtio-serial port can take seconds to appear.
  i=0
  while [ -z "$port" ] && [ "$i" -lt 200 ]; do
    for p in /dev/vport*p1; do [ -c "$p" ] && port=$p; done
    [ -n "$port" ] || sleep 0.05
    i=$((i + 1))
  done
  [ -n "$port" ] || poweroff -f
  echo WASMBOX-READY > /dev/ttyS0
  exec 3<"$port"
  # A template is snapshotted here, so every guest restored from it shares its RNG state:
  # the host's first line is fresh entropy, credited and reseeded before any task exists.
  # Without it no task runs (fail closed).
  seed=""
  while [ -z "$seed" ]; do read -r seed <&3 || sleep 0.05; done
  set -- $seed
  # Assets built without a C compiler lack the helper; the host never snapshots those.
  if [ -x /bin/wbx-seed ]; then
    /bin/wbx-seed "$1" "$2" || { echo WASMBOX-NOSEED > /dev/ttyS0; poweroff -f; }
  else
    date -s "@$2" > /dev/null 2>&1
  fi
  set --
  seed=""
  echo WASMBOX-ARMED > /dev/ttyS0
  size=""
  while [ -z "$size" ]; do read -r size <&3 || sleep 0.05; done
  head -c "$size" <&3 | tar -x -f - -C /
  exec 3<&-
else
  echo WASMBOX-READY > /dev/ttyS0
fi
. /job/job.sh
echo "$MEM" > $CG/task/memory.max
echo 0 > $CG/task/memory.swap.max
echo "$PIDS" > $CG/task/pids.max
[ -n "$CPU_MAX" ] && echo "$CPU_MAX" > $CG/task/cpu.max
# The watchdog sleeps with the shell's own `read -t` on a fifo nobody writes: no exec.
( read -t "$TIMEOUT" _ <> /run/tick; : > /run/timedout; echo 1 > $CG/task/cgroup.kill ) &
watchdog=$!
if [ -n "$pypid" ]; then
  ( : > /job/py/go ) &
  wait $pypid
  code=$?
else
  ( echo 0 > $CG/task/cgroup.procs; echo 1000 > /proc/self/oom_score_adj; cd /task; ulimit -c 0
    task ) > /ship/streams/stdout 2> /ship/streams/stderr < /dev/null
  code=$?
fi
kill $watchdog 2>/dev/null
echo 1 > $CG/task/cgroup.kill
flags=""
[ -e /run/timedout ] && flags=" timeout"
while read -r k v; do
  [ "$k" = oom_kill ] && [ "$v" -gt 0 ] && flags="$flags oom"
done < $CG/task/memory.events
read -r peak < $CG/task/memory.peak
while read -r k v; do [ "$k" = usage_usec ] && cpu=$v; done < $CG/task/cpu.stat
# Nothing to ship (no output entry, empty streams): no tar, one exec fewer; the host then
# collects nothing. Else no sync: the last close of a block device writes it back.
empty=1
for f in /ship/output/* /ship/output/.[!.]* /ship/output/..?*; do
  [ -e "$f" ] || [ -L "$f" ] && empty=0
done
[ -s /ship/streams/stdout ] || [ -s /ship/streams/stderr ] && empty=0
if [ "$empty" = 1 ]; then
  flags="$flags empty"
else
  tar -c -f "$OUT_DISK" -C /ship output streams 2>/dev/null || flags="$flags ship"
fi
echo "WASMBOX-EXIT $NONCE $code peak=${peak:-0} cpu_us=${cpu:-0}$flags" > /dev/ttyS0
# The line may still sit in the UART's buffer, and a forced poweroff does not wait for it:
# stty sets the (unchanged) mode with TCSETSW, which returns once the output has drained.
stty -F /dev/ttyS0 -echo 2>/dev/null
poweroff -f
""".replace("@SHARE_OPTIONS@", SHARE_OPTIONS)


SEED_HELPER = r"""
/* wbx-seed HEX [TIME]: credit 64 bytes of host entropy to the guest RNG and force a reseed,
   so a guest restored from a snapshot stops sharing its random stream with its siblings;
   then set the clock to TIME (seconds since the epoch; one exec fewer than `date -s`). */
#include <errno.h>
#include <stdlib.h>
#include <sys/time.h>
#include <fcntl.h>
#include <linux/random.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int main(int argc, char **argv) {
    struct { int entropy_count; int buf_size; unsigned char buf[64]; } info;
    if (argc < 2 || argc > 3 || strlen(argv[1]) != 2 * sizeof info.buf) return 2;
    for (size_t i = 0; i < sizeof info.buf; i++) {
        int hi = nibble(argv[1][2 * i]), lo = nibble(argv[1][2 * i + 1]);
        if (hi < 0 || lo < 0) return 2;
        info.buf[i] = (unsigned char)(hi << 4 | lo);
    }
    memset(argv[1], 0, strlen(argv[1]));
    info.entropy_count = 8 * (int)sizeof info.buf;
    info.buf_size = (int)sizeof info.buf;
    int fd = open("/dev/urandom", O_WRONLY);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &info) < 0) return 1;
    memset(&info, 0, sizeof info);
    /* ENODATA: the RNG was not ready yet, and the credit above just seeded it. */
    if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA) return 1;
    if (argc == 3) {
        struct timeval now = { .tv_sec = (time_t)strtoll(argv[2], NULL, 10), .tv_usec = 0 };
        if (now.tv_sec > 0) settimeofday(&now, NULL);
    }
    return 0;
}
"""


RUN_HELPER = r"""
/* wbx-run ROOT UID GID SHARES NAME=VALUE... -- PROG ARGS: mount the task's read-only 9p
   shares (SHARES: TAG=PATH,... with PATH inside ROOT, or -), chroot to ROOT, cd /task, and
   exec PROG as UID:GID with no supplementary groups, no new privileges and only the given
   environment. One exec where env + start-stop-daemon + sh took three (and a /proc scan):
   under TCG every exec of a new guest costs translation time. The shares are mounted here,
   per task, because a mounted share blocks QEMU's migration (the snapshot templates). */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

static int mount_shares(const char *root, char *spec) {
    if (strcmp(spec, "-") == 0) return 0;
    for (char *item = strtok(spec, ","); item != NULL; item = strtok(NULL, ",")) {
        char *path_in_root = strchr(item, '='), path[4096];
        if (path_in_root == NULL || path_in_root[1] != '/' || strstr(path_in_root, "..")) return -1;
        *path_in_root++ = '\0';
        size_t base = strlen(root);
        if (snprintf(path, sizeof path, "%s%s", root, path_in_root) >= (int)sizeof path) return -1;
        for (char *p = path + base + 1; *p; p++) {
            if (*p != '/') continue;
            *p = '\0';
            if (mkdir(path, 0755) != 0 && errno != EEXIST) return -1;
            *p = '/';
        }
        if (mkdir(path, 0755) != 0 && errno != EEXIST) return -1;
        if (mount(item, path, "9p", MS_RDONLY | MS_NOSUID | MS_NODEV,
                  "@SHARE_OPTIONS@") != 0) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) return 125;
    uid_t uid = (uid_t)strtoul(argv[2], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[3], NULL, 10);
    if (uid == 0 || gid == 0) return 125;
    if (mount_shares(argv[1], argv[4]) != 0) {
        perror("wbx-run: mount");
        return 125;
    }
    if (chroot(argv[1]) != 0 || chdir("/task") != 0) {
        perror("wbx-run: chroot");
        return 125;
    }
    if (clearenv() != 0) return 125;
    int i = 5;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++)
        if (putenv(argv[i]) != 0) return 125;
    if (i + 1 >= argc) return 125;
    if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid)
        || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
        perror("wbx-run");
        return 125;
    }
    if (getuid() != uid || geteuid() != uid || getegid() != gid) return 125;
    execvp(argv[i + 1], argv + i + 1);
    int err = errno;
    fprintf(stderr, "sh: %s: %s\n", argv[i + 1], err == ENOENT ? "not found" : strerror(err));
    return err == ENOENT ? 127 : 126;
}
""".replace("@SHARE_OPTIONS@", SHARE_OPTIONS)


PRESTART = """\
# Runs inside the guest as the task's uid, before the task exists (see INIT_SCRIPT).
import ast, json, os, runpy, sys, traceback, types  # noqa: F401 (what runner.py imports)
open("/wasmbox/ready", "w").close()
with open("/wasmbox/go", "rb") as go:
    go.read()
with open("/wasmbox/go.json", encoding="utf-8") as f:
    job = json.load(f)
os.environ.clear()
os.environ.update(job["env"])
sys.path[:0] = job.get("path", [])
sys.argv = ["/wasmbox/runner.py", "/wasmbox/task.py", job["entry"]]
runpy.run_path("/wasmbox/runner.py", run_name="__main__")
"""


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
