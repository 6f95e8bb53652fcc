"""Internal: the guest's images: the initramfs (busybox, modules, ``/init``, the helpers,
a command's root) and the read-only python image (the host's python3 and its stdlib,
``mkfs.ext4 -d``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from wasmbox.tiers.vm.cpio import CpioWriter
from wasmbox.tiers.vm.guest import (
    INIT_SCRIPT,
    PRESTART,
    PYTHON_MOUNTPOINTS,
    RUN_HELPER,
    SEED_HELPER,
    TASK_ROOT,
)
from wasmbox.tiers.vm.kernel import (
    PYTHON_MODULES,
    WANTED_MODULES,
    module_index,
    module_order,
    run_tool,
)

BUSYBOX = Path("/bin/busybox")
HOST_PYTHON = Path("/usr/bin/python3")
HOST_LD_CACHE = Path("/etc/ld.so.cache")
# What a container's root takes from the host (container/bundle.py's _HOST_DIRS).
USERLAND_DIRS = ("usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin")
GUEST_ACCOUNTS = {
    "passwd": b"root:x:0:0::/:/bin/sh\ntask:x:1000:1000::/task:/bin/sh\n",
    "group": b"root:x:0:\ntask:x:1000:\n",
}


def build_initramfs(root: Path) -> tuple[list[str], bool, list[str]]:
    """Write ``initramfs.cpio``: (module load order, has the seed helper, shared userland)."""
    index = module_index(root)
    order = module_order(WANTED_MODULES, index)
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/wasmbox", "proc", "sys", "tmp", "run",
              "task", "job", "ship", "py"):
        cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    cpio.device("dev/console", 0o600, 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in run_tool([str(BUSYBOX), "--list"]).split():
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
    atomic_write(root / "initramfs.cpio", cpio.finish())
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


_SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages",
                "dist-packages", "lib2to3", "__phello__", "config-3.11-x86_64-linux-gnu"}


# Libraries compiled extension modules commonly link against beyond python3's own (manylinux
# wheels such as numpy's need libstdc++ and glibc's split-out libpthread/libdl/librt; OpenMP
# builds libgomp): copied in when the host has them, so a `pip install --target` package that
# imports in a container imports in a VM too.
RUNTIME_LIBRARIES = ("libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1", "libpthread.so.0",
                     "libdl.so.2", "librt.so.1", "libm.so.6", "libutil.so.1", "libz.so.1")


def build_python_image(root: Path) -> None:
    """Write ``python.ext4``: the host's python3, its stdlib and shared libraries (with
    `RUNTIME_LIBRARIES`)."""
    exe = HOST_PYTHON.resolve()
    stdlib = Path(run_tool([str(exe), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['stdlib'])"]).strip())
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
        runtime = [str(p) for p in _host_libraries(RUNTIME_LIBRARIES)]
        for lib in _shared_libraries([str(exe), *dynload, *runtime]) | set(map(Path, runtime)):
            _copy_into(tree, lib)
        size_mib = _tree_bytes(tree) * 13 // 10 // (1 << 20) + 16
        image = Path(tmp) / "python.ext4"
        run_tool(["mkfs.ext4", "-q", "-F", "-L", "wbxpy", "-O", "^has_journal", "-E",
              "root_owner=0:0", "-d", str(tree), str(image), f"{size_mib}M"])
        os.replace(image, root / "python.ext4")


def _host_libraries(names: tuple[str, ...]) -> list[Path]:
    """The host's copies of the libraries `names` (by the loader's cache), those it has."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    found: dict[str, Path] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) \(libc6,x86-64[^)]*\) => (/\S+)$", line)
        if m and m.group(1) in names and m.group(1) not in found:
            found[m.group(1)] = Path(m.group(2))
    return [found[n] for n in names if n in found]


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


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
