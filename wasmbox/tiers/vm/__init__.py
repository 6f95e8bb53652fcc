"""The VM tier: tasks in throwaway QEMU guests booted from assets we build ourselves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wasmbox.tiers.vm.tier import VmTier

__all__ = ["VmTier"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m wasmbox.tiers.vm.assets` does not import its own module twice.
    if name == "VmTier":
        from wasmbox.tiers.vm.tier import VmTier

        return VmTier
    raise AttributeError(name)
