"""Host settings: the one place wasmbox reads its environment variables.

A `HostConfig` is built once (by a `Sandbox`, or by a tier made on its own) and handed to the
tiers, so the workspace root, the caches and what the janitors sweep always agree.

- ``WASMBOX_TMPDIR``: where workspaces, container staging and VM run directories live;
  default ``/dev/shm`` when writable (staging and removal are several times cheaper in
  memory; outputs are capped while the guest runs), else the system temp directory.
- ``WASMBOX_CACHE_DIR``: the cache root; default ``$XDG_CACHE_HOME/wasmbox``, else
  ``~/.cache/wasmbox``. Compiled modules are kept directly in ``WASMBOX_CACHE_DIR`` when it is
  set (``modules/`` under the default root), VM assets in ``vm/`` under the root.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_SHM = "/dev/shm"


@dataclass(frozen=True)
class HostConfig:
    """Where wasmbox keeps its files on this host. Immutable; see `from_env`."""

    workspace_root: Path
    module_cache: Path
    vm_cache: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 workspace_root: Path | None = None) -> HostConfig:
        """The settings `environ` (default ``os.environ``) gives; `workspace_root` overrides."""
        env = os.environ if environ is None else environ
        pinned = env.get("WASMBOX_CACHE_DIR")
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(pinned) if pinned else Path(xdg) / "wasmbox"
        return cls(
            workspace_root=workspace_root or _workspace_root(env),
            module_cache=root if pinned else root / "modules",
            vm_cache=root / "vm",
        )

    def with_workspace_root(self, root: Path | None) -> HostConfig:
        """This config with another workspace root (None keeps this one)."""
        return self if root is None else dataclasses.replace(self, workspace_root=root)


def _workspace_root(env: Mapping[str, str]) -> Path:
    pinned = env.get("WASMBOX_TMPDIR")
    if pinned:
        return Path(pinned)
    if os.access(_SHM, os.W_OK | os.X_OK):
        return Path(_SHM)
    return Path(tempfile.gettempdir())
