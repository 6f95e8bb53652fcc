"""Internal: the worker side of `wasmbox.distributed`: warm sandboxes and chunk runs.

A `SandboxPlugin` on each worker keeps one warm `Sandbox` per policy; `_run_chunk` runs a
chunk's tasks in it; `_prepare_cluster` installs the plugin once per client.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from distributed import Client, WorkerPlugin, get_worker

from wasmbox._dask_wire import _Refused, _Shipped, origin
from wasmbox.errors import HostFailure, SandboxError
from wasmbox.models import Policy, Task
from wasmbox.sandbox import Sandbox

PLUGIN_NAME = "wasmbox-sandbox"


class SandboxPlugin(WorkerPlugin):
    """Keeps one warm `Sandbox` per policy on a worker; closes them on teardown."""

    # Another client registering it again (a second or restarted service) must not replace,
    # and so tear down, the sandboxes tasks are running in.
    idempotent = True

    def __init__(self) -> None:
        self._sandboxes: dict[str, Sandbox] = {}
        self._lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        self._sandboxes = {}
        self._lock = threading.Lock()

    def teardown(self, worker: Any) -> None:
        with self._lock:
            sandboxes, self._sandboxes = self._sandboxes, {}
        for sandbox in sandboxes.values():
            sandbox.close()

    def sandbox(self, policy: Policy) -> Sandbox:
        """The worker's sandbox for `policy`, created on first use."""
        key = policy.model_dump_json()
        with self._lock:
            found = self._sandboxes.get(key)
            if found is None:
                found = self._sandboxes[key] = Sandbox(policy)
        return found

    def __getstate__(self) -> dict[str, Any]:
        return {}  # sandboxes and locks stay on the worker that made them

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def _run_chunk(tasks: list[Task], policy: Policy
               ) -> tuple[list[_Shipped | _Refused], float, str]:
    """On a worker: run `tasks` in its warm sandbox, one after another; what each gave, the
    seconds the chunk took and this process's `origin` (its sandbox counted the runs in this
    process's metrics). A host error is retried once in place, then carried back."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, SandboxPlugin):
        raise HostFailure(f"worker plugin {PLUGIN_NAME!r} is not installed")
    sandbox = plugin.sandbox(policy)
    t0 = time.perf_counter()
    shipped: list[_Shipped | _Refused] = []
    for task in tasks:
        for attempt in (1, 2):
            try:
                shipped.append(_Shipped.of(sandbox.run(task)))
            except HostFailure as exc:
                if attempt == 1:
                    continue  # possibly transient: once more
                shipped.append(_Refused(type(exc), str(exc), dict(exc.__dict__)))
            except SandboxError as exc:
                shipped.append(_Refused(type(exc), str(exc), dict(exc.__dict__)))
            except Exception as exc:  # a host bug costs this task alone, not its chunk
                shipped.append(_Refused(HostFailure, f"{type(exc).__name__}: {str(exc)[:2000]}"))
            break
    return shipped, time.perf_counter() - t0, origin()


_PREPARED: weakref.WeakSet[Client] = weakref.WeakSet()
_PREPARED_LOCK = threading.Lock()


def _prepare_cluster(client: Client) -> None:
    with _PREPARED_LOCK:
        if client in _PREPARED:
            return
        client.register_plugin(SandboxPlugin(), name=PLUGIN_NAME)
        client.run_on_scheduler(_allow_one_failure)  # type: ignore[no-untyped-call]
        _PREPARED.add(client)


def _allow_one_failure(dask_scheduler: Any) -> None:
    # A task whose worker dies is re-run elsewhere once; a second death fails it for good.
    dask_scheduler.allowed_failures = min(dask_scheduler.allowed_failures, 1)
