"""Benchmark of the HTTP API with the real E2B SDKs against a live ``cube serve``.

Starts ``cube serve`` (warm pools, a fresh state dir, a free port) and a bare Hypercorn server
that answers every request with an empty 200 — the baseline: what one HTTP round trip costs
on this machine, measured in the same run. Then it times, with the unmodified SDKs:

    create_p50_ms / create_p99_ms   Sandbox.create() one at a time, the pool warm before each
    create_c10_p50_ms               ten Sandbox.create() at once (a pool of >= 10 warm)
    run_p50_ms                      sandbox.commands.run("true")  (bash -l -c true)
    run_rpc_p50_ms                  Process.Start of /bin/true over raw HTTP (no login shell)
    run_code_p50_ms                 sandbox.run_code("1+1")
    baseline_http_rtt_ms            one request to the bare Hypercorn app
    api_health_rtt_ms               GET /health on cube's control app

    python benchmarks/api.py            # a readable table
    python benchmarks/api.py --json     # exactly one JSON object on stdout
    python benchmarks/api.py --quick    # fewer samples

Progress goes to stderr. ``--driver`` picks the isolation driver (default: process).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

BASELINE_APP = r"""
import sys, trio
from hypercorn.config import Config
from hypercorn.trio import serve

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            kind = event["type"].replace("lifespan.", "")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

config = Config()
config.bind = [f"127.0.0.1:{sys.argv[1]}"]
config.accesslog = None
trio.run(serve, app, config)
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered) * 1000, 2), "p99": round(p99 * 1000, 2)}


def timed(fn: Callable[[], Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--driver", default=os.environ.get("CUBE_BENCH_DRIVER", "process"))
    args = parser.parse_args()
    n = 10 if args.quick else 40

    state_dir = tempfile.mkdtemp(prefix="cube-bench-", dir="/tmp")
    port, base_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    key = "e2b_" + secrets.token_hex(20)
    config = Path(state_dir) / "config.toml"
    config.write_text('[pools]\n"base" = { size = 12, concurrency = 4 }\n"code-interpreter-v1" = { size = 1, concurrency = 1 }\n')
    env = {**os.environ, "CUBE_API_KEY": key}
    for name in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DEBUG"):
        env.pop(name, None)
    serve_argv = [sys.executable, "-m", "cube.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                  "--driver", args.driver, "--state-dir", state_dir, "--config", str(config),
                  "--log-level", "warning", "--no-access-log"]
    say(f"starting cube serve ({args.driver} driver) and the baseline server")
    cube = subprocess.Popen(serve_argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    baseline = subprocess.Popen([sys.executable, "-c", BASELINE_APP, str(base_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(E2B_API_KEY=key, E2B_API_URL=url, E2B_SANDBOX_URL=url)
    try:
        wait_http(url + "/health", cube)
        wait_http(f"http://127.0.0.1:{base_port}/", baseline)
        results = measure(url, base_port, n)
        results["driver"] = args.driver
    finally:
        stop(cube)
        stop(baseline)
        shutil.rmtree(state_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:28} {value}")
    return 0


def measure(url: str, base_port: int, n: int) -> dict[str, Any]:
    import httpx
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox

    results: dict[str, Any] = {}
    with httpx.Client(timeout=10) as client:
        for _ in range(50):  # warm both servers' connection and code paths
            client.get(f"http://127.0.0.1:{base_port}/")
            client.get(url + "/health")
        results["baseline_http_rtt_ms"] = ms(timed(lambda: client.get(f"http://127.0.0.1:{base_port}/"), n * 5))["p50"]
        results["api_health_rtt_ms"] = ms(timed(lambda: client.get(url + "/health"), n * 5))["p50"]

    killer = concurrent.futures.ThreadPoolExecutor(4)
    time.sleep(3)  # let the pools fill
    say(f"create, concurrency 1 ({n} sandboxes)")
    samples = []
    for _ in range(n):
        time.sleep(0.5)  # the pool refills behind each create: measure a warm take
        started = time.perf_counter()
        sandbox = Sandbox.create()
        samples.append(time.perf_counter() - started)
        killer.submit(sandbox.kill)
    create = ms(samples)
    results["create_p50_ms"], results["create_p99_ms"] = create["p50"], create["p99"]

    say("create, concurrency 10")
    c10: list[float] = []
    for _ in range(2 if n < 20 else 3):
        time.sleep(4)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            def one() -> float:
                started = time.perf_counter()
                sandbox = Sandbox.create()
                elapsed = time.perf_counter() - started
                killer.submit(sandbox.kill)
                return elapsed
            c10 += list(pool.map(lambda _: one(), range(10)))
    results["create_c10_p50_ms"] = ms(c10)["p50"]

    say(f"commands.run('true') x{n}")
    sandbox = Sandbox.create(timeout=300)
    try:
        sandbox.commands.run("true")
        results["run_p50_ms"] = ms(timed(lambda: sandbox.commands.run("true"), n))["p50"]
        with httpx.Client(timeout=10) as rpc:
            results["run_rpc_p50_ms"] = ms(timed(lambda: start_true(rpc, url, sandbox), n))["p50"]
    finally:
        sandbox.kill()

    say(f"run_code('1+1') x{n}")
    code = CodeSandbox.create(timeout=300)
    try:
        code.run_code("1+1")
        results["run_code_p50_ms"] = ms(timed(lambda: code.run_code("1+1"), n))["p50"]
    finally:
        code.kill()
    killer.shutdown(wait=True)
    return results


def start_true(client: Any, url: str, sandbox: Any) -> None:
    """Process.Start of /bin/true as a bare Connect call: the API's own cost of a command."""
    body = json.dumps({"process": {"cmd": "/bin/true"}, "stdin": False}).encode()
    response = client.post(
        f"{url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(body)) + body,
        headers={
            "Content-Type": "application/connect+json",
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sandbox._envd_access_token,
        },
    )
    if b'"end"' not in response.content:
        raise RuntimeError(f"Start did not end: {response.content[:200]!r}")


if __name__ == "__main__":
    sys.exit(main())
