"""The VM tier: cold and pooled startup, memory and execution overhead, cleanup.

Run: ``python3 benchmarks/bench_vm.py [--runs N]`` (stdlib + wasmbox only; needs
qemu-system-x86; prepares the VM assets first if needed). Every number is the median of N runs
through ``Sandbox.run``:

cold      = a guest booted per task with the task appended to its initramfs;
pooled    = a guest booted ahead and waiting on its virtio-serial port (we wait until it is
            ready before each task, so this is the best case of a pool that keeps up);
startup   = from the tier's entry to the task handed over (pooled) / the guest ready (cold);
wall      = the whole ``Sandbox.run``;
residual  = wall - startup - run - workspace cleanup: unpacking, QEMU kill, dir removal;
memory    = QEMU's RSS against the guest RAM it was given (psutil, an idle pooled guest);
exec      = a shell loop's CPU time in the guest (cgroup cpu.stat) against the host.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from wasmbox import Policy, Result, Sandbox, Task  # noqa: E402
from wasmbox.models import TierName  # noqa: E402
from wasmbox.tiers.vm.assets import prepare_assets  # noqa: E402
from wasmbox.tiers.vm.tier import VmTier  # noqa: E402

LOOP = "i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    report = prepare_assets()
    print(report)
    runs = args.runs

    cold_tier = VmTier(pool_size=0)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: cold_tier}) as sandbox:
        cold = [_run(sandbox, Task.command(["true"], tier="vm")) for _ in range(runs)]
    print(f"accel: {'kvm' if cold[0].metrics.extra.get('kvm') else 'tcg'}")
    _row("cold", cold)

    pool_tier = VmTier(pool_size=1)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: pool_tier}) as sandbox:
        _run(sandbox, Task.command(["true"], tier="vm"))  # sets the pool's shape
        pooled = []
        for _ in range(runs):
            pool_tier.wait_warm(60)
            pooled.append(_run(sandbox, Task.command(["true"], tier="vm")))
        _row("pooled", pooled)
        pool_tier.wait_warm(60)
        _memory(pooled[-1])
        guest_cpu = []
        for _ in range(runs):
            pool_tier.wait_warm(60)
            r = _run(sandbox, Task.command(["sh", "-c", LOOP], tier="vm"))
            guest_cpu.append(r.metrics.cpu_s or 0.0)
        python = []
        for _ in range(min(runs, 3)):
            pool_tier.wait_warm(60)
            python.append(_run(sandbox, Task.python("def main(i):\n    return 1\n", tier="vm")))
        _row("pooled python", python)
        t0 = time.perf_counter()
    close_s = time.perf_counter() - t0  # Sandbox.close: pool of one idle guest killed, dirs gone
    host = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(["busybox", "sh", "-c", LOOP], check=True)
        host.append(time.perf_counter() - t)
    g, h = statistics.median(guest_cpu), statistics.median(host)
    print(f"exec      shell loop: guest cpu {g * 1000:.0f} ms, host wall {h * 1000:.0f} ms, "
          f"{g / h:.1f}x")
    print(f"cleanup   closing a tier with one idle pooled guest: {close_s * 1000:.0f} ms")
    return 0


def _run(sandbox: Sandbox, task: Task) -> Result:
    result = sandbox.run(task)
    if not result.ok:
        raise SystemExit(f"benchmark task failed: {result.status} {result.reason} {result.stderr}")
    return result


def _row(label: str, results: list[Result]) -> None:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.0f} ms"

    startup = [r.metrics.startup_s for r in results]
    wall = [r.metrics.wall_s for r in results]
    residual = [r.metrics.wall_s - r.metrics.startup_s - r.metrics.run_s - r.metrics.cleanup_s
                for r in results]
    print(f"{label:14s} startup {med(startup)}  wall {med(wall)}  residual {med(residual)}"
          f"  (n={len(results)})")


def _memory(last: Result) -> None:
    guest_mib = last.metrics.extra.get("guest_memory_mib", 0.0)
    rss = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "qemu-system" in (proc.info["name"] or "") and any(
                "wasmbox-vm-" in part for part in proc.info["cmdline"] or ()):
            try:
                rss.append(proc.memory_info().rss)
            except psutil.Error:
                continue
    if rss:
        idle = statistics.median(rss) / 2**20
        # Guest RAM is only touched as the guest uses it, so RSS can be below the RAM size.
        print(f"memory    idle pooled guest: QEMU RSS {idle:.0f} MiB with {guest_mib:.0f} MiB "
              f"guest RAM configured")
    after = last.metrics.extra.get("qemu_rss_bytes")
    if after:
        print(f"memory    after a task: QEMU RSS {after / 2**20:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
