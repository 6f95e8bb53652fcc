"""Internal: where the service runs a task: threads in this process, or a Dask cluster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from wasmbox.lifecycle import Closeable
from wasmbox.models import Policy, Result, Task
from wasmbox.sandbox import Sandbox
from wasmbox.service.config import Backend, ServiceConfig


class Runner(Protocol):
    """Runs one task under a named policy somewhere (threads here, or a cluster)."""

    def run(self, policy: str, task: Task) -> Result: ...

    def cancel(self, task_id: str) -> bool: ...

    def close(self) -> None: ...


class ThreadRunner(Closeable):
    """One warm `Sandbox` per policy in this process (the GIL is released while wasm runs)."""

    def __init__(
        self,
        policies: dict[str, Policy],
        sandbox_factory: Callable[[Policy], Sandbox] = Sandbox,
    ) -> None:
        self._sandboxes = {name: sandbox_factory(p) for name, p in policies.items()}

    def run(self, policy: str, task: Task) -> Result:
        return self._sandboxes[policy].run(task)

    def cancel(self, task_id: str) -> bool:
        """Stop the task's guest now (its result says CANCELLED); False if not running."""
        found = [sandbox.cancel(task_id) for sandbox in self._sandboxes.values()]
        return any(found)

    def _release(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()


class DaskRunner(Closeable):
    """Runs tasks on a Dask cluster through `wasmbox.distributed`."""

    def __init__(self, address: str, policies: dict[str, Policy]) -> None:
        from distributed import Client

        from wasmbox.distributed import DistributedSandbox

        self._client = Client(address, timeout=30)  # type: ignore[no-untyped-call]
        self._sandboxes = {n: DistributedSandbox(self._client, p) for n, p in policies.items()}

    def run(self, policy: str, task: Task) -> Result:
        return self._sandboxes[policy].run(task)

    def cancel(self, task_id: str) -> bool:
        """A task already on a worker runs to its own deadline (it is marked cancelled)."""
        return False

    def _release(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def make_runner(
    config: ServiceConfig, sandbox_factory: Callable[[Policy], Sandbox] = Sandbox
) -> Runner:
    """The runner the configuration asks for."""
    if config.service.backend is Backend.DASK:
        assert config.service.scheduler is not None  # checked by ServiceSettings
        return DaskRunner(config.service.scheduler, config.policies)
    return ThreadRunner(config.policies, sandbox_factory)
