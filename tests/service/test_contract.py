"""API contract: generated requests against our own OpenAPI spec never break it or the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import BaseSchema, Case
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from tests.service._support import ALICE, ServiceProcess, auth, write_config


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("contract")
    process = ServiceProcess(write_config(directory), directory / "service.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api_schema(service: ServiceProcess) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_openapi_spec(case: Case, service: ServiceProcess) -> None:
    excluded: list[Any] = []
    if case.operation.path == "/v1/tasks/upload":
        # Its `input` is JSON text in a form field (OpenAPI cannot say a string must be JSON),
        # and a repeated form field is read as its last value, not rejected as an array.
        excluded += [positive_data_acceptance, negative_data_rejection]
    elif case.operation.path == "/v1/tasks":
        # OpenAPI cannot say "a valid WebAssembly module": bytes that are not one are 400 at
        # submission (tests/adversarial/test_service_input.py), whatever the schema allows.
        excluded.append(positive_data_acceptance)
    elif case.operation.path.startswith("/v1/tasks/{task_id}/files/"):
        # Nor "a relative path without '.', '..', '\\' or NUL": such names are 400
        # (tests/service/test_security.py::test_path_tricks_in_file_names_get_400).
        excluded.append(positive_data_acceptance)
    case.call_and_validate(base_url=service.url, headers=auth(ALICE), excluded_checks=excluded)


def test_spec_declares_bearer_auth(service: ServiceProcess, tmp_path: Path) -> None:
    import httpx

    spec = httpx.get(f"{service.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
