"""Fixtures of the container tier: availability, native guests, a sandbox that can reach them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guests.native.build import build_native
from wasmbox import Policy, Sandbox
from wasmbox.models import FilesystemPolicy, Limits, MonitorPolicy, TierName
from wasmbox.tiers.container import ContainerTier

GUESTS = "/opt/guests"  # where the native guests appear inside containers


@pytest.fixture(scope="session")
def container_ready() -> None:
    """Skip when no OCI runtime is installed; any other unavailability is a failure."""
    if shutil.which("crun") is None and shutil.which("runc") is None:
        pytest.skip("neither crun nor runc is installed")
    tier = ContainerTier()
    try:
        available = tier.availability()
    finally:
        tier.close()
    assert available.ok, available.reason


@pytest.fixture(scope="session")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of native guests, built once per session."""
    out = tmp_path_factory.mktemp("native")
    out.chmod(0o755)  # the guest (uid 65534) must be able to enter it
    try:
        build_native(out)
    except RuntimeError as exc:
        pytest.skip(f"cannot build native guests: {exc}")
    return out


def guest_policy(native: Path, monitor: MonitorPolicy | None = None,
                 **limits: object) -> Policy:
    """A policy that shows the native guests read-only at /opt/guests."""
    return Policy(
        limits=Limits(**limits),  # type: ignore[arg-type]
        filesystem=FilesystemPolicy(readonly={GUESTS: native}),
        monitor=monitor or MonitorPolicy(),
    )


@pytest.fixture(scope="module")
def csb(container_ready: None, native: Path) -> Iterator[Sandbox]:
    """A sandbox whose container tier is shared by a module's tests (cold runs)."""
    with Sandbox(guest_policy(native), tiers={TierName.CONTAINER: ContainerTier}) as sb:
        yield sb


@pytest.fixture
def make_csb(container_ready: None, native: Path) -> Iterator[Callable[..., Sandbox]]:
    """Build sandboxes with their own container tier (closed after the test)."""
    made: list[Sandbox] = []

    def make(tier: ContainerTier | None = None, monitor: MonitorPolicy | None = None,
             **limits: object) -> Sandbox:
        chosen = tier or ContainerTier()
        sb = Sandbox(guest_policy(native, monitor, **limits),
                     tiers={TierName.CONTAINER: lambda: chosen})
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()


@pytest.fixture
def gvisor(make_csb: Callable[..., Sandbox]) -> Sandbox:
    """A sandbox whose tasks can run under gVisor (skipped only when runsc is missing)."""
    tier = ContainerTier()
    available = tier.runtime_availability("gvisor")
    if not available.ok:
        tier.close()
        if "not installed" in available.reason:
            pytest.skip(available.reason)
        pytest.fail(available.reason)
    return make_csb(tier)
