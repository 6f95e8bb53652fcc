"""The tier contract: `prepare(plan) -> Prepared` does the one-off work, `run(prepared, ...)`
only runs; tiers leave streams and outputs in the workspace and the sandbox reads them once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox.lifecycle import Deadline
from wasmbox.models import Limits
from wasmbox.monitor import Monitor
from wasmbox.policy import apply
from wasmbox.tiers.base import Outcome
from wasmbox.tiers.wasm import WasmTier
from wasmbox.tiers.wasm.tier import WasmPrepared
from wasmbox.workspace import Workspace


def _run(tier: WasmTier, prepared: WasmPrepared, root: Path) -> tuple[Outcome, bytes]:
    plan = prepared.plan
    with Workspace(plan, root) as ws:
        outcome = tier.run(prepared, ws, Deadline(plan.timeout), Monitor(plan.policy.monitor))
        return outcome, ws.read_streams().stdout


def test_run_uses_what_prepare_made_and_never_reads_the_module_again(
        tmp_path: Path, module_cache: Path, guests: dict[str, Path]) -> None:
    module = tmp_path / "hello.wasm"
    shutil.copyfile(guests["hello"], module)
    plan = apply(Policy(), Task.wasm(module))
    with WasmTier(module_cache) as tier:
        prepared = tier.prepare(plan)
        assert prepared.plan is plan
        assert prepared.module is not None
        assert prepared.module.sha256 == hashlib.sha256(module.read_bytes()).hexdigest()
        module.unlink()  # a run that loaded (or hashed) the module again would fail now
        for _ in range(2):  # a Prepared serves any number of runs
            outcome, stdout = _run(tier, prepared, tmp_path)
            assert outcome.status is Status.COMPLETED and b"hello" in stdout


def test_prepared_is_frozen(module_cache: Path, guests: dict[str, Path]) -> None:
    with WasmTier(module_cache) as tier:
        prepared = tier.prepare(apply(Policy(), Task.wasm(guests["hello"])))
        with pytest.raises(dataclasses.FrozenInstanceError):
            prepared.plan = prepared.plan  # type: ignore[misc]


def test_a_tier_reports_no_streams_it_leaves_them_in_the_workspace(
        tmp_path: Path, module_cache: Path, guests: dict[str, Path]) -> None:
    assert not {"stdout", "stderr", "stdout_truncated"} & {
        f.name for f in dataclasses.fields(Outcome)}
    policy = Policy(limits=Limits(stdout_bytes=1000))
    task = Task.wasm(guests["stdout_flood"], resources={"timeout": 2})
    with WasmTier(module_cache) as tier:
        outcome, stdout = _run(tier, tier.prepare(apply(policy, task)), tmp_path)
    assert len(stdout) == 1000  # read back under the cap, by the reader, not by the tier
    with Sandbox(policy, tiers={"wasm": lambda: WasmTier(module_cache)}) as sb:
        r = sb.run(task)
    assert r.status is outcome.status
    assert r.stdout_truncated and len(r.stdout) == 1000 and r.metrics.stdout_bytes == 1000
