"""VM assets built without any registry: a Debian kernel, busybox, an initramfs we write.

``python3 -m wasmbox.tiers.vm.assets`` prepares them. Everything lands in
``$WASMBOX_CACHE_DIR/vm`` (or ``~/.cache/wasmbox/vm``) with a manifest of sha256 sums:

- ``vmlinuz``: from the real ``linux-image-<ver>-amd64`` package that ``linux-image-amd64``
  depends on (the generic kernel: the cloud one has no 9p), fetched with ``apt-get download``
  and unpacked with ``dpkg -x`` (never installed on the host);
- ``initramfs.cpio``: busybox, the virtio, 9p and ext4 modules in dependency order (computed
  here from each module's ``.modinfo``: there is no depmod), the generated ``/init``, a
  command's root (``/r``: the host's userland layout, shared over 9p at run time), and two
  static helpers built with the host's C compiler: ``wbx-seed`` credits host entropy and
  unpacks the task's bundle (without it, snapshots stay off) and ``wbx-run`` mounts the
  userland and starts the task in one exec (without it, busybox tools run the task in the
  initramfs root);
- ``python.ext4``: a read-only image of the host's python3 and its stdlib (``mkfs.ext4 -d``).

The kernel and its modules are `kernel`'s, the two images `images`'; this module checks and
records them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wasmbox._config import HostConfig
from wasmbox.tiers.vm.guest import INIT_SCRIPT, PRESTART, RUN_HELPER, SEED_HELPER
from wasmbox.tiers.vm.images import (
    BUSYBOX,
    HOST_LD_CACHE,
    HOST_PYTHON,
    RUNTIME_LIBRARIES,
    USERLAND_DIRS,
    atomic_write,
    build_initramfs,
    build_python_image,
)
from wasmbox.tiers.vm.kernel import (
    WANTED_MODULES,
    AssetError,
    fetch_kernel,
    modinfo,
    module_order,
)

__all__ = ["PREPARE_COMMAND", "AssetError", "AssetReport", "Assets", "cache_dir", "load_assets",
           "main", "modinfo", "module_order", "prepare_assets"]

FORMAT = 6  # bump when the layout of any asset changes
PREPARE_COMMAND = "python3 -m wasmbox.tiers.vm.assets"


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
    """``$WASMBOX_CACHE_DIR/vm`` or ``~/.cache/wasmbox/vm`` (see `HostConfig`)."""
    return HostConfig.from_env().vm_cache


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
        manifest = {"format": FORMAT, **fetch_kernel(root)}
        built.append("kernel")
    recipe = _recipe()
    if manifest.get("recipe") != recipe or not _verified(root, manifest, ("initramfs.cpio",),
                                                         full=True):
        manifest["modules"], manifest["seed_helper"], manifest["userland"] = (
            build_initramfs(root))
        manifest["recipe"] = recipe
        built.append("initramfs")
    if HOST_PYTHON.exists() and (
        manifest.get("python_recipe") != recipe
        or not _verified(root, manifest, ("python.ext4",), full=True)
    ):
        build_python_image(root)
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


# --- manifest -----------------------------------------------------------------------------


def _recipe() -> str:
    """A hash of everything an image is built from besides the kernel package."""
    h = hashlib.sha256(f"{FORMAT}:{WANTED_MODULES}".encode())
    h.update(INIT_SCRIPT.encode())
    h.update(PRESTART.encode())
    h.update(SEED_HELPER.encode())
    h.update(RUN_HELPER.encode())
    h.update(b"cc" if shutil.which("cc") or shutil.which("gcc") else b"no-cc")
    h.update(repr(RUNTIME_LIBRARIES).encode())  # copied into the python image
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
    atomic_write(root / "manifest.json", json.dumps(manifest, indent=2).encode())


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
