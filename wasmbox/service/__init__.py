"""The task execution service: wasmbox over HTTP (``wasmbox serve``).

`create_app` builds the ASGI app from a `ServiceConfig`; `serve` runs it under uvicorn;
`main` is the ``wasmbox serve`` command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wasmbox.errors import ConfigError
from wasmbox.service.api import create_app
from wasmbox.service.config import Backend, ServiceConfig, TokenConfig

__all__ = ["Backend", "ServiceConfig", "TokenConfig", "create_app", "dev_config", "main", "serve"]

# uvicorn's own grace for open connections (long-polls included) before the app shuts down.
_CONNECTION_GRACE_S = 5
# The GIL switch interval while serving (Python's default: 5 ms). The journal's writer
# thread releases the GIL at every SQLite statement and, with the event loop and the
# workers busy, waited up to a whole interval to take it back each time: the journal's
# commits (a submission's, a claim's, a result's) were mostly that wait, not the fsync.
SWITCH_INTERVAL_S = 0.0005


@contextmanager
def _switch_interval(seconds: float) -> Iterator[None]:
    """The process's GIL switch interval set to `seconds` meanwhile."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (``localhost`` or a loopback address)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dev_config(db: Path) -> tuple[ServiceConfig, str]:
    """A try-it-out configuration: the default policy and one fresh random token ``dev``.

    Returns the configuration and the token's secret.
    """
    secret = secrets.token_urlsafe(32)
    config = ServiceConfig.from_dict(
        {"service": {"db": str(db)}, "tokens": {"dev": {"secret": secret}}}
    )
    return config, secret


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    config_path: str | Path | None = None,
    db: str | Path | None = None,
    *,
    dev: bool = False,
) -> None:
    """Run the service until SIGINT/SIGTERM; running tasks finish (within the grace period).

    Meanwhile the process's GIL switch interval is `SWITCH_INTERVAL_S` (restored after).

    With `dev`, ignore `config_path`: run the default policy with one generated token, printed
    once on stdout, journaling to `db` or a temporary file; only a loopback `host` is allowed.
    Raises `ConfigError` for a bad configuration file or a non-loopback host in dev mode.
    """
    import uvicorn

    if dev:
        if not is_loopback(host):
            raise ConfigError(f"--dev serves only on a loopback address, not {host!r}: "
                              "write a config with real tokens to listen on the network")
        with tempfile.TemporaryDirectory(prefix="wasmbox-dev-") as scratch:
            config, secret = dev_config(Path(db) if db is not None else Path(scratch) / "dev.db")
            print(f"wasmbox serve --dev: http://{host}:{port}/docs  token: {secret}", flush=True)
            with _switch_interval(SWITCH_INTERVAL_S):
                uvicorn.run(
                    create_app(config), host=host, port=port, log_level="info",
                    timeout_graceful_shutdown=_CONNECTION_GRACE_S,
                    access_log=config.service.access_log,
                )
        return
    config = ServiceConfig.from_toml(config_path) if config_path else ServiceConfig()
    if db is not None:
        settings = config.service.model_copy(update={"db": Path(db)})
        config = config.model_copy(update={"service": settings})
    if not config.tokens:
        raise ConfigError("the service config defines no [tokens.*]: nobody could use it")
    with _switch_interval(SWITCH_INTERVAL_S):
        uvicorn.run(
            create_app(config), host=host, port=port, log_level="info",
            timeout_graceful_shutdown=_CONNECTION_GRACE_S, access_log=config.service.access_log,
        )


def main(argv: list[str] | None = None) -> int:
    """``wasmbox serve`` (``--host --port --config --db --dev``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="wasmbox serve", description="Run the task service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--config", type=Path, help="service config TOML (tokens, policies)")
    parser.add_argument("--db", type=Path, help="task journal (SQLite); overrides the config")
    parser.add_argument(
        "--dev", action="store_true",
        help="try it out: the default policy and a generated token, printed once "
             "(loopback hosts only; the journal is temporary unless --db is given)",
    )
    args = parser.parse_args(argv)
    if args.dev and args.config is not None:
        parser.error("--dev makes its own configuration: leave out --config")
    if args.dev and not is_loopback(args.host):
        parser.error(f"--dev serves only on a loopback address, not {args.host!r}")
    logging.basicConfig(level=logging.INFO)
    try:
        serve(args.host, args.port, args.config, args.db, dev=args.dev)
    except ConfigError as exc:
        print(f"wasmbox serve: {exc}", file=sys.stderr)
        return 3  # a host error, as in `wasmbox run` (2 is a usage error)
    return 0
