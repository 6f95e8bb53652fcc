"""Internal: the guest kernel: the Debian package it comes from, and the modules the guest loads.

The kernel is the real ``linux-image-<ver>-amd64`` package that ``linux-image-amd64`` depends
on (the generic kernel: the cloud one has no 9p), fetched with ``apt-get download`` and
unpacked with ``dpkg -x``, never installed on the host. Only the wanted modules and their
dependencies are kept (``modules.tar``), in an order computed from each module's
``.modinfo``: the guest has no depmod.
"""

from __future__ import annotations

import graphlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from wasmbox.errors import HostFailure

# The generic kernel, not the cloud one: only it builds 9p (the task's /usr, shared from the host).
META_PACKAGE = "linux-image-amd64"
# virtio_pci finds the devices, virtio_blk the disks, virtio_console the task channel, ext4
# (with the crc32c its checksums ask the crypto API for) the python image, 9p the userland.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "9pnet_virtio", "9p",
                  "crc32c_generic", "ext4")
PYTHON_MODULES = ("crc32c_generic", "ext4")  # loaded by Python shapes only (seconds under TCG)


class AssetError(HostFailure):
    """The VM assets cannot be prepared or are damaged."""



def fetch_kernel(root: Path) -> dict[str, object]:
    """Download the kernel package; keep ``vmlinuz`` and ``modules.tar`` in `root`."""
    with tempfile.TemporaryDirectory(dir=root, prefix="fetch-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user drops privileges to write the download
        meta = _apt_download(META_PACKAGE, work)
        depends = run_tool(["dpkg-deb", "-f", str(meta), "Depends"])
        match = re.search(r"(linux-image-[0-9][^\s,(]*-amd64)", depends)
        if not match:
            raise AssetError(f"{META_PACKAGE} depends on no cloud kernel: {depends.strip()!r}")
        package = _apt_download(match.group(1), work)
        tree = work / "tree"
        run_tool(["dpkg", "-x", str(package), str(tree)])
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise AssetError(f"{package.name} holds no /boot/vmlinuz-*")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        shutil.copyfile(kernels[-1], root / "vmlinuz")
        _keep_modules(tree / "lib" / "modules" / version / "kernel", root / "modules.tar")
    return {"kernel_version": version, "kernel_package": match.group(1),
            "modules_wanted": list(WANTED_MODULES)}


def _apt_download(package: str, into: Path) -> Path:
    before = set(into.glob("*.deb"))
    try:
        subprocess.run(["apt-get", "download", package], cwd=into, check=True,
                       capture_output=True, text=True, timeout=300)
    except FileNotFoundError as exc:
        raise AssetError("apt-get is not installed: cannot download the kernel") from exc
    except subprocess.CalledProcessError as exc:
        raise AssetError(f"apt-get download {package} failed: {exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"apt-get download {package} timed out") from exc
    new = sorted(set(into.glob("*.deb")) - before)
    if not new:
        raise AssetError(f"apt-get download {package} produced no .deb")
    return new[0]



def module_order(wanted: tuple[str, ...], index: Mapping[str, bytes]) -> list[str]:
    """`wanted` and everything they depend on, dependencies first (`graphlib`).

    `index` maps a module name (``-`` read as ``_``) to the module's ELF bytes. The
    dependency graph is gathered with an explicit stack (never recursion) and sorted with
    sorted dependency lists, so the order is the same on every run.
    """
    graph: dict[str, list[str]] = {}
    todo = list(reversed(wanted))
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        if name not in index:
            raise AssetError(f"module {name} is not in the kernel package")
        depends = modinfo(index[name]).get("depends", "").split(",")
        graph[name] = sorted({dep.replace("-", "_") for dep in depends if dep})
        todo.extend(reversed(graph[name]))
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssetError(f"module dependency cycle through {exc.args[1][0]}") from exc


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of an ELF64 module's ``.modinfo`` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise AssetError("not a little-endian ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = elf.index(b"\0", str_off + name_off)
        if elf[str_off + name_off:end] == b".modinfo":
            pairs = elf[offset:offset + size].split(b"\0")
            return dict(p.decode(errors="replace").partition("=")[::2] for p in pairs if p)
    return {}


class _ModuleFiles(Mapping[str, bytes]):
    """Module name -> ELF bytes, read when asked (the generic package holds ~4000 modules)."""

    def __init__(self, tree: Path) -> None:
        self._paths = {name: path for path in tree.rglob("*.ko*")
                       if (name := module_name(path.name)) is not None}

    def __getitem__(self, name: str) -> bytes:
        path = self._paths[name]
        raw = path.read_bytes()
        return lzma.decompress(raw) if path.name.endswith(".xz") else raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def _keep_modules(tree: Path, into: Path) -> None:
    """Keep only the wanted modules and their dependencies (the package holds ~400 MB)."""
    index = _ModuleFiles(tree)
    with tarfile.open(into, "w") as tar:
        for name in module_order(WANTED_MODULES, index):
            info = tarfile.TarInfo(f"{name}.ko")
            info.size = len(index[name])
            tar.addfile(info, io.BytesIO(index[name]))


def module_name(filename: str) -> str | None:
    """The module name of a ``.ko``/``.ko.xz`` file name (``-`` read as ``_``), else None."""
    if not filename.endswith((".ko", ".ko.xz")):
        return None  # zstd/gzip modules would need a decompressor the stdlib lacks
    return re.sub(r"\.ko(\.xz)?$", "", filename).replace("-", "_")


def module_index(root: Path) -> dict[str, bytes]:
    """Module name -> ELF bytes of the modules kept in ``modules.tar``."""
    index: dict[str, bytes] = {}
    with tarfile.open(root / "modules.tar") as tar:
        for member in tar:
            name = module_name(member.name)
            data = tar.extractfile(member) if member.isfile() else None
            if name is not None and data is not None:
                index[name] = data.read()
    return index


def run_tool(argv: list[str]) -> str:
    """A host tool's stdout; raises `AssetError` when it is missing or fails."""
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as exc:
        raise AssetError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise AssetError(f"{' '.join(argv[:3])} failed: {exc.stderr.strip()[:500]}") from exc
