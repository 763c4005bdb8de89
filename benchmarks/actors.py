"""Benchmark of the actor kernel against the raw trio baselines of docs/actors.md §4.

Every goal of §5.8 is a ratio to a raw baseline, so the baselines are measured here, in the
same process, interleaved with the kernel's numbers: each run measures every raw case next
to the kernel cases it anchors (the short ones three times, interleaved, keeping the best),
a ratio is taken within each run, and the figure reported is the median over the runs (5 by
default). The garbage collector stays on throughout.

    python benchmarks/actors.py            # a readable table
    python benchmarks/actors.py --json     # exactly one JSON object on stdout
    python benchmarks/actors.py --quick    # a smoke run of a few seconds (numbers are rough)
    python benchmarks/actors.py --clock wall   # time by the wall clock instead of CPU time

Progress goes to stderr. Cases are timed by this thread's CPU time by default: everything
measured runs in one thread and never sleeps, so on a quiet machine that equals the wall
time, and on a shared machine it leaves out the time other processes held the CPU.
``cpu_share`` in the output says how contended the run was. ``--quick`` does every case
once with small sizes, and measures memory on a 1 k-actor tree instead of the 10 k one.
"""

from __future__ import annotations

import os
import sys

# This file is called actors.py: when it runs as a script its own folder comes first on
# sys.path and `import actors` would import this file. Take that folder off the path, and put
# the repository root on it so that the script also runs without an installed checkout.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import msgspec  # noqa: E402
import trio  # noqa: E402
import trio.testing  # noqa: E402

from actors import (  # noqa: E402
    DEFAULT_TIMEOUT,
    Actor,
    ActorInfo,
    ActorRef,
    Request,
    Restarted,
    open_actor_system,
)
from supervisors import ONE_FOR_ALL, ChildSpec, Supervisor  # noqa: E402

perf = time.perf_counter
perf_ns = time.perf_counter_ns

# What the cases are timed with (--clock; see the module docstring). Percentiles are always
# taken per sample on the wall clock.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


# -- sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much work one run of each case does."""

    messages: int  # T_raw and cast
    burst: int  # try_cast burst
    round_trips: int  # RTT_raw and call
    spawns: int  # SPAWN_raw
    stops: int  # STOP_raw
    restarts: int  # RESTART_raw and the kernel's one_for_one restart
    group_restarts: int  # one_for_all restarts of a group of GROUP children
    idle_tasks: int  # MEM_raw
    supervisors: int  # the tree: supervisors under the root ...
    workers: int  # ... each with this many workers
    repeats: int  # short cases run this often per run, interleaved; the best counts
    memory_supervisors: int  # supervisors of the tree measured under tracemalloc (slow)


FULL = Sizes(
    messages=20_000,
    burst=200_000,
    round_trips=7_000,
    spawns=10_000,
    stops=10_000,
    restarts=2_000,
    group_restarts=200,
    idle_tasks=2_000,
    supervisors=100,
    workers=100,
    repeats=3,
    memory_supervisors=100,
)
QUICK = Sizes(
    messages=5_000,
    burst=20_000,
    round_trips=2_000,
    spawns=1_000,
    stops=1_000,
    restarts=500,
    group_restarts=50,
    idle_tasks=500,
    supervisors=100,
    workers=100,
    repeats=1,
    memory_supervisors=10,  # the per-actor figure hardly depends on the size
)
GROUP = 10  # children of the one_for_all supervisor
MAILBOX_TREE = 16  # mailbox size of the tree's workers (§5.8 G5)


# -- messages and actors used by the kernel cases ---------------------------------------------


class Ping(msgspec.Struct, frozen=True, tag=True):
    n: int


class Flush(Request[int], frozen=True, tag=True):
    pass


class Echo(Request[int], frozen=True, tag=True):
    n: int


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class Boom(Exception):
    """The crash the restart cases inject."""


class Sink(Actor[Ping | Flush | Echo | Crash]):
    """A class actor with type-dispatched handlers and a counter of what it handled."""

    def __init__(self) -> None:
        self.count = 0

    async def on_ping(self, msg: Ping) -> None:
        self.count += 1

    async def on_flush(self, msg: Flush) -> int:
        return self.count

    async def on_echo(self, msg: Echo) -> int:
        return msg.n

    async def on_crash(self, msg: Crash) -> None:
        raise Boom("benchmark crash")


class Idle(Actor[Echo]):
    """A worker of the 10 k tree: a mailbox of 16, doing nothing until it is called."""

    mailbox_size = MAILBOX_TREE

    async def on_echo(self, msg: Echo) -> int:
        return msg.n


# -- raw trio baselines (docs/actors.md §4.0) ------------------------------------------------


async def raw_throughput(n: int) -> dict[str, float]:
    """T_raw: one-way open_memory_channel(64) between two tasks, int payload."""
    send, recv = trio.open_memory_channel[int](64)

    async def consumer() -> None:
        for _ in range(n):
            await recv.receive()

    async with trio.open_nursery() as nursery:
        t0 = clock()
        nursery.start_soon(consumer)
        for i in range(n):
            await send.send(i)
    elapsed = clock() - t0
    return {"T_raw_msg_per_s": n / elapsed}


async def raw_round_trip(n: int) -> dict[str, float]:
    """RTT_raw: request/reply between two tasks over two memory channels of buffer 1."""
    req_send, req_recv = trio.open_memory_channel[int](1)
    rep_send, rep_recv = trio.open_memory_channel[int](1)

    async def server() -> None:
        async for x in req_recv:
            await rep_send.send(x)

    samples = [0] * n
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        await trio.testing.wait_all_tasks_blocked()
        t0 = clock()
        for i in range(n):
            s = perf_ns()
            await req_send.send(i)
            await rep_recv.receive()
            samples[i] = perf_ns() - s
        elapsed = clock() - t0
        nursery.cancel_scope.cancel()
    return {
        "RTT_raw_us": elapsed / n * 1e6,
        "RTT_raw_p50_us": _percentile(samples, 50) / 1e3,
        "RTT_raw_p99_us": _percentile(samples, 99) / 1e3,
    }


async def raw_spawn(n: int) -> dict[str, float]:
    """SPAWN_raw: nursery.start() with a started() handshake.

    The tasks end right after the handshake, so this is the cost of the handshake and not of
    the garbage collector walking a growing heap (docs/actors.md §4.4: with 10 k tasks kept
    alive a start costs about twice as much)."""

    async def child(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async with trio.open_nursery() as nursery:
        t0 = clock()
        for _ in range(n):
            await nursery.start(child)
        elapsed = clock() - t0
    return {"SPAWN_raw_us": elapsed / n * 1e6}


async def raw_stop(n: int) -> dict[str, float]:
    """STOP_raw: cancel n idle tasks at once; the time until the nursery has exited, per task."""

    async def idle() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(idle)
        await trio.testing.wait_all_tasks_blocked()
        t0 = clock()
        nursery.cancel_scope.cancel()
    elapsed = clock() - t0
    return {"STOP_raw_us": elapsed / n * 1e6}


async def raw_memory(n: int) -> dict[str, float]:
    """MEM_raw: tracemalloc size of one idle task blocked on its own bounded channel.

    MEM_raw itself is a task started with nursery.start and a started() handshake, as an
    actor must be, written plainly: its frame keeps the TaskStatus, and with it trio's
    temporary start nursery. MEM_raw_start_soon_kb is the stricter floor, a task started
    with start_soon (about 1 KB less)."""

    async def idle(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[int](MAILBOX_TREE)
        async with send, recv:
            task_status.started()
            await recv.receive()

    out: dict[str, float] = {}
    for key, handshake in (("MEM_raw_kb", True), ("MEM_raw_start_soon_kb", False)):
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    if handshake:
                        await nursery.start(idle)
                    else:
                        nursery.start_soon(idle)
                await trio.testing.wait_all_tasks_blocked()
                gc.collect()
                used = tracemalloc.get_traced_memory()[0] - base
                nursery.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
        out[key] = used / n / 1024
    return out


async def raw_restart(n: int) -> dict[str, float]:
    """RESTART_raw: catch a crash with except*, open a new nursery, start the next incarnation
    with a handshake; per restart."""

    async def incarnation(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()
        raise Boom("raw crash")

    crashes = 0
    t0 = clock()
    for _ in range(n):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(incarnation)
                await trio.sleep_forever()
        except* Boom:
            crashes += 1
    elapsed = clock() - t0
    assert crashes == n
    return {"RESTART_raw_us": elapsed / n * 1e6}


class _PlainNode:
    __slots__ = ("children", "name", "path")

    def __init__(self, path: str, name: str, children: list[_PlainNode]) -> None:
        self.path = path
        self.name = name
        self.children = children


def _plain_tree(sizes: Sizes) -> _PlainNode:
    groups = []
    for i in range(sizes.supervisors):
        base = f"/root/s{i}"
        workers = [_PlainNode(f"{base}/w{j}", f"w{j}", []) for j in range(sizes.workers)]
        groups.append(_PlainNode(base, f"s{i}", workers))
    return _PlainNode("/root", "root", groups)


def _snapshot_floor(tree: _PlainNode, encoder: msgspec.json.Encoder) -> float:
    """The snapshot floor: Structs of the same shape as ActorInfo for every node of a plain
    object tree of the same size, then JSON; seconds."""
    now = trio.current_time()

    def info(node: _PlainNode) -> ActorInfo:
        kids = [info(c) for c in node.children] if node.children else []
        return ActorInfo(
            node.path,
            node.name,
            "worker",
            "running",
            1,
            0,
            now,
            0,
            16,
            0,
            0,
            0,
            0,
            None,
            None,
            kids,
        )

    t0 = clock()
    encoder.encode(info(tree))
    return clock() - t0


# -- the kernel -------------------------------------------------------------------------------


async def kernel_cast(n: int) -> dict[str, float]:
    """G1: awaited ref.cast of a Struct to a class actor with type-dispatched handlers."""
    async with open_actor_system("bench") as system:
        ref: ActorRef[Any] = await system.spawn(Sink(), "sink")
        await ref.call(Flush())
        t0 = clock()
        for i in range(n):
            await ref.cast(Ping(i))
        handled = await ref.call(Flush())
        elapsed = clock() - t0
    assert handled == n, (handled, n)
    return {"cast_msg_per_s": n / elapsed}


async def kernel_burst(n: int) -> dict[str, float]:
    """G2: try_cast until the mailbox (64) is full, then an awaited cast; a draining actor."""
    async with open_actor_system("bench") as system:
        ref: ActorRef[Any] = await system.spawn(Sink(), "sink")
        await ref.call(Flush())
        try_cast = ref.try_cast
        blocked = 0
        t0 = clock()
        for i in range(n):
            msg = Ping(i)
            if not try_cast(msg):
                blocked += 1
                await ref.cast(msg)
        handled = await ref.call(Flush())
        elapsed = clock() - t0
    assert handled == n, (handled, n)
    return {"burst_msg_per_s": n / elapsed, "burst_awaits_per_msg": blocked / n}


async def kernel_call(n: int, timeout: float | None, prefix: str) -> dict[str, float]:
    """G3: ref.call round trip (timeout armed unless None), mean and percentiles."""
    async with open_actor_system("bench") as system:
        ref: ActorRef[Any] = await system.spawn(Sink(), "sink")
        await ref.call(Flush())
        call = ref.call
        samples = [0] * n
        t0 = clock()
        for i in range(n):
            s = perf_ns()
            await call(Echo(i), timeout)
            samples[i] = perf_ns() - s
        elapsed = clock() - t0
        pending = system.timers.pending()
    assert pending == 0, pending
    return {
        f"{prefix}_us": elapsed / n * 1e6,
        f"{prefix}_p50_us": _percentile(samples, 50) / 1e3,
        f"{prefix}_p99_us": _percentile(samples, 99) / 1e3,
    }


async def kernel_restart(n: int) -> dict[str, float]:
    """G4: one_for_one restart latency, from the crash to the replacement answering a call
    through the same ref (the call is queued behind the crashing message)."""
    async with open_actor_system("bench") as system:
        sup = Supervisor([ChildSpec("sink", Sink)], intensity=10**9, period=1.0)
        await system.spawn(sup, "sup")
        ref = system.lookup("/sup/sink")
        await ref.call(Flush())
        samples = [0] * n
        t0 = clock()
        for i in range(n):
            s = perf_ns()
            ref.cast_nowait(Crash())
            await ref.call(Echo(i))
            samples[i] = perf_ns() - s
        elapsed = clock() - t0
        restarts = ref._cell.restarts
    assert restarts == n, (restarts, n)
    return {
        "restart_us": elapsed / n * 1e6,
        "restart_p50_us": _percentile(samples, 50) / 1e3,
        "restart_p99_us": _percentile(samples, 99) / 1e3,
    }


async def kernel_group_restart(n: int) -> dict[str, float]:
    """G4b: one_for_all, a crash of the first of GROUP children until the last one has been
    restarted; per affected child."""
    async with open_actor_system("bench") as system:
        specs = [ChildSpec(f"w{i}", Sink) for i in range(GROUP)]
        sup = Supervisor(specs, strategy=ONE_FOR_ALL, intensity=10**9, period=1.0)
        await system.spawn(sup, "sup")
        first = system.lookup("/sup/w0")
        last_path = f"/sup/w{GROUP - 1}"
        last = system.lookup(last_path)
        done = trio.Event()

        def hook(event: Any) -> None:
            if type(event) is Restarted and event.path == last_path:
                done.set()

        system.events.add_hook(hook)
        t0 = clock()
        for i in range(n):
            done = trio.Event()
            first.cast_nowait(Crash())
            await done.wait()
            await last.call(Echo(i))
        elapsed = clock() - t0
    return {"one_for_all_per_child_us": elapsed / n / GROUP * 1e6}


def _tree_spec(supervisors: int, workers: int) -> Supervisor:
    leaves = [ChildSpec(f"w{j}", Idle) for j in range(workers)]
    groups = [ChildSpec(f"s{i}", Supervisor, args=(leaves,)) for i in range(supervisors)]
    return Supervisor(groups)


async def kernel_tree_memory(sizes: Sizes) -> dict[str, float]:
    """G5: tracemalloc size of the whole tree (root + supervisors + workers), per actor."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async with open_actor_system("bench") as system:
            root = await system.spawn(_tree_spec(sizes.memory_supervisors, sizes.workers), "root")
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - base
            actors = len(system)
            await system.stop(root)
    finally:
        tracemalloc.stop()
    return {"tree_kb_per_actor": used / actors / 1024, "tree_memory_actors": actors}


async def kernel_tree(sizes: Sizes, plain: _PlainNode) -> dict[str, float]:
    """G5b-d: build the tree (GC on), snapshot it as JSON (and the snapshot floor, on the same
    heap), stop it in reverse order."""
    gc.collect()
    encoder = msgspec.json.Encoder()
    async with open_actor_system("bench") as system:
        spec = _tree_spec(sizes.supervisors, sizes.workers)
        t0 = clock()
        root = await system.spawn(spec, "root")
        build = clock() - t0
        actors = len(system)
        await trio.testing.wait_all_tasks_blocked()
        # The floor is measured with the tree alive, so that both see the same heap; each
        # starts from a collected heap, so that neither pays for the other's garbage.
        gc.collect()
        floor = _snapshot_floor(plain, encoder)
        gc.collect()
        t0 = clock()
        snapshot = system.tree()
        blob = encoder.encode(snapshot)
        snap = clock() - t0
        assert snapshot.count == actors, (snapshot.count, actors)
        # a call to one worker, so that the tree is known to serve before it is stopped
        assert await system.lookup("/root/s0/w0").call(Echo(7)) == 7
        gc.collect()
        t0 = clock()
        await system.stop(root)
        stop = clock() - t0
        left = len(system)
    assert left == 0, left
    return {
        "tree_build_s": build,
        "tree_snapshot_s": snap,
        "tree_stop_s": stop,
        "tree_actors": actors,
        "tree_snapshot_bytes": len(blob),
        "snapshot_floor_s": floor,
    }


# -- the runner -------------------------------------------------------------------------------


def _percentile(samples: list[int], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return float(ordered[index])


Case = Callable[[], Awaitable[dict[str, float]]]


def _groups(sizes: Sizes, plain: _PlainNode) -> list[tuple[int, list[Case]]]:
    """Each raw case with the kernel cases it anchors, and how often to repeat the group.

    The short cases (a fraction of a second each) are repeated within a run, interleaved,
    and the best figure of each counts: on a shared machine interference only ever makes a
    case slower, so the best is the most repeatable estimate. The tree cases run once.
    """
    n = sizes
    return [
        (
            n.repeats,
            [
                lambda: raw_throughput(n.messages),
                lambda: kernel_cast(n.messages),
                lambda: kernel_burst(n.burst),
            ],
        ),
        (
            n.repeats,
            [
                lambda: raw_round_trip(n.round_trips),
                lambda: kernel_call(n.round_trips, DEFAULT_TIMEOUT, "call"),
                lambda: kernel_call(n.round_trips, None, "call_no_timeout"),
            ],
        ),
        (
            n.repeats,
            [
                lambda: raw_restart(n.restarts),
                lambda: kernel_restart(n.restarts),
                lambda: kernel_group_restart(n.group_restarts),
            ],
        ),
        (1, [lambda: raw_spawn(n.spawns), lambda: raw_stop(n.stops)]),
        (1, [lambda: kernel_tree(n, plain)]),
        (1, [lambda: raw_memory(n.idle_tasks), lambda: kernel_tree_memory(n)]),
    ]


def _better(key: str, old: float, new: float) -> float:
    if key.endswith("_per_s"):
        return max(old, new)
    if key.endswith(("_us", "_s")):
        return min(old, new)
    return new


async def _run_once(sizes: Sizes, plain: _PlainNode) -> dict[str, float]:
    row: dict[str, float] = {}
    for repeats, cases in _groups(sizes, plain):
        for _ in range(repeats):
            for case in cases:
                gc.collect()
                for key, value in (await case()).items():
                    row[key] = _better(key, row[key], value) if key in row else value
    return row


async def _measure(sizes: Sizes, runs: int, warmup: Sizes) -> list[dict[str, float]]:
    say("warming up")
    await _run_once(warmup, _plain_tree(warmup))
    plain = _plain_tree(sizes)
    results: list[dict[str, float]] = []
    for run in range(runs):
        t_run = perf()
        row = await _run_once(sizes, plain)
        results.append(row)
        say(
            f"run {run + 1}/{runs} ({perf() - t_run:.1f} s): "
            f"cast {row['cast_msg_per_s'] / row['T_raw_msg_per_s']:.2f}x "
            f"burst {row['burst_msg_per_s'] / row['T_raw_msg_per_s']:.1f}x "
            f"call {row['call_us'] / row['RTT_raw_us']:.2f}x "
            f"restart {row['restart_us'] / row['RTT_raw_us']:.2f}x RTT "
            f"tree build {row['tree_build_s']:.2f} s stop {row['tree_stop_s']:.2f} s "
            f"mem {row['tree_kb_per_actor'] / row['MEM_raw_kb']:.2f}x"
        )
    return results


# ratio name -> (numerator, denominator); each is taken within a run, then the median
RATIOS: dict[str, tuple[str, str]] = {
    "cast_vs_raw": ("cast_msg_per_s", "T_raw_msg_per_s"),
    "burst_vs_raw": ("burst_msg_per_s", "T_raw_msg_per_s"),
    "call_vs_raw": ("call_us", "RTT_raw_us"),
    "call_p99_vs_raw_p99": ("call_p99_us", "RTT_raw_p99_us"),
    "call_no_timeout_vs_raw": ("call_no_timeout_us", "RTT_raw_us"),
    "restart_vs_raw_rtt": ("restart_us", "RTT_raw_us"),
    "restart_vs_raw_restart": ("restart_us", "RESTART_raw_us"),
    "one_for_all_per_child_vs_raw_rtt": ("one_for_all_per_child_us", "RTT_raw_us"),
    "tree10k_kb_per_actor_vs_raw": ("tree_kb_per_actor", "MEM_raw_kb"),
    "tree10k_kb_per_actor_vs_raw_start_soon": ("tree_kb_per_actor", "MEM_raw_start_soon_kb"),
    "tree10k_snapshot_vs_floor": ("tree_snapshot_s", "snapshot_floor_s"),
}

# goal name -> (operator, target): docs/actors.md §5.8
GOALS: dict[str, tuple[str, float]] = {
    "cast_vs_raw": (">=", 0.8),  # G1
    "burst_vs_raw": (">=", 10.0),  # G2
    "call_vs_raw": ("<=", 1.2),  # G3
    "call_no_timeout_vs_raw": ("<=", 1.0),  # G3, no timeout
    "call_p99_vs_raw_p99": ("<=", 2.0),  # G3, tail
    "restart_vs_raw_rtt": ("<=", 4.0),  # G4
    "one_for_all_per_child_vs_raw_rtt": ("<=", 5.0),  # G4b
    "tree10k_kb_per_actor_vs_raw": ("<=", 1.5),  # G5
    "tree10k_build_s": ("<=", 1.0),  # G5b, on this machine
    "tree10k_build_per_actor_vs_raw_spawn": ("<=", 5.0),  # G5b
    "tree10k_stop_s": ("<=", 0.5),  # G5c, on this machine
    "tree10k_stop_per_actor_vs_raw_stop": ("<=", 2.0),  # G5c
    "tree10k_snapshot_vs_floor": ("<=", 4.0),  # G5d
}

RAW_KEYS = [
    "T_raw_msg_per_s",
    "RTT_raw_us",
    "RTT_raw_p50_us",
    "RTT_raw_p99_us",
    "SPAWN_raw_us",
    "STOP_raw_us",
    "MEM_raw_kb",
    "MEM_raw_start_soon_kb",
    "RESTART_raw_us",
    "snapshot_floor_s",
]
KERNEL_KEYS = [
    "cast_msg_per_s",
    "burst_msg_per_s",
    "burst_awaits_per_msg",
    "call_us",
    "call_p50_us",
    "call_p99_us",
    "call_no_timeout_us",
    "call_no_timeout_p99_us",
    "restart_us",
    "restart_p50_us",
    "restart_p99_us",
    "one_for_all_per_child_us",
    "tree_actors",
    "tree_kb_per_actor",
    "tree_memory_actors",
    "tree_build_s",
    "tree_snapshot_s",
    "tree_snapshot_bytes",
    "tree_stop_s",
]


def _summarise(
    results: list[dict[str, float]], sizes: Sizes, quick: bool, elapsed: float
) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in results)

    def spread(values: list[float]) -> list[float]:
        return [min(values), max(values)]

    per_run: dict[str, list[float]] = {}
    for name, (num, den) in RATIOS.items():
        per_run[name] = [r[num] / r[den] for r in results]
    per_run["tree10k_build_per_actor_vs_raw_spawn"] = [
        r["tree_build_s"] / r["tree_actors"] * 1e6 / r["SPAWN_raw_us"] for r in results
    ]
    per_run["tree10k_stop_per_actor_vs_raw_stop"] = [
        r["tree_stop_s"] / r["tree_actors"] * 1e6 / r["STOP_raw_us"] for r in results
    ]
    for key, name in (
        ("tree_build_s", "tree10k_build_s"),
        ("tree_stop_s", "tree10k_stop_s"),
        ("tree_snapshot_s", "tree10k_snapshot_s"),
    ):
        per_run[name] = [r[key] for r in results]

    out: dict[str, Any] = {
        "benchmark": "actors",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "trio": trio.__version__,
        "msgspec": msgspec.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gc_enabled": gc.isenabled(),
        "runs": len(results),
        "quick": quick,
        "sizes": {**sizes.__dict__, "group": GROUP, "tree_mailbox": MAILBOX_TREE},
        "elapsed_s": round(elapsed, 2),
    }
    for name, values in per_run.items():
        out[name] = _round(statistics.median(values))
    out["raw"] = {key: _round(median(key)) for key in RAW_KEYS}
    out["kernel"] = {key: _round(median(key)) for key in KERNEL_KEYS}
    out["spread"] = {name: [_round(v) for v in spread(values)] for name, values in per_run.items()}
    goals: dict[str, dict[str, Any]] = {}
    for name, (op, target) in GOALS.items():
        value = out[name]
        met = value >= target if op == ">=" else value <= target
        goals[name] = {"value": value, "goal": target, "op": op, "met": met}
    out["goals"] = goals
    out["per_run"] = [{key: _round(value) for key, value in row.items()} for row in results]
    out["goals_met"] = sum(1 for g in goals.values() if g["met"])
    out["goals_total"] = len(goals)
    return out


def _round(value: float) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    digits = max(0, 4 - math.floor(math.log10(abs(value))))
    return round(value, digits)


def _table(out: dict[str, Any]) -> str:
    lines = [
        f"actor kernel benchmark: Python {out['python']}, trio {out['trio']}, "
        f"msgspec {out['msgspec']}, {out['cpus']} CPUs, {out['runs']} runs"
        f"{' (QUICK: rough numbers)' if out['quick'] else ''}, {out['elapsed_s']} s",
        f"timed by the {out['clock']} clock (percentiles by the wall clock); this process had"
        f" {out['cpu_share']:.0%} of a CPU (near 100% on a quiet machine)",
        "",
        "raw trio baselines (median)",
    ]
    for key, value in out["raw"].items():
        lines.append(f"  {key:<34} {value:>12}")
    lines += ["", "kernel (median)"]
    for key, value in out["kernel"].items():
        lines.append(f"  {key:<34} {value:>12}")
    lines += ["", f"goals (median of per-run values; {out['goals_met']}/{out['goals_total']} met)"]
    lines.append(f"  {'name':<38} {'value':>10}  {'goal':<8} {'min..max':<22} met")
    for name, goal in out["goals"].items():
        lo, hi = out["spread"][name]
        lines.append(
            f"  {name:<38} {goal['value']:>10}  {goal['op']} {goal['goal']:<5} "
            f"{f'{lo}..{hi}':<22} {'yes' if goal['met'] else 'NO'}"
        )
    lines += ["", "other figures (median of per-run values; no goal)"]
    for name, (lo, hi) in out["spread"].items():
        if name not in out["goals"]:
            lines.append(f"  {name:<38} {out[name]:>10}  {'':<8} {f'{lo}..{hi}':<22}")
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--runs", type=int, default=None, help="runs to take the median of (5)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run; rough numbers")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="time the cases by this thread's CPU time (default; robust on a shared machine) "
        "or by the wall clock",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    sizes = QUICK if args.quick else FULL
    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    warmup = Sizes(
        messages=1_000,
        burst=2_000,
        round_trips=500,
        spawns=200,
        stops=200,
        restarts=100,
        group_restarts=10,
        idle_tasks=100,
        supervisors=5,
        workers=20,
        repeats=1,
        memory_supervisors=5,
    )
    t0, c0 = perf(), time.thread_time()
    results = trio.run(_measure, sizes, runs, warmup)
    wall, cpu = perf() - t0, time.thread_time() - c0
    out = _summarise(results, sizes, args.quick, wall)
    out["clock"] = args.clock
    out["percentiles_clock"] = "wall"
    out["cpu_share"] = _round(cpu / wall)  # near 1 on a quiet machine
    if args.json:
        print(json.dumps(out))
    else:
        print(_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
