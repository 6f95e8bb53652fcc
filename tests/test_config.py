"""One host-config object: built once from the environment, handed to the tiers; and
`Sandbox(tiers=...)` taking tier instances as well as factories."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from wasmbox import Sandbox, Status, Task
from wasmbox._config import HostConfig
from wasmbox.errors import ConfigError
from wasmbox.models import TierName
from wasmbox.tiers.vm.assets import cache_dir
from wasmbox.tiers.wasm import WasmTier
from wasmbox.tiers.wasm.cache import default_cache_dir
from wasmbox.workspace import PREFIX, workspace_root


def test_the_environment_is_read_in_one_place(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("WASMBOX_TMPDIR", str(tmp_path / "ws"))
    monkeypatch.setenv("WASMBOX_CACHE_DIR", str(tmp_path / "cache"))
    config = HostConfig.from_env()
    assert config == HostConfig(tmp_path / "ws", tmp_path / "cache", tmp_path / "cache" / "vm")
    # The module-level helpers other modules call agree with it.
    assert workspace_root() == config.workspace_root
    assert default_cache_dir() == config.module_cache
    assert cache_dir() == config.vm_cache


def test_the_caches_share_one_root_without_a_pinned_dir(tmp_path: Path) -> None:
    config = HostConfig.from_env({"XDG_CACHE_HOME": str(tmp_path), "WASMBOX_TMPDIR": "/w"})
    assert config.module_cache == tmp_path / "wasmbox" / "modules"
    assert config.vm_cache == tmp_path / "wasmbox" / "vm"  # it ignored XDG_CACHE_HOME before
    assert config.workspace_root == Path("/w")
    assert HostConfig.from_env({}).workspace_root in (Path("/dev/shm"),
                                                      Path(tempfile.gettempdir()))
    assert config.with_workspace_root(None) is config
    assert config.with_workspace_root(tmp_path).workspace_root == tmp_path


def test_the_sandbox_hands_its_config_to_the_tiers(tmp_path: Path, module_cache: Path,
                                                   guests: dict[str, Path]) -> None:
    config = HostConfig(tmp_path, module_cache, tmp_path / "vm")
    stale = tmp_path / f"{PREFIX}999999999-0-dead"  # no such pid: a dead owner's workspace
    stale.mkdir()
    with Sandbox(config=config) as sb:
        assert sb.config == config
        assert not stale.exists()  # the sandbox reclaimed its own root, not the env's
        tier = sb._tier(TierName.WASM)
        assert isinstance(tier, WasmTier) and tier._cache_dir == module_cache
        assert sb.run(Task.wasm(guests["hello"])).status is Status.COMPLETED
    assert [p for p in os.listdir(tmp_path) if p.startswith(PREFIX)] == []


def test_workspace_root_overrides_the_config(tmp_path: Path, module_cache: Path) -> None:
    config = HostConfig(tmp_path / "a", module_cache, tmp_path / "vm")
    with Sandbox(config=config, workspace_root=tmp_path / "b") as sb:
        assert sb.config.workspace_root == tmp_path / "b"
        assert sb.config.module_cache == module_cache


def test_a_tier_instance_is_used_and_left_open(module_cache: Path,
                                               guests: dict[str, Path]) -> None:
    with WasmTier(module_cache) as tier:
        with Sandbox(tiers={TierName.WASM: tier}) as sb:
            assert sb._tier(TierName.WASM) is tier
            assert sb.run(Task.wasm(guests["hello"])).status is Status.COMPLETED
        assert not tier.closed  # its owner closes it; another sandbox may share it
        with Sandbox(tiers={TierName.WASM: tier}) as again:
            assert again.run(Task.wasm(guests["hello"])).status is Status.COMPLETED
    assert tier.closed


def test_a_tier_factory_is_called_once_and_closed(module_cache: Path,
                                                  guests: dict[str, Path]) -> None:
    made: list[WasmTier] = []

    def factory() -> WasmTier:
        made.append(WasmTier(module_cache))
        return made[-1]

    with Sandbox(tiers={TierName.WASM: factory}) as sb:
        sb.run(Task.wasm(guests["hello"]))
        sb.run(Task.wasm(guests["hello"]))
    assert len(made) == 1 and made[0].closed
    with Sandbox(tiers={TierName.WASM: WasmTier}) as sb:  # a class is a factory too
        assert isinstance(sb._tier(TierName.WASM), WasmTier)


def test_processes_refuse_tier_instances(module_cache: Path,
                                         guests: dict[str, Path]) -> None:
    with WasmTier(module_cache) as tier, Sandbox(tiers={TierName.WASM: tier}) as sb, \
            pytest.raises(ConfigError, match="factories"):
        sb.map([Task.wasm(guests["hello"])], processes=1)
