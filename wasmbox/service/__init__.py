"""The task execution service: wasmbox over HTTP (``wasmbox serve``).

`create_app` builds the ASGI app from a `ServiceConfig`; `serve` runs it under uvicorn;
`main` is the ``wasmbox serve`` command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wasmbox.errors import ConfigError
from wasmbox.service.api import create_app
from wasmbox.service.config import Backend, ServiceConfig, TokenConfig

__all__ = ["Backend", "ServiceConfig", "TokenConfig", "create_app", "main", "serve"]

# uvicorn's own grace for open connections (long-polls included) before the app shuts down.
_CONNECTION_GRACE_S = 5


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    config_path: str | Path | None = None,
    db: str | Path | None = None,
) -> None:
    """Run the service until SIGINT/SIGTERM; running tasks finish (within the grace period).

    Raises `ConfigError` for a bad configuration file.
    """
    import uvicorn

    config = ServiceConfig.from_toml(config_path) if config_path else ServiceConfig()
    if db is not None:
        settings = config.service.model_copy(update={"db": Path(db)})
        config = config.model_copy(update={"service": settings})
    if not config.tokens:
        raise ConfigError("the service config defines no [tokens.*]: nobody could use it")
    uvicorn.run(
        create_app(config), host=host, port=port, log_level="info",
        timeout_graceful_shutdown=_CONNECTION_GRACE_S,
    )


def main(argv: list[str] | None = None) -> int:
    """``wasmbox serve`` (``--host --port --config --db``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="wasmbox serve", description="Run the task service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--config", type=Path, help="service config TOML (tokens, policies)")
    parser.add_argument("--db", type=Path, help="task journal (SQLite); overrides the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        serve(args.host, args.port, args.config, args.db)
    except ConfigError as exc:
        print(f"wasmbox serve: {exc}", file=sys.stderr)
        return 3  # a host error, as in `wasmbox run` (2 is a usage error)
    return 0
