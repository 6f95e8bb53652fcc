"""The Python API's edges: typed factories, typed errors, errors that cross process boundaries."""

from __future__ import annotations

import json
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmbox import (
    InputRejected,
    InvalidTask,
    ModuleRejected,
    Policy,
    Resources,
    Result,
    Sandbox,
    SandboxError,
    Status,
    Task,
)
from wasmbox._batch import Cancel
from wasmbox.errors import HostFailure, PolicyViolation, TierUnavailable
from wasmbox.models import FilesystemPolicy, Metrics
from wasmbox.policy import apply
from wasmbox.tiers.base import TierName
from wasmbox.tiers.wasm import WasmTier


def test_command_refuses_a_string_argv_and_suggests_the_split() -> None:
    with pytest.raises(InvalidTask, match=r"\['ls', '-la'\]"):
        Task.command("ls -la")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Task.wasm("m.wasm", tier="nowhere"),
        lambda: Task.python("x = 1", entry=3),  # type: ignore[arg-type]
        lambda: Task.wasm(b"\0asm", args="one string"),
        lambda: Task.command(["true"], env={"A": 1}),
        lambda: Task.wasm("m.wasm", sha256="not-hex"),
    ],
)
def test_bad_fields_raise_a_sandbox_error_not_a_pydantic_one(build: object) -> None:
    with pytest.raises(InvalidTask) as info:
        build()  # type: ignore[operator]
    assert isinstance(info.value, InputRejected) and isinstance(info.value, SandboxError)


def test_unknown_keywords_are_type_errors() -> None:
    with pytest.raises(TypeError):
        Task.wasm("m.wasm", resorces=Resources())  # type: ignore[call-arg]


def test_resources_accept_the_readme_strings() -> None:
    r = Resources(memory="64M", timeout="250ms")
    assert r.memory == 64 * 1024 * 1024 and r.timeout == pytest.approx(0.25)


@pytest.mark.parametrize(
    "error",
    [TierUnavailable("vm", "no kvm"), PolicyViolation("limits.memory", "too big"),
     InvalidTask("bad"), HostFailure("disk")],
)
def test_errors_survive_pickling(error: Exception) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)


def test_python_args_are_refused_not_dropped() -> None:
    with pytest.raises(InvalidTask, match="args"):
        Task.python("def main(i):\n    return i", args=["x"])
    assert Task.python("x = 1", args=()).args == ()


@pytest.mark.parametrize(
    ("text", "hint"),
    [('[limits]\nmemroy = "1M"\n', "limits.memroy: unknown key (did you mean 'memory'?)"),
     ('[output]\nmax_fles = 3\n', "did you mean 'max_files'?"),
     ('alowed_tiers = ["wasm"]\n', "did you mean 'allowed_tiers'?")],
)
def test_policy_typos_name_the_nearest_key(text: str, hint: str) -> None:
    from wasmbox import ConfigError, Policy

    with pytest.raises(ConfigError, match=re.escape(hint)):
        Policy.from_toml_text(text)


def _batch(guests: dict[str, Path]) -> list[Task]:
    good = Task.wasm(guests["hello"])
    refused = Task.wasm(guests["hello"], sha256="0" * 64)  # wrong pin: ModuleRejected
    return [good, refused, good, good]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_map_keeps_every_result_when_one_task_is_refused(
    sandbox: Sandbox, guests: dict[str, Path], concurrency: int
) -> None:
    out = sandbox.map(_batch(guests), concurrency=concurrency, return_exceptions=True)
    assert isinstance(out[1], ModuleRejected)
    assert [r.status for r in out if isinstance(r, Result)] == [Status.COMPLETED] * 3
    with pytest.raises(ModuleRejected):
        sandbox.map(_batch(guests), concurrency=concurrency)


def test_imap_is_lazy_and_bounded(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    taken = 0

    def endless() -> Iterator[Task]:
        nonlocal taken
        while True:
            taken += 1
            yield Task.wasm(guests["hello"])

    seen = []
    for index, result in sandbox.imap(endless(), concurrency=2):
        assert isinstance(result, Result) and result.ok
        seen.append(index)
        if len(seen) == 6:
            break
    assert seen == list(range(6))
    assert taken <= 6 + 4  # never more than 2 x concurrency ahead


def test_imap_unordered_yields_every_index(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    tasks = [Task.wasm(guests["hello"])] * 7
    indexes = sorted(i for i, _ in sandbox.imap(tasks, concurrency=2, ordered=False))
    assert indexes == list(range(7))


class _FirstWaits(Sandbox):
    """Runs the first task of a batch only after three others finished: the in-order window
    then drains completely before anything is yielded (the case that once ended a batch
    after its first window)."""

    def __init__(self, first_id: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_id, self._others = first_id, 0
        self._others_done, self._count_lock = threading.Event(), threading.Lock()

    def _run_registered(self, task: Task, token: Cancel) -> Result:
        if task.id == self._first_id:
            assert self._others_done.wait(30), "the other tasks never finished"
            return super()._run_registered(task, token)
        result = super()._run_registered(task, token)
        with self._count_lock:
            self._others += 1
            if self._others == 3:
                self._others_done.set()
        return result


def test_map_refills_after_an_out_of_order_window(
    module_cache: Path, guests: dict[str, Path]
) -> None:
    tasks = [Task.wasm(guests["json_transform"], input={"xs": [i, 1]}) for i in range(9)]
    sb = _FirstWaits(tasks[0].id, tiers={TierName.WASM: lambda: WasmTier(module_cache)})
    with sb:
        results = sb.map(tasks, concurrency=2)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert [r.output["sum"] for r in results] == [i + 1 for i in range(9)]  # type: ignore[index]


def test_clamping_is_reported_as_warnings(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["hello"], resources=Resources(timeout=60, memory="100G")))
    assert r.ok
    assert r.warnings == (
        "resources.memory=100GiB is above the policy's [limits] memory = 256MiB; clamped to it",
        "resources.timeout=60s is above the policy's [timeouts] run = 10s; clamped to it",
    )
    assert sandbox.run(Task.wasm(guests["hello"], resources=Resources(timeout=1))).warnings == ()


def test_the_cli_prints_clamping_warnings(
    guests: dict[str, Path], capsys: pytest.CaptureFixture[str], module_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wasmbox.cli import main

    monkeypatch.setenv("WASMBOX_CACHE_DIR", str(module_cache))
    assert main(["run", str(guests["hello"]), "--timeout", "99s"]) == 0
    assert "warning: resources.timeout=99s is above" in capsys.readouterr().err


def test_a_root_mount_in_the_wasm_tier_keeps_task_ours(
    make_sandbox: Callable[..., Sandbox], guests: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_text("from the root mount\n")
    (root / "task").mkdir()
    (root / "task" / "input.json").write_text('"shadowed"')
    policy = Policy(filesystem=FilesystemPolicy(readonly={"/": root}))
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["cat"], args=["/hello.txt", "/task/input.json"],
                             input={"real": 1}))
    assert r.ok, r.stderr
    head, _, rest = r.stdout.partition("\n")
    assert head == "from the root mount"
    assert json.loads(rest) == {"real": 1}  # /task is still ours, not the mount's


def test_a_root_mount_is_refused_for_containers_and_vms() -> None:
    policy = Policy(filesystem=FilesystemPolicy(readonly={"/": Path("/srv")}))
    for tier in ("container", "vm"):
        with pytest.raises(PolicyViolation, match="only the wasm tier"):
            apply(policy, Task.command(["true"], tier=tier))


@pytest.mark.parametrize("update", [{}, {"warnings": ("clamped",)},
                                    {"escalated_from": TierName.WASM,
                                     "escalation_reason": "why"}])
def test_results_built_on_the_hot_path_match_model_construct(update: dict[str, Any]) -> None:
    # `_results.trusted` skips pydantic's per-call field loop; every observable trait of a
    # `Result` (fields set, defaults, equality, repr, JSON, pickling) must stay the same.
    from wasmbox._results import trusted

    metrics = {"wall_s": 0.5, "fuel_consumed": 7, "extra": {"compile_s": 0.0}}
    values: dict[str, Any] = {"task_id": "t", "run_id": "r", "tier": TierName.WASM,
                              "status": Status.COMPLETED, "exit_code": 0, "output": {"a": [1]},
                              "files": {"result.json": b"{}"}, "stdout": "hi\n", **update}
    fast = trusted(Result, {**values, "metrics": trusted(Metrics, dict(metrics))})
    slow = Result.model_construct(**values, metrics=Metrics.model_construct(**metrics))
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.metrics.model_fields_set == slow.metrics.model_fields_set
    assert repr(fast) == repr(slow)
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_dump(exclude_unset=True) == slow.model_dump(exclude_unset=True)
    assert pickle.loads(pickle.dumps(fast)) == slow
    assert fast.events == () and fast.metrics.stdout_bytes == 0  # defaults filled in
