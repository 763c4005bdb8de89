"""Benchmarks of the guest agent, each a ratio to a baseline measured in the same run.

    python benchmarks/guest.py [--json] [--rounds N]

* ``ping_vs_echo``: round trip of envd's no-op request vs a raw echo server on the same kind of
  socket (a unix socket; the echo server is a plain blocking loop). ``ping_vs_trio_echo`` uses
  an echo server written on trio instead, which isolates what the protocol itself costs.
* ``start_true_vs_spawn``: ``/bin/true`` through envd (start, stream, end, ok) vs spawning and
  waiting for it directly from this process with ``Popen(...).wait()``;
  ``start_true_vs_trio_run_process`` compares with ``trio.run_process`` instead.
* ``execute_p50_ms``: ``1+1`` in a warm Python context, median round trip.
* ``cat_vs_local_read``: streaming a 100 MB file out of ``cat`` through envd vs reading it here.

Baselines and measurements alternate round by round, and every figure is the median over the
rounds, because these machines are small and shared.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # this file is benchmarks/guest.py: keep it from shadowing `guest`

import trio  # noqa: E402

from guest import protocol as p  # noqa: E402
from guest.client import GuestClient  # noqa: E402

GOALS = {"ping_vs_echo": 3.0, "start_true_vs_spawn": 1.5, "execute_p50_ms": 1.0}

BLOCKING_ECHO = r"""
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1] + ".tmp"); server.listen(1)
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    conn, _ = server.accept()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
"""

TRIO_ECHO = r"""
import os, socket, sys, trio
async def echo(stream):
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        await stream.send_all(data)
async def main():
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(sys.argv[1] + ".tmp"); sock.listen(8)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    await trio.serve_listeners(echo, [trio.SocketListener(sock)])
trio.run(main)
"""


def wait_for_path(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def round_trips(path: str, count: int) -> float:
    """Microseconds per round trip of a ping line over a fresh unix connection."""
    stream = await trio.open_unix_socket(path)
    line = b'{"id":1,"op":"ping"}\n'
    async with stream:
        if path.endswith("envd.sock"):
            await stream.receive_some(65536)  # envd's hello
        for _ in range(20):  # warm up
            await stream.send_all(line)
            await stream.receive_some(65536)
        start = time.perf_counter()
        for _ in range(count):
            await stream.send_all(line)
            received = await stream.receive_some(65536)
            while not received.endswith(b"\n"):
                received += await stream.receive_some(65536)
        return (time.perf_counter() - start) / count * 1e6


async def bench_ping(workdir: Path, envd_socket: str, rounds: int) -> dict[str, float]:
    echo_path = str(workdir / "echo.sock")
    trio_echo_path = str(workdir / "trio-echo.sock")
    servers = [
        subprocess.Popen([sys.executable, "-c", BLOCKING_ECHO, echo_path]),
        subprocess.Popen([sys.executable, "-c", TRIO_ECHO, trio_echo_path]),
    ]
    try:
        wait_for_path(echo_path)
        wait_for_path(trio_echo_path)
        echo, trio_echo, ping, ratio, trio_ratio = [], [], [], [], []
        for _ in range(rounds):
            e = await round_trips(echo_path, 300)
            t = await round_trips(trio_echo_path, 300)
            g = await round_trips(envd_socket, 300)
            echo.append(e)
            trio_echo.append(t)
            ping.append(g)
            ratio.append(g / e)
            trio_ratio.append(g / t)
    finally:
        for server in servers:
            server.kill()
            server.wait()
    return {
        "ping_us": statistics.median(ping),
        "echo_us": statistics.median(echo),
        "trio_echo_us": statistics.median(trio_echo),
        "ping_vs_echo": statistics.median(ratio),
        "ping_vs_trio_echo": statistics.median(trio_ratio),
    }


async def bench_start(client: GuestClient, rounds: int) -> dict[str, float]:
    request = p.ProcessStart(process=p.ProcessConfig(cmd="/bin/true"), stdin=False)
    for _ in range(10):
        await client.call("process.start", request)
    through, direct, in_trio, ratio, trio_ratio = [], [], [], [], []
    count = 30
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            subprocess.Popen(["/bin/true"]).wait()
        d = (time.perf_counter() - start) / count * 1000
        start = time.perf_counter()
        for _ in range(count):
            await trio.run_process(["/bin/true"])
        r = (time.perf_counter() - start) / count * 1000
        start = time.perf_counter()
        for _ in range(count):
            await client.call("process.start", request)
        t = (time.perf_counter() - start) / count * 1000
        direct.append(d)
        in_trio.append(r)
        through.append(t)
        ratio.append(t / d)
        trio_ratio.append(t / r)
    return {
        "start_true_ms": statistics.median(through),
        "spawn_true_ms": statistics.median(direct),
        "trio_run_process_true_ms": statistics.median(in_trio),
        "start_true_vs_spawn": statistics.median(ratio),
        "start_true_vs_trio_run_process": statistics.median(trio_ratio),
    }


async def bench_execute(client: GuestClient) -> dict[str, float]:
    context = await client.call("code.create", p.ContextCreate())
    request = p.Execute(code="1+1", context_id=context.id)
    for _ in range(30):
        await client.call("code.execute", request)
    samples = []
    for _ in range(300):
        start = time.perf_counter()
        await client.call("code.execute", request)
        samples.append((time.perf_counter() - start) * 1000)
    await client.call("code.delete", p.ContextId(id=context.id))
    samples.sort()
    return {
        "execute_p50_ms": samples[len(samples) // 2],
        "execute_p90_ms": samples[len(samples) * 9 // 10],
    }


async def stream_bytes(client: GuestClient, op: str, args: p.Message) -> int:
    total = 0
    async with client.stream(op, args) as remote:
        async for kind, body in remote:
            if kind == "data":
                total += len(body.stdout or b"") if op == "process.start" else len(body.data)
    return total


def local_read(path: str) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, p.FILE_CHUNK):
            total += len(chunk)
    finally:
        os.close(fd)
    return total


async def bench_cat(client: GuestClient, workdir: Path, rounds: int) -> dict[str, float]:
    size = 100 << 20
    path = workdir / "100mb.bin"
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(100):
            f.write(block)
    local, cat, fs_read, ratio = [], [], [], []
    cat_request = p.ProcessStart(process=p.ProcessConfig(cmd="cat", args=[str(path)]), stdin=False)
    for _ in range(rounds):
        start = time.perf_counter()
        assert local_read(str(path)) == size
        local.append(size / (time.perf_counter() - start) / 1e6)
        start = time.perf_counter()
        assert await stream_bytes(client, "process.start", cat_request) == size
        cat.append(size / (time.perf_counter() - start) / 1e6)
        start = time.perf_counter()
        assert await stream_bytes(client, "fs.read", p.FsRead(path=str(path))) == size
        fs_read.append(size / (time.perf_counter() - start) / 1e6)
        ratio.append(cat[-1] / local[-1])
    path.unlink()
    return {
        "cat_100mb_mb_s": statistics.median(cat),
        "fs_read_100mb_mb_s": statistics.median(fs_read),
        "local_read_mb_s": statistics.median(local),
        "cat_vs_local_read": statistics.median(ratio),
    }


def bench_startup(workdir: Path, rounds: int) -> dict[str, float]:
    """envd's fixed costs: ``--help`` (argument parsing only) and start-to-listening."""
    bare, help_, listen = [], [], []
    for n in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "guest.envd", "--help"],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )
        help_.append((time.perf_counter() - start) * 1000)
        sock = str(workdir / f"start{n}.sock")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "guest.envd", "--listen", f"unix:{sock}", "--keepalive", "0"],
            cwd=ROOT, stderr=subprocess.DEVNULL,
        )
        wait_for_path(sock)
        listen.append((time.perf_counter() - start) * 1000)
        proc.terminate()
        proc.wait()
    return {
        "python_bare_ms": statistics.median(bare),
        "envd_help_ms": statistics.median(help_),
        "envd_start_to_listen_ms": statistics.median(listen),
    }


async def run_all(rounds: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="guest-bench-"))
    envd_socket = str(workdir / "envd.sock")
    envd = subprocess.Popen(
        [sys.executable, "-m", "guest.envd", "--listen", f"unix:{envd_socket}", "--keepalive", "0"],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )
    results: dict[str, object] = {}
    try:
        wait_for_path(envd_socket)
        results["envd_rss_idle_mb"] = rss_mb(envd.pid)
        results |= await bench_ping(workdir, envd_socket, rounds)
        stream = await trio.open_unix_socket(envd_socket)
        async with stream, GuestClient.open(stream, window=4 << 20) as client:
            results |= await bench_start(client, rounds)
            results |= await bench_execute(client)
            results |= await bench_cat(client, workdir, max(3, rounds // 2))
        results["envd_rss_after_mb"] = rss_mb(envd.pid)
        results |= bench_startup(workdir, max(3, rounds // 2))
    finally:
        envd.terminate()
        envd.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    results["goals"] = {
        name: {"goal": goal, "met": float(results[name]) <= goal}  # type: ignore[arg-type]
        for name, goal in GOALS.items()
    }
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "load_1m": os.getloadavg()[0],
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per figure")
    args = parser.parse_args()
    results = trio.run(run_all, args.rounds)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
