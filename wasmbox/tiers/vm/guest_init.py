"""Internal: the guest's generated ``/init`` (`INIT_SCRIPT`), `PRESTART`, and the words they share.

`guest` describes what the guest does with them; `images` writes them into the initramfs.
"""

from __future__ import annotations

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

# `getline`: the next non-empty line from fd 3 (the task port) in $line. Busybox's `read` at
# EOF returns non-zero yet keeps what it read of a partial line, so the pieces are joined
# until a newline ends the line (IFS= keeps the blanks where a line was split).
GETLINE = r"""getline() {
  line=""
  while :; do
    part=""
    if IFS= read -r part <&3; then
      line="$line$part"
      [ -n "$line" ] && return 0
    else
      line="$line$part"
      sleep 0.05
    fi
  done
}
"""


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
@GETLINE@if [ ! -f /job/job.sh ]; then
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
  getline
  set -- $line
  # Assets built without a C compiler lack the helper; the host never snapshots those.
  if [ -x /bin/wbx-seed ]; then
    /bin/wbx-seed "$1" "$2" || { echo WASMBOX-NOSEED > /dev/ttyS0; poweroff -f; }
  else
    date -s "@$2" > /dev/null 2>&1
  fi
  set --
  line=""
  echo WASMBOX-ARMED > /dev/ttyS0
  # The helper, just run (and so translated under TCG), unpacks the task's bundle too.
  if [ -x /bin/wbx-seed ]; then
    /bin/wbx-seed -u / <&3 || { echo WASMBOX-BADBUNDLE > /dev/ttyS0; poweroff -f; }
  else
    getline
    head -c "$line" <&3 | tar -x -f - -C /
  fi
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
""".replace("@SHARE_OPTIONS@", SHARE_OPTIONS).replace("@GETLINE@", GETLINE)


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
