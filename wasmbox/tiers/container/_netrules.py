"""Internal: what a task's network is, worked out from its `NetworkPlan` before any of it is
made: whether this tier can enforce the plan, pasta's command line (which host loopback
ports it forwards) and the nftables egress filter. Pure functions but one: the host resolves
the allowed ``name:port`` endpoints once, when the filter is built.
"""

from __future__ import annotations

import ipaddress
import socket

from wasmbox.errors import HostFailure
from wasmbox.models import Endpoint
from wasmbox.policy import NetworkPlan

_LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


def unsupported(plan: NetworkPlan) -> str | None:
    """Why this tier cannot enforce `plan` exactly, or None."""
    for ep in plan.endpoints:
        if ep.network is None:
            continue
        net = ipaddress.ip_network(ep.network)
        if net.is_loopback and net not in _LOOPBACK:
            return (f"endpoint {ep.text}: only 127.0.0.1 and ::1 of the host's loopback can "
                    "be reached")
        if net in _LOOPBACK and ep.port is None and not plan.allowed_ports:
            return (f"endpoint {ep.text}: a host loopback endpoint needs a port (or "
                    "[network] allowed_ports)")
    if plan.resolver is not None:
        ip, port = plan.resolver
        if not ipaddress.ip_address(ip).is_loopback and port != 53:
            return f"resolver {ip}:{port}: a resolver off the host's loopback must use port 53"
    return None


def pasta_argv(plan: NetworkPlan, netns: str, pid_file: str) -> list[str]:
    """pasta's command line: no inbound ports, no gateway mapping, loopback ports only when
    an allowed endpoint names them."""
    tcp, udp = _loopback_ports(plan)
    if plan.resolver is not None and ipaddress.ip_address(plan.resolver[0]).is_loopback:
        udp.add((53, plan.resolver[1]))
        tcp.add((53, plan.resolver[1]))
    return [
        "pasta", "--foreground", "--quiet", "--runas", "0:0", "--config-net",
        "--netns", netns, "--no-netns-quit", "--pid", pid_file, "--no-map-gw",
        "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
        "-t", "none", "-u", "none", "-T", _spec(tcp), "-U", _spec(udp),
    ]


def _spec(ports: set[tuple[int, int]]) -> str:
    return ",".join(f"{a}:{b}" if a != b else str(a) for a, b in sorted(ports)) or "none"


def _loopback_ports(plan: NetworkPlan) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    ports: set[tuple[int, int]] = set()
    for ep in plan.endpoints:
        if ep.network is not None and ipaddress.ip_network(ep.network) in _LOOPBACK:
            for port in ([ep.port] if ep.port is not None else plan.allowed_ports):
                ports.add((port, port))
    return ports, set(ports)


def loopback_of(ip: str) -> str:
    return "::1" if ipaddress.ip_address(ip).version == 6 else "127.0.0.1"


def nft_rules(plan: NetworkPlan, resolved: dict[str, list[str]]) -> str:
    """The egress filter: exactly the allowed endpoints (and DNS), everything else rejected."""
    lines = [
        "table inet wasmbox {",
        "  chain out {",
        "    type filter hook output priority 0; policy drop;",
        '    oifname "lo" accept',  # the task's own sockets and pasta's loopback forwards
        "    ct state established,related accept",
    ]
    for ep in plan.endpoints:
        addrs = resolved.get(ep.name, []) if ep.name is not None else [str(ep.network)]
        ports = [ep.port] if ep.port is not None else list(plan.allowed_ports)
        for addr in addrs:
            family = "ip6" if ipaddress.ip_network(addr).version == 6 else "ip"
            if ipaddress.ip_network(addr) in _LOOPBACK:
                continue  # reached through lo and pasta's forwards, never the tap
            if ports:
                port_set = "{ " + ", ".join(str(p) for p in sorted(set(ports))) + " }"
                lines += [f"    {family} daddr {addr} {proto} dport {port_set} accept"
                          for proto in ("tcp", "udp")]
            else:
                lines.append(f"    {family} daddr {addr} accept")
    if plan.resolver is not None and not ipaddress.ip_address(plan.resolver[0]).is_loopback:
        ip, port = plan.resolver
        family = "ip6" if ipaddress.ip_address(ip).version == 6 else "ip"
        lines += [f"    {family} daddr {ip} {proto} dport {port} accept"
                  for proto in ("udp", "tcp")]
    lines += [
        "    meta l4proto tcp reject with tcp reset",
        "    reject with icmpx type admin-prohibited",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def resolve_names(endpoints: tuple[Endpoint, ...]) -> dict[str, list[str]]:
    """Addresses of the policy's ``name:port`` endpoints, resolved by the host now."""
    found: dict[str, list[str]] = {}
    for ep in endpoints:
        if ep.name is None or ep.name in found:
            continue
        try:
            infos = socket.getaddrinfo(ep.name, ep.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise HostFailure(f"cannot resolve allowed endpoint {ep.text}: {exc}") from exc
        found[ep.name] = sorted({str(info[4][0]) for info in infos})
    return found
