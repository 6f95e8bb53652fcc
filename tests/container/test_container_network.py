"""Network access policy on the container tier.

Threat: a task with network access reaching more than the policy lists (another port, another
address such as the gateway pasta could map to the host, a resolver it was not given), a task
without it reaching anything at all, and a networked run leaving its namespace or pasta
behind. Every server here is one the test starts on 127.0.0.1; nothing else is contacted.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox.errors import PolicyViolation
from wasmbox.models import NetworkPolicy, Resources, TierName
from wasmbox.tiers.container import ContainerTier, network

pytestmark = pytest.mark.container

CONNECT = """
import socket, sys, time
def main(i):
    t = time.monotonic()
    try:
        s = socket.create_connection((i["host"], i["port"]), timeout=5)
        s.sendall(b"ping")
        data = s.recv(16)
        s.close()
        return {"ok": data.decode(), "s": time.monotonic() - t}
    except OSError as exc:
        return {"error": type(exc).__name__, "errno": exc.errno, "s": time.monotonic() - t}
"""

RESOLVE = """
import socket
def main(i):
    try:
        return {"addrs": sorted({a[4][0] for a in socket.getaddrinfo(i, 80, socket.AF_INET)})}
    except OSError as exc:
        return {"error": str(exc)}
"""


class Server:
    """A TCP server on 127.0.0.1 answering each connection's first bytes with b"pong"."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(16)
                    conn.sendall(b"pong")
                except OSError:
                    pass


class Resolver:
    """A tiny UDP DNS responder on 127.0.0.1: every A question gets 192.0.2.77."""

    ANSWER = "192.0.2.77"

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            if len(query) < 12:
                continue
            self.queries += 1
            end = query.index(b"\0", 12) + 5  # the question: name, type, class
            qtype = struct.unpack("!H", query[end - 4:end - 2])[0]
            header = query[:2] + b"\x81\x80" + query[4:6] + struct.pack(
                "!HHH", 1 if qtype == 1 else 0, 0, 0)
            answer = b""
            if qtype == 1:
                answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(
                    self.ANSWER)
            self.sock.sendto(header + query[12:end] + answer, peer)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.sock.close()


@pytest.fixture(scope="module")
def other() -> Iterator[Server]:
    s = Server()
    yield s
    s.sock.close()


@pytest.fixture(scope="module")
def resolver() -> Iterator[Resolver]:
    r = Resolver()
    yield r
    r.sock.close()


@pytest.fixture(scope="module")
def net_ready(container_ready: None) -> None:
    if shutil.which("pasta") is None or shutil.which("nft") is None:
        pytest.skip("pasta (passt) or nft (nftables) is not installed")


def sandbox(**network: object) -> Sandbox:
    policy = Policy(network=NetworkPolicy(outbound=True, **network))  # type: ignore[arg-type]
    return Sandbox(policy, tiers={TierName.CONTAINER: ContainerTier})


def connect(sb: Sandbox, host: str, port: int, network: object = True) -> dict[str, object]:
    r = sb.run(Task.python(CONNECT, input={"host": host, "port": port}, tier="container",
                           network=network, resources=Resources(timeout=20)))  # type: ignore[arg-type]
    assert r.status is Status.COMPLETED, (r.status, r.reason, r.stderr)
    assert isinstance(r.output, dict)
    return r.output


def gateway_of_namespace(sb: Sandbox) -> str:
    r = sb.run(Task.command(["/bin/sh", "-c", "ip -4 route show default 2>/dev/null || "
                             "cat /proc/net/route"], network=True))
    assert r.status is Status.COMPLETED, r.stderr
    return r.stdout


def test_allowed_loopback_endpoint_is_reachable_at_the_same_address(
        net_ready: None, server: Server) -> None:
    with sandbox(allowed_endpoints=[f"127.0.0.1:{server.port}"]) as sb:
        before = server.accepted
        out = connect(sb, "127.0.0.1", server.port)
        assert out.get("ok") == "pong", out
        assert server.accepted == before + 1


def test_another_port_is_refused(net_ready: None, server: Server, other: Server) -> None:
    with sandbox(allowed_endpoints=[f"127.0.0.1:{server.port}"]) as sb:
        out = connect(sb, "127.0.0.1", other.port)
    assert out.get("error") == "ConnectionRefusedError", out
    assert other.accepted == 0


def _gateway(route_table: str) -> str:
    """The default gateway in `/proc/net/route` (hex, little-endian) or `ip route` output."""
    for line in route_table.splitlines():
        fields = line.split()
        if fields[:2] == ["default", "via"]:
            return fields[2]
        if len(fields) > 2 and fields[1] == "00000000" and fields[2] != "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    raise AssertionError(f"no default route in {route_table!r}")


def test_another_address_is_refused_quickly(net_ready: None, server: Server) -> None:
    # The namespace's gateway is the address pasta would map to the host's loopback: with
    # the filter (and --no-map-gw) gone, this would reach the test's own server.
    with sandbox(allowed_endpoints=[f"127.0.0.1:{server.port}"]) as sb:
        gateway = _gateway(gateway_of_namespace(sb))
        before = server.accepted
        out = connect(sb, gateway, server.port)
    assert out.get("error") == "ConnectionRefusedError", out
    assert server.accepted == before


def test_a_task_may_ask_for_a_subset_but_not_more(net_ready: None, server: Server,
                                                  other: Server) -> None:
    allowed = [f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}"]
    with sandbox(allowed_endpoints=allowed) as sb:
        out = connect(sb, "127.0.0.1", other.port, network=[f"127.0.0.1:{server.port}"])
        assert out.get("error") == "ConnectionRefusedError", out
        with pytest.raises(PolicyViolation, match=r"127\.0\.0\.1:1\b"):
            sb.run(Task.command(["true"], network=["127.0.0.1:1"]))


def test_no_network_by_default(net_ready: None, server: Server) -> None:
    with Sandbox(Policy(), tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.python(CONNECT, input={"host": "127.0.0.1", "port": server.port},
                               tier="container"))
        with pytest.raises(PolicyViolation, match="network"):
            sb.run(Task.command(["true"], network=True))
    assert r.output == {"error": "ConnectionRefusedError", "errno": 111,
                        "s": pytest.approx(r.output["s"])}  # type: ignore[index]
    assert r.metrics.net_rx_bytes is None


def test_dns_off_resolves_nothing(net_ready: None, resolver: Resolver) -> None:
    with sandbox(dns=False, resolver=f"127.0.0.1:{resolver.port}") as sb:
        before = resolver.queries
        r = sb.run(Task.python(RESOLVE, input="db.example.test", tier="container",
                               network=True))
    assert r.status is Status.COMPLETED, r.stderr
    assert "error" in r.output, r.output  # type: ignore[operator]
    assert resolver.queries == before


def test_dns_on_goes_to_the_one_resolver(net_ready: None, resolver: Resolver) -> None:
    with sandbox(dns=True, resolver=f"127.0.0.1:{resolver.port}") as sb:
        before = resolver.queries
        r = sb.run(Task.python(RESOLVE, input="db.example.test", tier="container",
                               network=True))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == {"addrs": [Resolver.ANSWER]}
    assert resolver.queries > before


def test_counters_count_the_traffic(net_ready: None, server: Server) -> None:
    from prometheus_client import REGISTRY

    def exported(direction: str) -> float:
        return REGISTRY.get_sample_value(
            "wasmbox_net_bytes_total", {"tier": "container", "direction": direction}) or 0.0

    before = exported("rx"), exported("tx")
    with sandbox(allowed_endpoints=[f"127.0.0.1:{server.port}"]) as sb:
        r = sb.run(Task.python(CONNECT, input={"host": "127.0.0.1", "port": server.port},
                               tier="container", network=True))
    assert r.output["ok"] == "pong"  # type: ignore[index]
    assert r.metrics.net_rx_bytes is not None and r.metrics.net_rx_bytes > 0
    assert r.metrics.net_tx_bytes is not None and r.metrics.net_tx_bytes > 0
    assert exported("rx") == before[0] + r.metrics.net_rx_bytes
    assert exported("tx") == before[1] + r.metrics.net_tx_bytes


def test_nothing_is_left_behind(net_ready: None, server: Server) -> None:
    probe = ContainerTier()
    try:
        with sandbox(allowed_endpoints=[f"127.0.0.1:{server.port}"]) as sb:
            done = sb.run(Task.command(["true"], network=True))
            late = sb.run(Task.command(["sleep", "10"], network=True,
                                       resources=Resources(timeout=0.5)))
            failed = sb.run(Task.command(["/no/such/program"], network=True))
            # While the sandbox is open its root skeleton stays; no namespace, no pasta.
            assert [x for x in probe.leftovers(os.getpid())
                    if x.startswith(("netns", "pasta", "state", "cgroup"))] == []
        assert (done.status, late.status, failed.status) == (
            Status.COMPLETED, Status.TIMEOUT, Status.FAILED)
        assert probe.leftovers(os.getpid()) == []
    finally:
        probe.close()


def test_the_wasm_tier_declines_network_plans(net_ready: None, server: Server) -> None:
    policy = Policy(network=NetworkPolicy(outbound=True,
                                          allowed_endpoints=[f"127.0.0.1:{server.port}"]))
    with Sandbox(policy, tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.python(CONNECT, input={"host": "127.0.0.1", "port": server.port},
                               network=True))
    assert r.tier is TierName.CONTAINER and r.escalated_from is TierName.WASM
    assert "no network" in (r.escalation_reason or "")
    assert r.output["ok"] == "pong"  # type: ignore[index]


CRASHING_OWNER = """
import os, sys
from wasmbox.models import Endpoint
from wasmbox.policy import NetworkPlan
from wasmbox.tiers.container.network import TaskNetwork
net = TaskNetwork(NetworkPlan((Endpoint.parse("127.0.0.1:9"),), (), None), sys.argv[1])
print(net.name, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_dead_owners_pasta_is_swept(net_ready: None, tmp_path: Path) -> None:
    # The owner dies without cleaning up: its pasta outlives it until the next tier's sweep.
    proc = subprocess.run([sys.executable, "-c", CRASHING_OWNER, str(tmp_path / "pasta.log")],
                          capture_output=True, text=True, timeout=60, check=False)
    name = proc.stdout.strip()
    assert name.startswith("wbx-"), proc.stderr
    orphans = [pid for pid, cmd in network.pasta_processes() if name in cmd]
    assert orphans, "the crashed owner's pasta should still run before the sweep"
    tier = ContainerTier()
    try:
        assert tier.availability().ok  # the first use of a runtime sweeps dead owners' traces
        gone = time.monotonic() + 10
        while any(name in cmd for _, cmd in network.pasta_processes()):
            assert time.monotonic() < gone, "pasta of a dead owner was not swept"
            time.sleep(0.05)
        assert not any(name in path for path in network.bound_namespaces())
    finally:
        tier.close()
