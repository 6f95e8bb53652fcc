"""tier="auto": the lightest tier that can serve the task, heavier ones when it cannot, and
never a lighter one than the policy demands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Status, Task, TierName, TierUnavailable
from wasmbox.tiers.base import Tier
from wasmbox.tiers.container import ContainerTier
from wasmbox.tiers.wasm import WasmTier

# lzma needs the C module _lzma, which the host's Python has and CPython-for-WASI does not
# build (sqlite3, once the example, imports in the wasm tier since the stdlib is mounted).
SQL_TASK = """
import lzma
def main(inp):
    data = lzma.decompress(lzma.compress(bytes(range(inp["n"]))))
    return {"sum": sum(data)}
"""


@pytest.fixture(scope="module")
def container_ok() -> None:
    report = ContainerTier().availability()
    if not report.ok:
        pytest.skip(f"container tier unavailable here: {report.reason}")


def _sandbox(cache: Path, policy: Policy | None = None,
             **tiers: Callable[[], Tier]) -> Sandbox:
    factories: dict[TierName, Callable[[], Tier]] = {TierName.WASM: lambda: WasmTier(cache)}
    factories.update({TierName(k): v for k, v in tiers.items()})
    return Sandbox(policy, tiers=factories)


@pytest.fixture
def sandbox_with(module_cache: Path) -> Iterator[Callable[..., Sandbox]]:
    made: list[Sandbox] = []

    def make(policy: Policy | None = None, **tiers: Callable[[], Tier]) -> Sandbox:
        sb = _sandbox(module_cache, policy, **tiers)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()


def test_python_needing_a_c_extension_escalates_to_the_container(
    sandbox_with: Callable[..., Sandbox], container_ok: None
) -> None:
    r = sandbox_with().run(Task.python(SQL_TASK, input={"n": 10}))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == {"sum": 45}
    assert (r.tier, r.escalated_from) == (TierName.CONTAINER, TierName.WASM)
    assert "lzma" in (r.escalation_reason or "")


def test_plain_python_stays_in_the_wasm_tier(sandbox_with: Callable[..., Sandbox]) -> None:
    r = sandbox_with().run(Task.python("import json\ndef main(i):\n    return json.dumps(i)\n",
                                       input=[1]))
    assert (r.status, r.tier, r.escalated_from) == (Status.COMPLETED, TierName.WASM, None)


def test_an_explicit_tier_is_never_changed(sandbox_with: Callable[..., Sandbox]) -> None:
    r = sandbox_with().run(Task.python(SQL_TASK, input={"n": 3}, tier=TierName.WASM))
    assert (r.tier, r.status) == (TierName.WASM, Status.FAILED)
    assert "lzma" in (r.reason or "")


def test_an_unavailable_tier_is_never_replaced_by_a_lighter_one(
    sandbox_with: Callable[..., Sandbox]
) -> None:
    policy = Policy(min_isolation=TierName.CONTAINER,
                    allowed_tiers=frozenset({TierName.WASM, TierName.CONTAINER}))
    sb = sandbox_with(policy, container=lambda: ContainerTier(runtime="no-such-runtime"))
    with pytest.raises(TierUnavailable, match="no-such-runtime"):
        sb.run(Task.python("def main(i):\n    return 1\n"))


def test_an_explicitly_requested_unavailable_tier_raises(
    sandbox_with: Callable[..., Sandbox]
) -> None:
    sb = sandbox_with(container=lambda: ContainerTier(runtime="no-such-runtime"))
    with pytest.raises(TierUnavailable):
        sb.run(Task.command(["true"], tier=TierName.CONTAINER))


def test_the_policy_can_forbid_escalation(sandbox_with: Callable[..., Sandbox]) -> None:
    sb = sandbox_with(Policy(allowed_tiers=frozenset({TierName.WASM})))
    with pytest.raises(TierUnavailable, match="lacks lzma") as info:
        sb.run(Task.python(SQL_TASK, input={"n": 3}))
    assert str(info.value).startswith("the policy allows only wasm")
    assert "allowed_tiers" in str(info.value) and "unavailable" not in str(info.value)
