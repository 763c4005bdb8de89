"""Benchmark of the sandbox node through its Python API, per isolation driver.

Runs a real node in this process (``open_node``, a fresh state dir under /tmp, warm pools)
and times what a research harness does, against a baseline measured in the same run:

    create_p50_ms / create_p99_ms  ``await node.create("base")``, one at a time, the pool full
                                   before each
    create_c10_p50_ms              ten creates at once from a pool of >= 10 warm sandboxes
    creates_per_s                  creates back to back (each killed behind it) while the pool
                                   refills: the sustained rate, bounded by the driver's start
    run_true_p50_ms                ``await sbx.run("true")`` (``/bin/bash -l -c true``)
    run_bin_true_p50_ms            ``/bin/true`` started through envd directly (no shell)
    idle_uss_mb                    unique memory (USS, /proc/PID/smaps_rollup) of an idle
                                   sandbox: the sum over all its processes
    idle_cgroup_mb                 (ns) what the sandbox's memory cgroup is charged
    zygote_uss_mb / zygote_rss_mb  (ns) the node's envd zygote, paid once per node
    start_p50_ms                   how long a pool fill takes (the driver's start), from the
                                   pool's events, one refill at a time
    sustained_start_p50_ms         the same while creates and kills run back to back
    baseline_spawn_ms              ``posix_spawn`` + ``waitpid`` of /bin/true from here
    baseline_run_process_ms        ``trio.run_process(["/bin/true"])`` from here
    hold_*                         (ns) ``--hold N`` sandboxes created and held at once (a
                                   pool of ``--hold-pool`` refilling): do all answer ``true``;
                                   time to create, check and kill; USS, cgroup charge and
                                   the host's MemAvailable drop in all

and a ``goals`` dict per driver with the issue's goals (ns create p50 <= 5 ms from a warm pool,
idle sandbox <= 8 MB unique memory, 200 idle sandboxes held at once).

    python benchmarks/node.py                      # a readable table
    python benchmarks/node.py --json               # exactly one JSON object on stdout
    python benchmarks/node.py --quick              # small counts, a few seconds per driver
    python benchmarks/node.py --drivers process    # default: ns (when root on Linux), process

Progress goes to stderr. Each driver gets its own state dir (``/tmp/cube-nb-*``, short for the
unix sockets), removed at the end; the benchmark fails if a driver left anything behind on the
host (``leftovers()``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project, not benchmarks/

import trio  # noqa: E402

from actors import Event  # noqa: E402
from cube.config import load_config  # noqa: E402
from cube.node import Node, SandboxHandle, open_node  # noqa: E402
from cube.pool import PoolFilled, Resize, Status  # noqa: E402
from guest import protocol  # noqa: E402
from supervisors.reaper import tree_pids  # noqa: E402

GOALS = {"create_p50_ms": 5.0, "idle_uss_mb": 8.0, "hold": 200}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank, of a non-empty list."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- memory ------------------------------------------------------------------------------------


def uss_bytes(pid: int) -> int:
    """Unique set size of ``pid``: its private pages, from /proc/PID/smaps_rollup (0 if gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return total


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def sandbox_pids(node: Node, sbx: SandboxHandle) -> list[int]:
    """Every process of a sandbox: the ns driver's cgroup, the process driver's tree."""
    driver = node.services.driver
    instance = sbx.info.instance
    assert instance is not None
    if driver.name == "ns":
        from cube.drivers.ns_cgroup import SlotCgroup

        cgroup = SlotCgroup(driver.layout, driver.resource_name(instance.slot_id))  # type: ignore[attr-defined]
        return sorted(cgroup.pids())
    return tree_pids(instance.pid)


def cgroup_bytes(node: Node, sbx: SandboxHandle) -> int | None:
    driver = node.services.driver
    if driver.name != "ns" or sbx.info.instance is None:
        return None
    return driver.usage(sbx.info.instance).memory_bytes  # type: ignore[attr-defined,no-any-return]


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# -- baselines ---------------------------------------------------------------------------------


def posix_spawn_true() -> float:
    start = time.perf_counter()
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    os.waitpid(pid, 0)
    return time.perf_counter() - start


async def run_process_true() -> float:
    start = time.perf_counter()
    await trio.run_process(["/bin/true"])
    return time.perf_counter() - start


# -- the node ----------------------------------------------------------------------------------


class Fills:
    """Start times of pool fills, from the node's ``PoolFilled`` events."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, PoolFilled):
            self.seconds.append(event.seconds)


async def wait_warm(node: Node, count: int, timeout: float = 600.0) -> None:
    """Wait until the base pool holds ``count`` warm sandboxes (and is not filling)."""
    pool = node.services.pool("base")
    with trio.fail_after(timeout):
        while True:
            status = await pool.call(Status())
            if status.warm >= count and status.filling == 0:
                return
            if status.failures > 3:
                raise RuntimeError(f"the pool cannot fill: {status.last_error}")
            await trio.sleep(0.01)


async def resize(node: Node, size: int) -> None:
    await node.services.pool("base").call(Resize(size))


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = await fn()
    return time.perf_counter() - start, value


async def run_bin_true(sbx: SandboxHandle) -> None:
    client = await sbx.client()
    args = protocol.ProcessStart(process=protocol.ProcessConfig(cmd="/bin/true"), stdin=False)
    async with client.open_stream("process.start", args) as stream:
        async for _ in stream:
            pass


async def kill_all(sandboxes: list[SandboxHandle]) -> None:
    async with trio.open_nursery() as nursery:
        for sbx in sandboxes:
            nursery.start_soon(sbx.kill)


async def idle_memory(node: Node, sandboxes: list[SandboxHandle]) -> dict[str, Any]:
    """Mean USS per sandbox (and per process role), and the mean cgroup charge."""
    await trio.sleep(0.2)  # let the sandboxes settle (no command in flight)
    totals: list[int] = []
    charges: list[int] = []
    per_process: list[list[int]] = []
    for sbx in sandboxes:
        uss = [uss_bytes(pid) for pid in sandbox_pids(node, sbx)]
        per_process.append(uss)
        totals.append(sum(uss))
        charge = cgroup_bytes(node, sbx)
        if charge is not None:
            charges.append(charge)
    found: dict[str, Any] = {
        "idle_uss_mb": round(statistics.mean(totals) / 2**20, 2),
        "idle_processes": round(statistics.mean(len(p) for p in per_process), 1),
        "idle_uss_by_process_mb": [round(b / 2**20, 2) for b in per_process[0]],
    }
    if charges:
        found["idle_cgroup_mb"] = round(statistics.mean(charges) / 2**20, 2)
    zygote = getattr(node.services.driver, "_zygote", None)  # the ns driver's envd zygote
    if zygote is not None and zygote.exit is None:
        found["zygote_uss_mb"] = round(uss_bytes(zygote.pid) / 2**20, 2)
        found["zygote_rss_mb"] = round(rss_bytes(zygote.pid) / 2**20, 2)
    return found


async def bench_node(node: Node, args: argparse.Namespace, fills: Fills) -> dict[str, Any]:
    n = args.rounds
    result: dict[str, Any] = {}
    pool_size = node.config.pools["base"].size

    say(f"  filling the pool ({pool_size})")
    await wait_warm(node, pool_size)

    # warm up: the first create pays for imports and first-use costs in this process
    await (await node.create("base")).kill()
    await wait_warm(node, pool_size)

    say(f"  create, one at a time ({n})")
    samples = []
    fills.seconds.clear()
    for _ in range(n):
        await wait_warm(node, pool_size)
        seconds, sbx = await timed(lambda: node.create("base"))
        samples.append(seconds)
        await sbx.kill()
    await wait_warm(node, pool_size)
    result["create_p50_ms"] = ms(statistics.median(samples))
    result["create_p99_ms"] = ms(percentile(samples, 0.99))
    result["create_mean_ms"] = ms(statistics.mean(samples))
    result["start_p50_ms"] = ms(statistics.median(fills.seconds))  # one refill at a time

    say(f"  run true ({n * 2})")
    await wait_warm(node, pool_size)
    sbx = await node.create("base")
    await sbx.run("true")
    runs = [(await timed(lambda: sbx.run("true")))[0] for _ in range(n * 2)]
    result["run_true_p50_ms"] = ms(statistics.median(runs))
    bins = [(await timed(lambda: run_bin_true(sbx)))[0] for _ in range(n * 2)]
    result["run_bin_true_p50_ms"] = ms(statistics.median(bins))
    await sbx.kill()

    say("  idle memory")
    await wait_warm(node, pool_size)
    idle = [await node.create("base") for _ in range(min(pool_size, 3))]
    for sbx in idle:
        await sbx.run("true")
    result.update(await idle_memory(node, idle))
    await kill_all(idle)

    count = args.sustained
    say(f"  sustained creates ({count}, pool of {pool_size} refilling)")
    await wait_warm(node, pool_size)
    fills.seconds.clear()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            sbx = await node.create("base", take_timeout=600)
            nursery.start_soon(sbx.kill)
        elapsed = time.perf_counter() - start
    result["creates_per_s"] = round(count / elapsed, 2)
    if fills.seconds:
        result["sustained_start_p50_ms"] = ms(statistics.median(fills.seconds))
    rounds = max(1, n // 10)
    say(f"  create, ten at once ({rounds} rounds)")
    await resize(node, max(pool_size, 10))
    c10: list[float] = []

    async def one(batch: list[SandboxHandle]) -> None:
        seconds, made = await timed(lambda: node.create("base"))
        c10.append(seconds)
        batch.append(made)

    for _ in range(rounds):
        await wait_warm(node, 10)
        batch: list[SandboxHandle] = []
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one, batch)
        await kill_all(batch)
    result["create_c10_p50_ms"] = ms(statistics.median(c10))
    result["create_c10_max_ms"] = ms(max(c10))
    await resize(node, pool_size)

    return result


async def bench_hold(node: Node, count: int) -> dict[str, Any]:
    """Create ``count`` sandboxes, hold them all, check each answers; time and memory."""
    pool_size = node.config.pools["base"].size
    await wait_warm(node, pool_size)
    before = mem_available()
    sandboxes: list[SandboxHandle] = []
    limiter = trio.CapacityLimiter(8)
    say(f"  hold {count}: creating")
    start = time.perf_counter()

    async def make() -> None:
        async with limiter:
            sandboxes.append(await node.create("base", take_timeout=600))
            if len(sandboxes) % 20 == 0:
                say(f"    {len(sandboxes)} / {count} ({time.perf_counter() - start:.1f} s)")

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(make)
    created = time.perf_counter() - start
    say(f"  hold {count}: all created in {created:.1f} s; running true in each")
    answered = 0

    async def check(sbx: SandboxHandle) -> None:
        nonlocal answered
        async with limiter:
            if (await sbx.run("true")).exit_code == 0:
                answered += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for sbx in sandboxes:
            nursery.start_soon(check, sbx)
    checked = time.perf_counter() - start
    await trio.sleep(0.5)
    uss = sum(uss_bytes(pid) for sbx in sandboxes for pid in sandbox_pids(node, sbx))
    charges = [cgroup_bytes(node, sbx) for sbx in sandboxes]
    used = before - mem_available()
    say(f"  hold {count}: killing")
    start = time.perf_counter()
    await kill_all(sandboxes)
    killed = time.perf_counter() - start
    found: dict[str, Any] = {
        "hold_count": count,
        "hold_ok": answered == count,
        "hold_create_s": round(created, 2),
        "hold_check_s": round(checked, 2),
        "hold_kill_s": round(killed, 2),
        "hold_uss_mb": round(uss / 2**20, 1),
        "hold_host_mb": round(used / 2**20, 1),
    }
    if all(c is not None for c in charges):
        found["hold_cgroup_mb"] = round(sum(c or 0 for c in charges) / 2**20, 1)
    return found


async def bench_driver(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one driver, in a fresh state dir that is removed afterwards."""
    state_dir = tempfile.mkdtemp(prefix="cube-nb-", dir="/tmp")  # short: unix socket paths
    say(f"  state dir {state_dir}")
    config = load_config(
        env={},
        overrides={
            "state_dir": state_dir,
            "driver": name,
            "templates": {"base": {}},
            "pools": {"base": {"size": args.pool, "concurrency": args.fill_concurrency}},
        },
    )
    result: dict[str, Any] = {}
    spawn = [posix_spawn_true() for _ in range(args.rounds * 2)]
    run_process = [await run_process_true() for _ in range(args.rounds * 2)]
    result["baseline_spawn_ms"] = ms(statistics.median(spawn))
    result["baseline_run_process_ms"] = ms(statistics.median(run_process))
    fills = Fills()
    try:
        async with open_node(config) as node:
            driver = node.services.driver
            node.services.system.events.add_hook(fills)
            result.update(await bench_node(node, args, fills))
            hold = args.hold if name == "ns" else 0
            if hold:
                await resize(node, args.hold_pool)
                result.update(await bench_hold(node, hold))
        left = driver.leftovers()
        if left:
            raise RuntimeError(f"the {name} driver left resources behind: {left[:5]}")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    goals: dict[str, bool | None] = {
        "create_p50_le_5ms": result["create_p50_ms"] <= GOALS["create_p50_ms"],
        "idle_uss_le_8mb": result["idle_uss_mb"] <= GOALS["idle_uss_mb"],
        "hold_200_ok": (result["hold_ok"] and result["hold_count"] >= GOALS["hold"])
        if "hold_ok" in result
        else None,
    }
    result["goals"] = goals
    return result


def default_drivers() -> list[str]:
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        return ["ns", "process"]
    return ["process"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="small counts: seconds per driver")
    parser.add_argument("--drivers", default=",".join(default_drivers()), help="comma-separated")
    parser.add_argument("--rounds", type=int, help="samples per latency (default 50; quick 5)")
    parser.add_argument(
        "--sustained", type=int, help="creates in the rate test (default 40; quick 4)"
    )
    parser.add_argument(
        "--hold", type=int, help="ns sandboxes to hold at once (default 200; quick 0)"
    )
    parser.add_argument("--pool", type=int, default=2, help="warm pool size (default 2)")
    parser.add_argument(
        "--hold-pool", type=int, default=20, help="pool size while holding (default 20)"
    )
    parser.add_argument("--fill-concurrency", type=int, default=2, help="fills at once (default 2)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 5 if args.quick else 50
    if args.sustained is None:
        args.sustained = 4 if args.quick else 40
    if args.hold is None:
        args.hold = 0 if args.quick else GOALS["hold"]
    args.drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.drivers:
        say(f"{name}:")
        started = time.perf_counter()
        results[name] = trio.run(bench_driver, name, args)
        results[name]["bench_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    keys = sorted({k for r in results.values() for k in r if k != "goals"})
    print(f"{'':28}" + "".join(f"{d:>14}" for d in results))
    for key in keys:
        print(f"{key:28}" + "".join(f"{r.get(key, '-')!s:>14}" for r in results.values()))
    for name, r in results.items():
        print(f"{name} goals: " + ", ".join(f"{k}={v}" for k, v in r["goals"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
