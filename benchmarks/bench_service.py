"""Service throughput and latency over HTTP: WASI hello tasks from N concurrent clients.

A bounded asyncio load generator against a service it starts itself on 127.0.0.1 (``python
-m wasmbox.service``, a fresh journal). For each concurrency level (8, 16, 32) and each form
-- ``POST /v1/tasks`` then long-poll ``GET /v1/tasks/{id}?wait=``, and submit-and-wait ``POST
/v1/tasks?wait=`` -- it reports tasks/s and the submit-to-result latency of every task
(p50/p95/p99), and the CPU each task cost the service and the load generator. The module
goes by ``module_sha256`` (sent once as base64 first); one more row sends the 169 KB module
as base64 in every request, one more drives the lowest level with httpx, and (when the
service runs its default runner) two more run the thread runner at the lowest level.

The load generator shares the machine's cores with the service, so its own CPU caps what can
be measured: the rows use a minimal keep-alive HTTP/1.1 client by default (``--client raw``,
~0.4 ms a task here, against 2-4 ms for httpx.AsyncClient), and every row also states the
service-side ceiling (cores / the service's CPU per task).

    python3 benchmarks/bench_service.py [--quick] [--tasks 400] [--workers N] [--client raw]
    python3 -m benchmarks --tiers service

Latency includes the journal's durable commits (a 202 is answered only after its row is
committed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib.util
import json
import json as _json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import CORES, NoProgress, Progress, Row, missing  # noqa: E402
from benchmarks.report import print_rows, service_lines  # noqa: E402
from guests.build import build  # noqa: E402

STEPS = 5
HOST = "127.0.0.1"  # the only address the benchmark's service listens on
SECRET = "bench-secret"
LEVELS = (8, 16, 32)
FORMS = {"poll": "submit + long-poll", "wait": "submit-and-wait (?wait=)"}
GENERATORS = {"raw": "raw (one plain keep-alive HTTP/1.1 connection a client, asyncio)",
              "httpx": "httpx.AsyncClient (asyncio)"}
REQUEST_TIMEOUT_S = 60.0  # one request; a whole cell is bounded by its task count times this


def measure(quick: bool, progress: Progress, workers: int | None = None,
            tasks: int | None = None, by: str = "sha256", client: str = "raw",
            runner: str | None = None, runner_processes: int = 0) -> list[Row]:
    """One row per (form, concurrency level), plus base64-in-every-request and the other
    client (httpx when the rows use raw) at the lowest.

    `by`: how the cells name the module, ``sha256`` or ``b64`` (every request carries it;
    the only way before module_sha256 existed, for before/after runs). `client`: the load
    generator's HTTP client, ``httpx`` or ``raw`` (one plain keep-alive HTTP/1.1 connection
    per simulated client: a fraction of httpx's CPU, which shares the cores with the service).
    `workers`, `runner`, `runner_processes`: the service's settings (None, None, 0: its
    defaults).
    """
    progress.show("service: starting the service")
    absent = [name for name in ("httpx", "fastapi", "uvicorn")
              if importlib.util.find_spec(name) is None]
    if absent:
        row = missing("service", "service over HTTP", None,
                      f"not installed: {', '.join(absent)} (pip install 'wasmbox[service]')")
        row.group = "service"
        return [row]
    workers_used, worker_origin = service_workers(workers)
    hello = build(ROOT / "build" / "guests", ["hello"])["hello"].read_bytes()
    n = tasks or (150 if quick else 1000)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="wasmbox-bench-service-") as tmp, \
            _service(Path(tmp), workers_used, max(LEVELS) * 2, runner,
                                  runner_processes) as (url, server):
        load_before = os.getloadavg()[0]
        by_b64 = {"kind": "wasm", "module_b64": base64.b64encode(hello).decode()}
        by_ref = {"kind": "wasm", "module_sha256": hashlib.sha256(hello).hexdigest()}
        asyncio.run(_load(url, by_b64, "poll", 4, 8, client))  # warm: journal, compile
        progress.step("service: submit + long-poll")
        for form in FORMS:
            if form == "wait":
                progress.step("service: submit-and-wait")
            for level in LEVELS:
                body = by_ref if by == "sha256" else by_b64
                rows.append(_row(form, level, body, url, n, workers_used, server, client))
        progress.step("service: module as base64 in every request")
        if by == "sha256":
            b64 = _row("poll", LEVELS[0], by_b64, url, max(50, n // 4), workers_used, server,
                       client)
            b64.id, b64.label = "service:poll-b64", f"{b64.label}, module as base64 each time"
            rows.append(b64)
        progress.step("service: httpx load generator")
        if client == "raw":
            body = by_ref if by == "sha256" else by_b64
            other = _row("poll", LEVELS[0], body, url, max(50, n // 4), workers_used, server,
                         "httpx")
            other.id, other.label = "service:poll-httpx", f"{other.label}, httpx load generator"
            rows.append(other)
        rows[0].notes.insert(0, (
            f"{n} hello tasks a cell (module by {'module_sha256' if by == 'sha256' else 'base64'}"
            f"), service with {workers_used} worker threads ({worker_origin}) and the "
            f"{_default_runner() if runner is None else repr(runner)} runner, load "
            "generator and "
            f"service on the same {CORES} cores; load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after (the machine is shared)"))
    if runner is None and by == "sha256":  # the other runner, beside the default's rows
        with tempfile.TemporaryDirectory(prefix="wasmbox-bench-service-") as tmp, \
                _service(Path(tmp), workers_used, max(LEVELS) * 2, "threads") as (url, server):
            asyncio.run(_load(url, by_b64, "poll", 4, 8, client))  # warm: journal, compile
            for form in FORMS:
                threads = _row(form, LEVELS[0], by_ref, url, n, workers_used, server, client)
                threads.id = f"service:{form}-{LEVELS[0]}-threads"
                threads.label = f"{threads.label}, thread runner"
                rows.append(threads)
    progress.step("service: done")
    return rows


def _default_runner() -> str:
    from wasmbox.service.config import ServiceSettings

    return f"default ({ServiceSettings().runner.value!r})"


def service_workers(workers: int | None) -> tuple[int, str]:
    """The worker threads the bench's service runs with, and where that number comes from:
    `workers` if given, else the service's own default (its `ServiceSettings`)."""
    if workers is not None:
        return workers, "--workers"
    from wasmbox.service.config import ServiceSettings

    return ServiceSettings().workers, "the service's default"


def _row(form: str, level: int, body: dict[str, str], url: str, n: int, workers: int,
         server: psutil.Process, client: str = "httpx") -> Row:
    s0, r0, c0 = server.cpu_times(), _children_cpu(server), time.process_time()
    t0 = time.perf_counter()
    latencies = asyncio.run(_load(url, body, form, level, n, client))
    elapsed = time.perf_counter() - t0
    s1, r1, c1 = server.cpu_times(), _children_cpu(server), time.process_time()
    main_cpu = (s1.user + s1.system - s0.user - s0.system) / n
    runner_cpu = sum(r1[pid] - r0.get(pid, 0.0) for pid in r1) / n
    service_cpu = main_cpu + runner_cpu
    client_cpu = (c1 - c0) / n
    row = Row(f"service:{form}-{level}", f"{FORMS[form]}, {level} clients", None,
              group="service")
    row.wall_s = latencies
    row.rates = [n / elapsed]
    row.throughput = {"tasks": n, "concurrency": level, "workers": workers,
                      "tasks_per_s": n / elapsed, "service_cpu_s": service_cpu,
                      "service_process_cpu_s": main_cpu, "runner_cpu_s": runner_cpu,
                      "client_cpu_s": client_cpu, "ceiling_tasks_per_s": CORES / service_cpu}
    row.notes.append(
        f"load generator: {GENERATORS[client]}; CPU per task: service "
        f"{service_cpu * 1e3:.2f} ms (its runner processes {runner_cpu * 1e3:.2f} ms), load "
        f"generator {client_cpu * 1e3:.2f} ms; measured {n / elapsed:.0f} tasks/s against a "
        f"ceiling on {CORES} otherwise idle cores of "
        f"{CORES / (service_cpu + client_cpu):.0f} tasks/s with this load generator on them, "
        f"{CORES / service_cpu:.0f} for the service alone (upper bounds from CPU alone: the "
        "service process's Python runs under one GIL)")
    return row


async def _load(url: str, body: dict[str, str], form: str, level: int, n: int,
                client: str = "httpx") -> list[float]:
    """Run `n` tasks from `level` concurrent clients; each task's submit-to-result seconds."""
    import httpx

    latencies: list[float] = []
    remaining = iter(range(n))
    if client == "raw":
        async def one_raw_client() -> None:
            async with _RawClient(url) as raw:
                for _ in remaining:
                    latencies.append(await _task(raw, body, form))

        await asyncio.wait_for(asyncio.gather(*(one_raw_client() for _ in range(level))),
                               timeout=REQUEST_TIMEOUT_S * max(1, n // level + 1))
        return latencies
    limits = httpx.Limits(max_connections=level, max_keepalive_connections=level)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {SECRET}"},
                                 timeout=REQUEST_TIMEOUT_S, limits=limits) as http:

        async def one_client() -> None:
            for _ in remaining:
                latencies.append(await _task(http, body, form))

        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(level))),
                               timeout=REQUEST_TIMEOUT_S * max(1, n // level + 1))
    return latencies


async def _task(client: Any, body: dict[str, str], form: str) -> float:
    t0 = time.perf_counter()
    params = {"wait": 30} if form == "wait" else None
    response = await client.post("/v1/tasks", json=body, params=params)
    response.raise_for_status()
    view: dict[str, Any] = response.json()
    for _ in range(10):  # bounded: ten long-polls of up to 30 s each
        if view["final"]:
            if view["result"]["status"] != "completed":
                raise RuntimeError(f"bench task did not complete: {view}")
            return time.perf_counter() - t0
        poll = await client.get(f"/v1/tasks/{view['id']}", params={"wait": 30})
        poll.raise_for_status()
        view = poll.json()
    raise RuntimeError(f"bench task {view['id']} did not finish")


class _RawClient:
    """The little of an HTTP/1.1 client `_task` needs, on one keep-alive connection."""

    def __init__(self, url: str) -> None:
        self._host, _, port = url.removeprefix("http://").partition(":")
        self._port = int(port)

    async def __aenter__(self) -> _RawClient:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._writer.close()
        await self._writer.wait_closed()

    async def post(self, path: str, json: Any, params: dict[str, Any] | None) -> _RawResponse:
        return await self._request("POST", path, params, _json.dumps(json).encode())

    async def get(self, path: str, params: dict[str, Any] | None) -> _RawResponse:
        return await self._request("GET", path, params, b"")

    async def _request(self, method: str, path: str, params: dict[str, Any] | None,
                       body: bytes) -> _RawResponse:
        query = "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
        self._writer.write(
            f"{method} {path}{query} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Authorization: Bearer {SECRET}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines
                      if line.lower().startswith("content-length:"))
        return _RawResponse(int(lines[0].split()[1]), await self._reader.readexactly(length))


class _RawResponse:
    def __init__(self, status: int, content: bytes) -> None:
        self.status_code, self.content = status, content

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:200]!r}")

    def json(self) -> Any:
        return _json.loads(self.content)


@contextmanager
def _service(tmp: Path, workers: int, max_concurrent: int, runner: str | None = None,
             runner_processes: int = 0) -> Iterator[tuple[str, psutil.Process]]:
    """``python -m wasmbox.service`` on a free loopback port; yields its URL and process."""
    config = tmp / "service.toml"
    config.write_text(
        f'[service]\nworkers = {workers}\ndb = "{tmp / "tasks.db"}"\n'
        + (f'runner = "{runner}"\n' if runner else "")
        + f"runner_processes = {runner_processes}\n" +
        f'[tokens.bench]\nsecret = "{SECRET}"\nmax_concurrent = {max_concurrent}\n',
        encoding="utf-8",
    )
    port = _free_port()
    env = {**os.environ, "WASMBOX_CACHE_DIR": os.environ.get("WASMBOX_CACHE_DIR",
                                                             str(tmp / "cache"))}
    with (tmp / "service.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "wasmbox.service", "--host", HOST, "--port", str(port),
             "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            url = f"http://{HOST}:{port}"
            _wait_ready(url, server)
            yield url, psutil.Process(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _children_cpu(server: psutil.Process) -> dict[int, float]:
    """CPU seconds so far of each of the service's child processes (its runners), by pid."""
    seconds = {}
    for child in server.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # gone since listed
            continue
        seconds[child.pid] = times.user + times.system
    return seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    import httpx

    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"service exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("service did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks per cell")
    parser.add_argument("--tasks", type=int, help="tasks per cell (default 150 quick, 1000)")
    parser.add_argument("--workers", type=int,
                        help="service worker threads (default: the service's default)")
    parser.add_argument("--by", choices=("sha256", "b64"), default="sha256",
                        help="name the module by digest (default) or send it every time")
    parser.add_argument("--client", choices=("httpx", "raw"), default="raw",
                        help="the load generator's HTTP client (raw, the default: a minimal "
                             "keep-alive one; httpx: httpx.AsyncClient)")
    parser.add_argument("--runner", choices=("threads", "processes"),
                        help="the service's runner setting (default: the service's default)")
    parser.add_argument("--runner-processes", type=int, default=0,
                        help="the service's runner processes (default 0: one per core)")
    parser.add_argument("--json", action="store_true", help="one JSON line per row")
    args = parser.parse_args(argv)
    rows = measure(args.quick, NoProgress(STEPS), args.workers, args.tasks, args.by,
                   args.client, args.runner, args.runner_processes)
    if args.json:
        for row in rows:
            client = "httpx" if row.id == "service:poll-httpx" else args.client
            print(json.dumps({"id": row.id, "client": client, **row.throughput,
                              **{f"p{q}_ms": round(_pct(row.wall_s, q) * 1e3, 2)
                                 for q in (50, 95, 99)}}))
    else:
        print_rows(rows)
        print("\n".join(service_lines(rows)))
    return 0


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


if __name__ == "__main__":
    sys.exit(main())
