"""Service throughput and latency (wasm tier, hello) over loopback, and Dask scale-out 1 -> 2.

    python3 benchmarks/bench_service.py [--requests 200] [--concurrency 8] [--dask-tasks 8]

Needs the guests (``python3 guests/build.py --out build/guests``). Latency is from submit to
the final result seen by a long-poll, so it includes the SQLite journal writes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "build" / "guests"
SECRET = "bench-secret"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="service worker threads")
    parser.add_argument("--dask-tasks", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wasmbox-bench-service-") as tmp:
        os.environ.setdefault("WASMBOX_CACHE_DIR", str(Path(tmp) / "cache"))
        bench_http(Path(tmp), args.requests, args.concurrency, args.workers)
        bench_dask(args.dask_tasks)
    return 0


def bench_http(tmp: Path, requests: int, concurrency: int, workers: int) -> None:
    config = tmp / "service.toml"
    config.write_text(
        f'[service]\nworkers = {workers}\ndb = "{tmp / "tasks.db"}"\n'
        f'[tokens.bench]\nsecret = "{SECRET}"\nmax_concurrent = {concurrency * 2}\n',
        encoding="utf-8",
    )
    port = _free_port()
    log = (tmp / "service.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "wasmbox.service", "--port", str(port), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        body = {"kind": "wasm",
                "module_b64": base64.b64encode((GUESTS / "hello.wasm").read_bytes()).decode()}
        headers = {"Authorization": f"Bearer {SECRET}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60,
                          limits=httpx.Limits(max_connections=concurrency * 2)) as client:
            for _ in range(5):
                _one(client, body)  # warm-up: compile and cache the module
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                latencies = list(pool.map(lambda _i: _one(client, body), range(requests)))
            elapsed = time.perf_counter() - t0
        latencies.sort()
        print(json.dumps({
            "bench": "service-http-hello", "requests": requests, "concurrency": concurrency,
            "service_workers": workers, "tasks_per_s": round(requests / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1e3, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
                            * 1e3, 2),
        }))
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _one(client: httpx.Client, body: dict[str, str]) -> float:
    t0 = time.perf_counter()
    response = client.post("/v1/tasks", json=body)
    response.raise_for_status()
    task_id = response.json()["id"]
    while True:
        view = client.get(f"/v1/tasks/{task_id}", params={"wait": 30}).json()
        if view["final"]:
            if view["result"]["status"] != "completed":
                raise RuntimeError(f"bench task did not complete: {view}")
            return time.perf_counter() - t0


def bench_dask(count: int) -> None:
    import dask
    from distributed import Client, LocalCluster

    from wasmbox import Task
    from wasmbox.distributed import cluster_config, run_many

    timings = {}
    for workers in (1, 2):
        with dask.config.set(cluster_config()), LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, processes=True, threads_per_worker=1, host="127.0.0.1",
            dashboard_address=None,
        ) as cluster, Client(cluster) as client:  # type: ignore[no-untyped-call]
            run_many(client, [Task.wasm(GUESTS / "cpu_kernel.wasm", args=("1000",))
                              for _ in range(workers * 2)])  # warm every worker
            tasks = [Task.wasm(GUESTS / "cpu_kernel.wasm") for _ in range(count)]
            t0 = time.perf_counter()
            results = run_many(client, tasks)
            timings[workers] = time.perf_counter() - t0
            if any(not r.ok for r in results):
                raise RuntimeError(f"bench task failed: {results[0]}")
    print(json.dumps({
        "bench": "dask-cpu_kernel", "tasks": count,
        "seconds_1_worker": round(timings[1], 2), "seconds_2_workers": round(timings[2], 2),
        "speedup": round(timings[1] / timings[2], 2),
    }))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if server.poll() is not None:
            raise RuntimeError(f"service exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("service did not start")


if __name__ == "__main__":
    sys.exit(main())
