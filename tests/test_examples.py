"""The shipped example configuration files load as pasted (a broken example is a bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasmbox import Policy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted((EXAMPLES / "policies").glob("*.toml")), ids=str)
def test_example_policies_load(path: Path) -> None:
    policy = Policy.from_toml(path)
    assert policy.name == path.stem


def test_example_service_config_loads() -> None:
    pytest.importorskip("fastapi")
    from wasmbox.service.config import ServiceConfig

    config = ServiceConfig.from_toml(EXAMPLES / "service.toml")
    assert set(config.policies) == {"default", "strict"}
    assert config.policies["strict"].allowed_tiers == {"wasm"}
