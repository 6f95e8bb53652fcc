"""Helpers shared by the service tests: the test config, auth headers, waiting for results."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from distributed import LocalCluster

@contextlib.contextmanager
def local_cluster(n_workers: int = 2) -> Iterator[LocalCluster]:
    """A loopback LocalCluster of spawned worker processes (as wasmtime requires), one thread
    each, with wasmbox's Dask settings."""
    import dask
    from distributed import LocalCluster

    from wasmbox.distributed import cluster_config

    with dask.config.set(cluster_config()), LocalCluster(
        n_workers=n_workers, processes=True, threads_per_worker=1, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster


ALICE, BOB, CAROL, DAVE = "alice-secret", "bob-secret", "carol-secret", "dave-secret"


def config_data(db: Path, **service: Any) -> dict[str, Any]:
    """A service config: alice may use two policies, bob has a concurrency quota of 2,
    carol a tiny CPU budget, dave a budget of 2.5 s (room for two 1 s reservations)."""
    return {
        # The thread runner: these many small services would each spawn runner processes
        # (the default); tests/service/test_process_runner.py and test_placement.py run those.
        "service": {"db": str(db), "workers": 2, "max_body_bytes": "2MiB", "max_wait": 20,
                    "shutdown_grace": 10, "runner": "threads", **service},
        "policies": {
            "default": {"timeouts": {"run": "5s"}},
            "strict": {"limits": {"memory": "16MiB"}, "allowed_tiers": ["wasm"]},
        },
        "tokens": {
            "alice": {"secret": ALICE, "policies": ["default", "strict"], "max_concurrent": 50},
            "bob": {"secret": BOB, "max_concurrent": 2},
            "carol": {"secret": CAROL, "cpu_seconds": 0.05, "window": 600},
            "dave": {"secret": DAVE, "cpu_seconds": 2.5, "window": 600, "max_concurrent": 10},
        },
    }


def auth(secret: str) -> dict[str, str]:
    """The Authorization header for a token secret."""
    return {"Authorization": f"Bearer {secret}"}


def wait_final(client: Any, task_id: str, secret: str = ALICE, rounds: int = 30) -> dict[str, Any]:
    """Long-poll until the task is final (bounded), return its view."""
    for _ in range(rounds):
        view: dict[str, Any] = client.get(
            f"/v1/tasks/{task_id}", params={"wait": 10}, headers=auth(secret)
        ).json()
        if view["final"]:
            return view
    raise AssertionError(f"task {task_id} did not finish: {view}")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(directory: Path, **service: Any) -> Path:
    """The test config as a TOML file in `directory` (journal beside it)."""
    path = directory / "service.toml"
    path.write_text(_toml(config_data(directory / "tasks.db", **service)), encoding="utf-8")
    return path


class ServiceProcess:
    """``python -m wasmbox.service`` on a free loopback port, as a subprocess."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wasmbox.service", "--host", "127.0.0.1",
             "--port", str(self.port), "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        for _ in range(300):
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("service did not become ready")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait (graceful shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(lines) + "\n"
