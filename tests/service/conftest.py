"""Fixtures for the task service: configs, an in-process client, built guests as base64."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service._support import config_data
from wasmbox.service import ServiceConfig, create_app


@pytest.fixture(scope="session", autouse=True)
def shared_module_cache(module_cache: Path) -> Iterator[Path]:
    """One module cache for the session, also seen by service and Dask worker subprocesses."""
    previous = os.environ.get("WASMBOX_CACHE_DIR")
    os.environ["WASMBOX_CACHE_DIR"] = str(module_cache)
    try:
        yield module_cache
    finally:
        if previous is None:
            os.environ.pop("WASMBOX_CACHE_DIR", None)
        else:
            os.environ["WASMBOX_CACHE_DIR"] = previous


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Start an in-process service (its lifespan included) with `config_data` overrides."""
    clients: list[TestClient] = []

    def make(**service: Any) -> TestClient:
        config = ServiceConfig.from_dict(config_data(tmp_path / "tasks.db", **service))
        client = TestClient(create_app(config))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """A running service with two worker threads."""
    return make_client()


@pytest.fixture
def idle_client(make_client: Callable[..., TestClient]) -> TestClient:
    """A service with no workers: every accepted task stays queued."""
    return make_client(workers=0)


@pytest.fixture(scope="session")
def wasm_b64(guests: dict[str, Path]) -> dict[str, str]:
    """Every built guest, base64-encoded for the JSON API."""
    return {name: base64.b64encode(path.read_bytes()).decode() for name, path in guests.items()}
