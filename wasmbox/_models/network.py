"""Internal: network endpoints and the `NetworkPolicy` that lists what a task may reach.

Public through `wasmbox` and `wasmbox.models`; import from there.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, model_validator

from wasmbox._models.units import Frozen

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?$", re.IGNORECASE
)
MAX_ENDPOINTS = 256


class Endpoint(Frozen):
    """One parsed network endpoint: an address or network (``ip``/``cidr``) or a DNS ``name``,
    with a ``port`` (None: the policy's ``allowed_ports`` apply)."""

    text: str  # as written
    network: str | None = None  # an IPv4/IPv6 network ("192.0.2.1/32" for one address)
    name: str | None = None  # a DNS name (always with a port)
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``"host:port"``, ``"ip"``, ``"cidr"``, ``"name:port"`` or ``"[v6]:port"``;
        raises ValueError saying what is wrong."""
        if not isinstance(text, str) or not text or len(text) > 300 or text != text.strip():
            raise ValueError(f"endpoint {text!r} is not a host, ip, cidr or name:port")
        host, port = text, None
        if text.startswith("["):
            end = text.find("]")
            rest = text[end + 1:] if end > 0 else "?"
            if end < 0 or (rest and not rest.startswith(":")):
                raise ValueError(f"endpoint {text!r}: an IPv6 address in brackets is "
                                 "'[addr]' or '[addr]:port'")
            host, port = text[1:end], _port(rest[1:], text) if rest else None
            ipaddress.IPv6Address(_v6(host, text))
        elif text.count(":") == 1:
            host, _, raw = text.partition(":")
            port = _port(raw, text)
        if "/" in host:
            try:
                net = ipaddress.ip_network(host, strict=True)
            except ValueError as exc:
                raise ValueError(f"endpoint {text!r}: not a network ({exc})") from None
            return cls(text=text, network=str(net), port=port)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            if ":" in host or not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
                raise ValueError(f"endpoint {text!r} is not an ip, a cidr or a DNS name") from None
            if port is None:
                raise ValueError(f"endpoint {text!r} names a host without a port "
                                 "(write 'name:port')") from None
            return cls(text=text, name=host.lower().rstrip("."), port=port)
        return cls(text=text, network=str(ipaddress.ip_network(addr)), port=port)

    def covers(self, other: Endpoint, ports: tuple[int, ...]) -> bool:
        """Whether every address and port `other` names is inside this endpoint (with
        `ports` for a portless one; none listed means every port)."""
        if self.port is not None:
            port_ok = other.port == self.port
        else:  # this endpoint takes the policy's allowed_ports (none listed: every port)
            port_ok = not ports or other.port is None or other.port in ports
        if not port_ok:
            return False
        if self.name is not None or other.name is not None:
            return self.name == other.name
        assert self.network is not None and other.network is not None
        mine, theirs = ipaddress.ip_network(self.network), ipaddress.ip_network(other.network)
        return mine.version == theirs.version and theirs.subnet_of(mine)  # type: ignore[arg-type]


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"endpoint {text!r}: the port must be 1..65535")
    return int(raw)


def _v6(host: str, text: str) -> str:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"endpoint {text!r}: {host!r} is not an IPv6 address") from None
    return host


def parse_endpoints(values: Any) -> Any:
    """Endpoint strings to `Endpoint`s (validators); other values pass through."""
    if isinstance(values, str):
        raise ValueError("allowed_endpoints must be a list of strings")
    if isinstance(values, list | tuple) and len(values) > MAX_ENDPOINTS:
        raise ValueError(f"at most {MAX_ENDPOINTS} endpoints")
    if isinstance(values, list | tuple):
        return tuple(Endpoint.parse(v) if isinstance(v, str) else v for v in values)
    return values


Port = Annotated[int, Field(gt=0, lt=65536)]


class NetworkPolicy(Frozen):
    """Network access (container tier). Off by default; the wasm tier never has a network.

    ``outbound`` is the switch; ``allowed_endpoints`` is exactly what a task may reach
    (``"host:port"``, ``"ip"``, ``"cidr"``, ``"name:port"``, ``"[v6]:port"``);
    ``allowed_ports`` applies to endpoints that name no port (none listed: every port);
    ``dns`` lets the task resolve names through one ``resolver`` (``"ip"`` or ``"ip:port"``,
    default the host's first nameserver). ``enabled`` is the deprecated name of ``outbound``.
    """

    outbound: bool = False
    allowed_endpoints: Annotated[tuple[Endpoint, ...], BeforeValidator(parse_endpoints)] = ()
    allowed_ports: tuple[Port, ...] = ()
    dns: bool = False
    resolver: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _deprecated_enabled(cls, data: Any) -> Any:
        # `[network] enabled` predates `outbound`; it means the same switch.
        if isinstance(data, dict) and "enabled" in data:
            data = dict(data)
            enabled = data.pop("enabled")
            if "outbound" in data and data["outbound"] != enabled:
                raise ValueError("enabled (deprecated) and outbound disagree; keep outbound")
            data["outbound"] = enabled
        return data

    @model_validator(mode="after")
    def _resolver_is_an_address(self) -> Self:
        if self.resolver is not None:
            ep = Endpoint.parse(self.resolver)
            if ep.network is None or "/" in self.resolver or (
                    ipaddress.ip_network(ep.network).num_addresses != 1):
                raise ValueError(f"resolver {self.resolver!r} must be 'ip' or 'ip:port'")
        return self

    @property
    def enabled(self) -> bool:
        """Deprecated name of `outbound`."""
        return self.outbound
