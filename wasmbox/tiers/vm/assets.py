"""VM assets built without any registry: a Debian cloud kernel, busybox, an initramfs we write.

``python3 -m wasmbox.tiers.vm.assets`` prepares them. Everything lands in
``$WASMBOX_CACHE_DIR/vm`` (or ``~/.cache/wasmbox/vm``) with a manifest of sha256 sums:

- ``vmlinuz``: from the real ``linux-image-<ver>-amd64`` package that ``linux-image-amd64``
  depends on (the generic kernel: the cloud one has no 9p), fetched with ``apt-get download``
  and unpacked with ``dpkg -x`` (never installed on the host);
- ``initramfs.cpio``: busybox, the virtio, 9p and ext4 modules in dependency order (computed
  here from each module's ``.modinfo``: there is no depmod), the generated ``/init``, a
  command's root (``/r``: the host's userland layout, shared over 9p at run time), and two
  static helpers built with the host's C compiler: ``wbx-seed`` credits host entropy
  (without it, snapshots stay off) and ``wbx-run`` mounts the userland and starts the task
  in one exec (without it, busybox tools run the task in the initramfs root);
- ``python.ext4``: a read-only image of the host's python3 and its stdlib (``mkfs.ext4 -d``).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wasmbox.errors import HostFailure
from wasmbox.tiers.vm.cpio import CpioWriter
from wasmbox.tiers.vm.guest import (
    INIT_SCRIPT,
    PRESTART,
    PYTHON_MOUNTPOINTS,
    RUN_HELPER,
    SEED_HELPER,
    TASK_ROOT,
)

FORMAT = 5  # bump when the layout of any asset changes
# The generic kernel, not the cloud one: only it builds 9p (the task's /usr, shared from the host).
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
HOST_PYTHON = Path("/usr/bin/python3")
HOST_LD_CACHE = Path("/etc/ld.so.cache")
# What a container's root takes from the host (container/bundle.py's _HOST_DIRS).
USERLAND_DIRS = ("usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin")
# virtio_pci finds the devices, virtio_blk the disks, virtio_console the task channel, ext4
# (with the crc32c its checksums ask the crypto API for) the python image, 9p the userland.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "9pnet_virtio", "9p",
                  "crc32c_generic", "ext4")
PYTHON_MODULES = ("crc32c_generic", "ext4")  # loaded by Python shapes only (seconds under TCG)
PREPARE_COMMAND = "python3 -m wasmbox.tiers.vm.assets"
GUEST_ACCOUNTS = {
    "passwd": b"root:x:0:0::/:/bin/sh\ntask:x:1000:1000::/task:/bin/sh\n",
    "group": b"root:x:0:\ntask:x:1000:\n",
}


class AssetError(HostFailure):
    """The VM assets cannot be prepared or are damaged."""


@dataclass(frozen=True)
class Assets:
    """Paths of a verified asset set."""

    root: Path
    kernel: Path
    initramfs: Path
    python_image: Path | None
    kernel_version: str
    modules: tuple[str, ...]
    seed_helper: bool = False  # the initramfs can reseed a restored guest's RNG
    # Host directories a command's root shares read-only over 9p (``usr`` on merged-/usr
    # hosts); empty when the initramfs has no wbx-run to mount them (no C compiler).
    userland: tuple[str, ...] = ()


@dataclass
class AssetReport:
    """What `prepare_assets` found or built."""

    assets: Assets
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        a = self.assets
        what = ", ".join(self.built) if self.built else "nothing (cache verified)"
        return (
            f"VM assets in {a.root}\n  kernel {a.kernel_version}\n"
            f"  modules (load order): {' '.join(a.modules)}\n"
            f"  python image: {a.python_image or 'not built (no host python3)'}\n"
            f"  built: {what} in {self.seconds:.1f} s"
        )


def cache_dir() -> Path:
    """``$WASMBOX_CACHE_DIR/vm`` or ``~/.cache/wasmbox/vm``."""
    base = os.environ.get("WASMBOX_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "wasmbox") / "vm"


def prepare_assets(force: bool = False, root: Path | None = None) -> AssetReport:
    """Fetch, build and checksum every asset; reuse what a verified manifest already covers.

    Raises `AssetError` when the kernel package cannot be downloaded or a tool fails.
    """
    t0 = time.monotonic()
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    manifest = {} if force else _read_manifest(root)
    built: list[str] = []
    if manifest.get("modules_wanted") != list(WANTED_MODULES) or not _verified(
        root, manifest, ("vmlinuz", "modules.tar"), full=True
    ):
        manifest = {"format": FORMAT, **_fetch_kernel(root)}
        built.append("kernel")
    recipe = _recipe()
    if manifest.get("recipe") != recipe or not _verified(root, manifest, ("initramfs.cpio",),
                                                         full=True):
        manifest["modules"], manifest["seed_helper"], manifest["userland"] = (
            _build_initramfs(root))
        manifest["recipe"] = recipe
        built.append("initramfs")
    if HOST_PYTHON.exists() and (
        manifest.get("python_recipe") != recipe
        or not _verified(root, manifest, ("python.ext4",), full=True)
    ):
        _build_python_image(root)
        manifest["python_recipe"] = recipe
        built.append("python image")
    manifest["files"] = {
        name: _fingerprint(root / name, with_hash=True)
        for name in ("vmlinuz", "modules.tar", "initramfs.cpio", "python.ext4")
        if (root / name).exists()
    }
    _write_manifest(root, manifest)
    return AssetReport(_assets(root, manifest), built, time.monotonic() - t0)


def load_assets(root: Path | None = None) -> Assets:
    """The prepared assets, checked cheaply (sizes and mtimes against the manifest).

    Raises `AssetError` naming the command that prepares them.
    """
    root = root or cache_dir()
    manifest = _read_manifest(root)
    if not manifest:
        raise AssetError(f"VM assets are not prepared in {root}: run `{PREPARE_COMMAND}`")
    if manifest.get("recipe") != _recipe() or not _verified(
        root, manifest, ("vmlinuz", "initramfs.cpio"), full=False
    ):
        raise AssetError(f"VM assets in {root} are stale or damaged: run `{PREPARE_COMMAND}`")
    return _assets(root, manifest)


# --- kernel -------------------------------------------------------------------------------


def _fetch_kernel(root: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=root, prefix="fetch-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user drops privileges to write the download
        meta = _apt_download(META_PACKAGE, work)
        depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
        match = re.search(r"(linux-image-[0-9][^\s,(]*-amd64)", depends)
        if not match:
            raise AssetError(f"{META_PACKAGE} depends on no cloud kernel: {depends.strip()!r}")
        package = _apt_download(match.group(1), work)
        tree = work / "tree"
        _run(["dpkg", "-x", str(package), str(tree)])
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


# --- modules and initramfs ----------------------------------------------------------------


def module_order(wanted: tuple[str, ...], index: Mapping[str, bytes]) -> list[str]:
    """`wanted` and everything they depend on, dependencies first (a depth-first topo sort).

    `index` maps a module name (``-`` read as ``_``) to the module's ELF bytes.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise AssetError(f"module dependency cycle through {name}")
        if name not in index:
            raise AssetError(f"module {name} is not in the kernel package")
        visiting.add(name)
        for dep in modinfo(index[name]).get("depends", "").split(","):
            if dep:
                visit(dep.replace("-", "_"))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


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
                       if (name := _module_name(path.name)) is not None}

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


def _module_name(filename: str) -> str | None:
    if not filename.endswith((".ko", ".ko.xz")):
        return None  # zstd/gzip modules would need a decompressor the stdlib lacks
    return re.sub(r"\.ko(\.xz)?$", "", filename).replace("-", "_")


def _module_index(root: Path) -> dict[str, bytes]:
    index: dict[str, bytes] = {}
    with tarfile.open(root / "modules.tar") as tar:
        for member in tar:
            name = _module_name(member.name)
            data = tar.extractfile(member) if member.isfile() else None
            if name is not None and data is not None:
                index[name] = data.read()
    return index


def _build_initramfs(root: Path) -> tuple[list[str], bool, list[str]]:
    index = _module_index(root)
    order = module_order(WANTED_MODULES, index)
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/wasmbox", "proc", "sys", "tmp", "run",
              "task", "job", "ship", "py"):
        cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    cpio.device("dev/console", 0o600, 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _run([str(BUSYBOX), "--list"]).split():
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    base = module_order(tuple(m for m in WANTED_MODULES if m not in PYTHON_MODULES), index)
    cpio.directory("lib/wasmbox/py")
    for i, name in enumerate(order):
        where = "lib/wasmbox" if name in base else "lib/wasmbox/py"
        cpio.file(f"{where}/{i:02d}-{name}.ko", index[name], 0o644)
    for name in ("passwd", "group"):
        cpio.file(f"etc/{name}", GUEST_ACCOUNTS[name])
    cpio.directory("job/py")
    cpio.file("job/py/prestart.py", PRESTART.encode(), 0o644)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    seed = _build_helper(root, "wbx-seed", SEED_HELPER)
    if seed is not None:
        cpio.file("bin/wbx-seed", seed, 0o700)
    run = _build_helper(root, "wbx-run", RUN_HELPER)
    userland: list[str] = []
    if run is not None:
        cpio.file("bin/wbx-run", run, 0o700)
        userland = _task_root(cpio)
    _atomic_write(root / "initramfs.cpio", cpio.finish())
    return order, seed is not None, userland


def _task_root(cpio: CpioWriter) -> list[str]:
    """The command root (`TASK_ROOT`), laid out like a container's: the host's userland
    dirs (shared over 9p; its symlinks, such as merged-/usr's ``/bin -> usr/bin``, copied),
    the task's mount points, and an /etc of our own plus the loader's cache and the
    alternatives links. Returns the shared directory names."""
    top = TASK_ROOT.lstrip("/")
    shared: list[str] = []
    for d in ("", "/task", "/tmp", "/dev", "/proc", "/etc", "/opt"):
        cpio.directory(top + d, 0o1777 if d == "/tmp" else 0o755)
    for name in USERLAND_DIRS:
        host = Path("/", name)
        if host.is_symlink():
            cpio.symlink(f"{top}/{name}", os.readlink(host))
        elif host.is_dir():
            cpio.directory(f"{top}/{name}")
            shared.append(name)
    for name in ("passwd", "group"):
        cpio.file(f"{top}/etc/{name}", GUEST_ACCOUNTS[name])
    cpio.file(f"{top}/etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
    if HOST_LD_CACHE.is_file():
        cpio.file(f"{top}/etc/ld.so.cache", HOST_LD_CACHE.read_bytes())
    alternatives = _alternatives()
    if alternatives:
        cpio.directory(f"{top}/etc/alternatives")
    for host in (Path("/etc/localtime"), *alternatives):
        if host.is_symlink():
            cpio.symlink(f"{top}{host}", os.readlink(host))
    return shared


def _alternatives() -> list[Path]:
    try:
        return sorted(p for p in Path("/etc/alternatives").iterdir() if p.is_symlink())
    except OSError:
        return []


def _build_helper(root: Path, name: str, code: str) -> bytes | None:
    """A guest helper as a static binary, or None without a C compiler or a static libc."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory(dir=root, prefix="helper-") as tmp:
        source, binary = Path(tmp) / f"{name}.c", Path(tmp) / name
        source.write_text(code)
        try:
            subprocess.run([cc, "-static", "-Os", "-s", "-o", str(binary), str(source)],
                           check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        return binary.read_bytes()


# --- python image -------------------------------------------------------------------------

_SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages",
                "dist-packages", "lib2to3", "__phello__", "config-3.11-x86_64-linux-gnu"}


def _build_python_image(root: Path) -> None:
    exe = HOST_PYTHON.resolve()
    stdlib = Path(_run([str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"]
                       ).strip())
    with tempfile.TemporaryDirectory(dir=root, prefix="pyimg-") as tmp:
        tree = Path(tmp) / "tree"
        for d in PYTHON_MOUNTPOINTS:
            (tree / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        shutil.copytree(stdlib, tree / stdlib.relative_to("/"), symlinks=True,
                        ignore=lambda _d, names: [n for n in names if n in _SKIP_STDLIB])
        _copy_into(tree, exe)
        (tree / "usr/bin/python3").symlink_to(exe.name)
        (tree / "etc").mkdir(exist_ok=True)
        for name in ("passwd", "group"):  # start-stop-daemon resolves the task's uid
            (tree / "etc" / name).write_bytes(GUEST_ACCOUNTS[name])
        shutil.copyfile(BUSYBOX, tree / "bin/busybox")
        os.chmod(tree / "bin/busybox", 0o755)
        dynload = [str(p) for p in (tree / stdlib.relative_to("/")).rglob("*.so")]
        for lib in _shared_libraries([str(exe), *dynload]):
            _copy_into(tree, lib)
        size_mib = _tree_bytes(tree) * 13 // 10 // (1 << 20) + 16
        image = Path(tmp) / "python.ext4"
        _run(["mkfs.ext4", "-q", "-F", "-L", "wbxpy", "-O", "^has_journal", "-E",
              "root_owner=0:0", "-d", str(tree), str(image), f"{size_mib}M"])
        os.replace(image, root / "python.ext4")


def _shared_libraries(binaries: list[str]) -> set[Path]:
    found: set[Path] = set()
    out = subprocess.run(["ldd", *binaries], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            found.add(Path(m.group(1)))
    return found


def _copy_into(tree: Path, path: Path) -> None:
    target = tree / str(path).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path.resolve(), target)
    if path.is_symlink() or path.resolve() != path:  # keep the name the loader asks for
        real = tree / str(path.resolve()).lstrip("/")
        if not real.exists():
            real.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path.resolve(), real)


def _tree_bytes(tree: Path) -> int:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


# --- manifest -----------------------------------------------------------------------------


def _recipe() -> str:
    """A hash of everything an image is built from besides the kernel package."""
    h = hashlib.sha256(f"{FORMAT}:{WANTED_MODULES}".encode())
    h.update(INIT_SCRIPT.encode())
    h.update(PRESTART.encode())
    h.update(SEED_HELPER.encode())
    h.update(RUN_HELPER.encode())
    h.update(b"cc" if shutil.which("cc") or shutil.which("gcc") else b"no-cc")
    h.update(_fingerprint_text(BUSYBOX).encode())
    # The task root copies the host's layout, loader cache and alternatives links.
    h.update(_fingerprint_text(HOST_LD_CACHE).encode())
    h.update(_fingerprint_text(Path("/etc/alternatives")).encode())
    h.update(repr([(n, Path("/", n).is_symlink()) for n in USERLAND_DIRS]).encode())
    return h.hexdigest()[:16]


def _fingerprint_text(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _fingerprint(path: Path, *, with_hash: bool) -> dict[str, str | int]:
    st = path.stat()
    entry: dict[str, str | int] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        entry["sha256"] = h.hexdigest()
    return entry


def _verified(root: Path, manifest: dict[str, object], names: tuple[str, ...], *,
              full: bool) -> bool:
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        return False
    for name in names:
        want = files.get(name)
        path = root / name
        if not isinstance(want, dict) or not path.exists():
            return False
        got = _fingerprint(path, with_hash=full)
        keys = ("size", "sha256") if full else ("size", "mtime_ns")
        if any(got[k] != want.get(k) for k in keys):
            return False
    return True


def _assets(root: Path, manifest: dict[str, object]) -> Assets:
    python = root / "python.ext4"
    files = manifest.get("files")
    has_python = isinstance(files, dict) and "python.ext4" in files and python.exists()
    modules = manifest.get("modules")
    userland = manifest.get("userland")
    return Assets(
        root=root,
        kernel=root / "vmlinuz",
        initramfs=root / "initramfs.cpio",
        python_image=python if has_python else None,
        kernel_version=str(manifest.get("kernel_version", "?")),
        modules=tuple(modules) if isinstance(modules, list) else (),
        seed_helper=manifest.get("seed_helper") is True,
        userland=tuple(str(n) for n in userland) if isinstance(userland, list) else (),
    )


def _read_manifest(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_manifest(root: Path, manifest: dict[str, object]) -> None:
    _atomic_write(root / "manifest.json", json.dumps(manifest, indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as exc:
        raise AssetError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise AssetError(f"{' '.join(argv[:3])} failed: {exc.stderr.strip()[:500]}") from exc


def main() -> int:
    """Prepare the assets and print the report."""
    force = "--force" in sys.argv[1:]
    try:
        print(prepare_assets(force=force))
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
