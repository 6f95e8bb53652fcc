"""Internal: the shared read-only root every container starts from.

One directory per tier whose only content is mount points, symlinks and a tiny /etc; the
host's system directories are bound over it read-only by each container's config
(`wasmbox.tiers.container.bundle.make_config`), so nothing of the host's /etc, /home, /root,
/var or /run is ever visible.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

ROOTFS_PREFIX = "wasmbox-rootfs-"
CODE_MOUNT = "/.wasmbox"
_HOST_DIRS = ("usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin")
_HOST_ETC = ("ld.so.cache", "alternatives", "localtime")
_MOUNTPOINTS = ("proc", "dev", "tmp", "task", CODE_MOUNT.lstrip("/"))
_PASSWD = "root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


class RootSkeleton:
    """An empty root directory whose only content is mount points, symlinks and a tiny /etc.

    Host directories (/usr, /lib...) are bound over it read-only; nothing of the host's
    /etc, /home, /root, /var or /run is ever visible.
    """

    def __init__(self, parent: str) -> None:
        self.path = tempfile.mkdtemp(prefix=f"{ROOTFS_PREFIX}{os.getpid()}-", dir=parent)
        self._lock = threading.Lock()
        self.binds: list[tuple[str, str]] = []  # (host, guest) read-only binds
        try:
            self._build()
        except BaseException:
            self.remove()
            raise

    def _build(self) -> None:
        root = self.path
        for name in _HOST_DIRS:
            host = "/" + name
            if os.path.islink(host):
                os.symlink(os.readlink(host), f"{root}/{name}")
            elif os.path.isdir(host):
                os.mkdir(f"{root}/{name}")
                self.binds.append((host, host))
        for name in _MOUNTPOINTS:
            os.mkdir(f"{root}/{name}")
        # runc gives a tmpfs the mode of the directory it is mounted on (mode= is ignored).
        os.chmod(f"{root}/tmp", 0o1777)
        os.mkdir(f"{root}/etc")
        for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("hosts", _HOSTS)):
            Path(f"{root}/etc/{name}").write_text(text)
        for name in _HOST_ETC:
            host = "/etc/" + name
            if os.path.isdir(host) and not os.path.islink(host):
                os.mkdir(f"{root}/etc/{name}")
                self.binds.append((host, host))
            elif os.path.isfile(host):
                shutil.copyfile(host, f"{root}/etc/{name}")
        os.chmod(root, 0o755)

    def ensure_mountpoint(self, guest: str, is_dir: bool) -> None:
        """Create a mount point for a policy mount, so the runtime never writes the root."""
        target = self.path + guest
        with self._lock:
            if os.path.lexists(target):
                return
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if is_dir:
                os.mkdir(target)
            else:
                open(target, "x").close()

    def remove(self) -> None:
        """Delete the skeleton (it holds no mounts: they live in containers' namespaces)."""
        shutil.rmtree(self.path, ignore_errors=True)
