"""Internal: the policy's pure-Python packages for Python tasks (wasm tier).

Each package (a directory or a wheel, unpacked once, C extensions refused) is mounted
read-only under ``/python/N`` and put on the task's ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from wasmbox.errors import ConfigError

PACKAGES_ROOT = "/python"


def package_mounts(packages: Sequence[Path], unpacked: Callable[[Path], Path]
                   ) -> tuple[list[str], dict[str, Path]]:
    """sys.path entries and read-only mounts for `packages`; `unpacked` turns a wheel into
    its unpacked directory. Raises `ConfigError` for anything else."""
    paths: list[str] = []
    mounts: dict[str, Path] = {}
    for i, package in enumerate(packages):
        guest = f"{PACKAGES_ROOT}/{i}"
        host = Path(package)
        if host.is_file() and host.suffix == ".whl":
            host = unpacked(host)
        elif not host.is_dir():
            raise ConfigError(f"python.packages: {package} is not a directory or a .whl")
        if (host / "__init__.py").exists():
            # A package directory itself: mount it under its own name, so only it is seen.
            mounts[f"{guest}/{host.name}"] = host
            paths.append(f"{host.name}={guest}/{host.name}")
        else:
            mounts[guest] = host
            paths.append(guest)
    return paths, mounts


def package_names(packages: Sequence[Path]) -> set[str]:
    """Top-level names `packages` make importable (for a wheel: its distribution name)."""
    names: set[str] = set()
    for package in packages:
        host = Path(package)
        if (host / "__init__.py").exists():
            names.add(host.name)
        elif host.is_dir():
            names.update(p.stem for p in host.iterdir() if p.suffix == ".py" or p.is_dir())
        else:
            names.add(host.name.split("-")[0])  # a wheel: distribution name
    return names
