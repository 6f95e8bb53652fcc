"""Internal: a guest's QEMU command line, from its `Shape` (and RAM file, for snapshots).

`machine` starts QEMU with it; pooled machines are reused only for an equal `Shape`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from wasmbox.tiers.vm.assets import Assets

QEMU = "qemu-system-x86_64"
CMDLINE = "quiet console=ttyS0 panic=-1"
MIN_GUEST_MIB = 128
GUEST_OVERHEAD_MIB = 96  # kernel, init and page cache beside the task's own cgroup limit
# TCG's translation cache: QEMU sizes it from host RAM (up to 1 GiB, filled as code runs);
# a guest that boots busybox and runs one task fits in far less, and a full cache is flushed.
TB_SIZE_MIB = 32


@dataclass(frozen=True)
class Shape:
    """What a machine is booted with; pooled machines are reused only for an equal shape."""

    memory_mib: int
    vcpus: int
    output_bytes: int
    python: bool
    sizes: str  # the ``wbx=`` kernel argument (guest tmpfs sizes)
    packages: tuple[str, ...] = ()  # host dirs shared read-only as ``wbx-pkg<n>``


@dataclass(frozen=True)
class RamFile:
    """Guest RAM backed by a file: written through by a template (`shared`), else mapped
    private, so a restored guest's writes stay its own."""

    path: Path
    shared: bool


def guest_memory_mib(task_memory: int) -> int:
    """Guest RAM for a task capped at `task_memory` bytes (the cap itself is a guest cgroup)."""
    return max(MIN_GUEST_MIB, -(-task_memory // (1 << 20)) + GUEST_OVERHEAD_MIB)


# TCG's default qemu64 model lacks the x86-64-v2 baseline (SSSE3, SSE4.1/4.2, POPCNT,
# CMPXCHG16B, LAHF/SAHF) that current manylinux wheels assume: numpy 2 dies of SIGILL without it.
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+lahf-lm"


def qemu_argv(directory: Path, assets: Assets, shape: Shape, *, kvm: bool, initrd: Path,
              extra_cmdline: str = "", ram: RamFile | None = None, monitor: bool = False,
              incoming: bool = False) -> list[str]:
    """The QEMU command line of one guest (q35: ``-M microvm`` hangs on some TCG boots).

    A template and its restores differ only in paths, the RAM file's sharing and
    ``-incoming``: the devices must match for the saved state to load.
    """
    accel = (["-enable-kvm", "-cpu", "host"] if kvm
             else ["-accel", f"tcg,tb-size={TB_SIZE_MIB}", "-cpu", TCG_CPU])
    memory = ["-m", str(shape.memory_mib)]
    if ram is not None:
        memory += [
            "-object", f"memory-backend-file,id=ram0,size={shape.memory_mib}M,"
            f"mem-path={ram.path},share={'on' if ram.shared else 'off'}",
            "-machine", "memory-backend=ram0",
        ]
    argv = [
        QEMU, "-M", "q35", *accel, *memory, "-smp", str(shape.vcpus),
        "-nodefaults", "-no-user-config", "-nic", "none", "-no-reboot", "-display", "none",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", str(assets.kernel), "-initrd", str(initrd),
        "-append", f"{CMDLINE} {shape.sizes} {extra_cmdline}".strip(),
        "-serial", "stdio",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=task,path={directory / 'task.sock'}",
        "-device", "virtserialport,bus=vser.0,chardev=task,name=wasmbox.task",
        "-drive", f"file={directory / 'out.img'},format=raw,if=none,id=out,cache=unsafe",
        "-device", "virtio-blk-pci,drive=out,serial=wbxout",
    ]
    # Read-only 9p shares: the host's userland for a command's root, the policy's packages.
    # security_model=none: QEMU reads as itself, never maps guest ids onto host files.
    shares = [(f"wbx-{name}", f"/{name}") for name in assets.userland]
    shares += [(f"wbx-pkg{i}", path) for i, path in enumerate(shape.packages)]
    for i, (tag, path) in enumerate(shares):
        argv += ["-fsdev", f"local,id=fs{i},path={path},security_model=none,readonly=on",
                 "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
    if shape.python and assets.python_image is not None:
        argv += [
            "-drive", f"file={assets.python_image},format=raw,if=none,id=py,readonly=on",
            "-device", "virtio-blk-pci,drive=py,serial=wbxpy",
        ]
    if monitor:
        argv += ["-qmp", f"unix:{directory / 'qmp.sock'},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    pdeath = shutil.which("setpriv")
    # The guest dies with the thread that started it, even when the host process is killed.
    return [pdeath, "--pdeathsig", "KILL", "--", *argv] if pdeath else argv

