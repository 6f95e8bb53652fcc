"""Fixtures for the VM tier: assets prepared once per session, one shared Sandbox."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox
from wasmbox.models import TierName
from wasmbox.tiers.vm.assets import AssetError, AssetReport, prepare_assets
from wasmbox.tiers.vm.machine import QEMU


@pytest.fixture(scope="session")
def vm_assets() -> AssetReport:
    """Prepare (or verify) the kernel, initramfs and python image; skip only without QEMU
    or when the kernel package cannot be downloaded."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    try:
        return prepare_assets()
    except AssetError as exc:
        if "apt-get" in str(exc):
            pytest.skip(f"the kernel package cannot be downloaded: {exc}")
        raise


@pytest.fixture(scope="session")
def vm_sandbox(vm_assets: AssetReport) -> Iterator[Sandbox]:
    """One Sandbox for every VM test, with a pool of one pre-booted guest (boots cost ~1.5 s)."""
    from wasmbox.tiers.vm import VmTier

    with Sandbox(Policy(), tiers={TierName.VM: lambda: VmTier(pool_size=1)}) as sandbox:
        available = sandbox.availability(TierName.VM)
        if not available.ok:
            pytest.fail(f"assets were prepared but the VM tier is unavailable: {available}")
        yield sandbox


@pytest.fixture
def processes_naming() -> Callable[[set[Path]], list[int]]:
    """Pids of processes whose command line names one of the given dirs (QEMU names its
    run dir): what a VM tier left running."""
    def find(dirs: set[Path]) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if any(str(d).encode() in cmdline for d in dirs):
                found.append(int(proc.name))
        return found

    return find
