"""The kernel module order: dependencies first, from `graphlib`, without recursion.

The kernel package is the Debian archive's, but its ``.modinfo`` strings are still data the
host walks: a long dependency chain must not exhaust the stack, a cycle or a missing module
is an `AssetError`, and the order is the same on every run.
"""

from __future__ import annotations

import pytest

from wasmbox.tiers.vm import kernel
from wasmbox.tiers.vm.kernel import AssetError, module_order


@pytest.fixture(autouse=True)
def plain_modinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules here are their ``depends=`` line alone, not ELF files."""
    monkeypatch.setattr(kernel, "modinfo",
                        lambda elf: dict([elf.decode().split("=", 1)]) if elf else {})


def _index(deps: dict[str, str]) -> dict[str, bytes]:
    return {name: f"depends={d}".encode() for name, d in deps.items()}


def test_dependencies_come_first_and_each_module_once() -> None:
    index = _index({"virtio_pci": "virtio,virtio-ring", "virtio": "virtio_ring",
                    "virtio_ring": "", "9p": "9pnet,fscache", "9pnet": "", "fscache": ""})
    order = module_order(("virtio_pci", "9p"), index)
    assert sorted(order) == sorted(index)
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert order.index("9pnet") < order.index("9p") and order.index("fscache") < order.index("9p")


def test_the_order_is_the_same_every_time() -> None:
    index = _index({"a": "d,c,b", "b": "", "c": "", "d": ""})
    assert module_order(("a",), index) == module_order(("a",), dict(reversed(index.items())))


def test_a_long_chain_does_not_recurse() -> None:
    n = 20_000  # far past Python's recursion limit
    index = _index({f"m{i}": (f"m{i + 1}" if i + 1 < n else "") for i in range(n)})
    order = module_order(("m0",), index)
    assert order[0] == f"m{n - 1}" and order[-1] == "m0"


def test_a_cycle_is_an_asset_error() -> None:
    with pytest.raises(AssetError, match="cycle"):
        module_order(("a",), _index({"a": "b", "b": "c", "c": "a"}))


def test_a_missing_module_is_an_asset_error() -> None:
    with pytest.raises(AssetError, match="not in the kernel package"):
        module_order(("a",), _index({"a": "gone"}))
