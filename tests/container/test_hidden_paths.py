"""Hidden paths: ``[filesystem] hidden`` masks parts of a mount.

Threat: a task reading a secret that sits inside a directory the policy mounts for it
(``/data`` shown, ``/data/secrets`` not), and a tier that cannot mask a subpath (WASI
preopens) silently showing it anyway instead of declining the plan.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox.errors import ConfigError, TierUnavailable
from wasmbox.models import FilesystemPolicy, TierName
from wasmbox.tiers.container import ContainerTier

LOOK = """
import os
def main(_):
    out = {"listing": sorted(os.listdir("/data")), "secrets": sorted(os.listdir("/data/secrets"))}
    for name in ("/data/secrets/key.txt", "/data/token.txt", "/data/public.txt"):
        try:
            with open(name) as f:
                out[name] = f.read()
        except OSError as exc:
            out[name] = exc.errno
    return out
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "secrets").mkdir(parents=True)
    (root / "secrets" / "key.txt").write_text("TOPSECRET")
    (root / "token.txt").write_text("TOKEN")
    (root / "public.txt").write_text("hello")
    for path in (tmp_path, root, root / "secrets"):
        path.chmod(0o755)
    for path in (root / "secrets" / "key.txt", root / "token.txt", root / "public.txt"):
        path.chmod(0o644)
    return root


def policy(data: Path) -> Policy:
    return Policy(filesystem=FilesystemPolicy(
        readonly={"/data": data}, hidden=("/data/secrets", "/data/token.txt")))


@pytest.mark.container
@pytest.mark.parametrize("runtime", [None, "gvisor"])
def test_hidden_paths_are_masked_in_containers(container_ready: None, data: Path,
                                               runtime: str | None) -> None:
    if runtime == "gvisor" and shutil.which("runsc") is None:
        pytest.skip("gVisor's runsc is not installed")
    with Sandbox(policy(data),
                 tiers={TierName.CONTAINER: lambda: ContainerTier(runtime=runtime)}) as sb:
        r = sb.run(Task.python(LOOK, tier="container"))
    assert r.status is Status.COMPLETED, r.stderr
    out = r.output
    assert isinstance(out, dict)
    assert out["secrets"] == []
    assert out["/data/secrets/key.txt"] == 2  # ENOENT: the directory reads empty
    assert out["/data/token.txt"] == ""  # the file reads empty
    assert out["/data/public.txt"] == "hello"
    assert "TOPSECRET" not in r.stdout + r.stderr + str(out)


def test_the_wasm_tier_declines_hidden_paths(data: Path) -> None:
    with Sandbox(policy(data)) as sb, pytest.raises(TierUnavailable,
                                                    match="cannot hide /data/secrets"):
        sb.run(Task.python("def main(_):\n    return 1\n", tier="wasm"))


@pytest.mark.container
def test_auto_escalates_past_wasm_for_hidden_paths(container_ready: None, data: Path) -> None:
    with Sandbox(policy(data), tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.python(LOOK))
    assert r.tier is TierName.CONTAINER and r.escalated_from is TierName.WASM
    assert "hide" in (r.escalation_reason or "")
    assert isinstance(r.output, dict) and r.output["secrets"] == []


@pytest.mark.parametrize(("hidden", "why"), [
    ("/elsewhere/x", "inside no mount"),
    ("/data", "inside no mount"),
    ("data/x", "absolute"),
    ("/data/../etc", "absolute"),
])
def test_a_hidden_path_outside_every_mount_is_a_config_error(hidden: str, why: str) -> None:
    toml = f'[filesystem]\nreadonly = {{ "/data" = "/srv" }}\nhidden = ["{hidden}"]\n'
    with pytest.raises(ConfigError, match=why):
        Policy.from_toml_text(toml)
