"""Measure the journal's write rates against baselines taken in the same run.

    .venv/bin/python tests/cube/store/journal_rates.py [--json]

Baselines: plain sqlite3 in a loop (one transaction per insert, no trio, no thread) and one
``trio.to_thread.run_sync`` round trip (the floor of any write that leaves the loop). Then
the journal: one writer awaiting each insert ("single"), 64 concurrent writers ("batched"),
and 64 concurrent callers through the ``Store`` actor, each with synchronous NORMAL and FULL.
Not a test module: pytest does not collect it. docs/store.md quotes its output.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from store_kit import record

from actors import open_actor_system
from cube.drivers.base import Instance
from cube.store import Insert, Journal, Phase, SandboxRecord, Store, Synchronous
from cube.store.records import encode_record

COUNT = 3000
WRITERS = 64


def sandbox() -> SandboxRecord:
    """A record as a bound ns sandbox has it (about 0.6 KB of JSON)."""
    slot = "slot-0042"
    return record(
        state=Phase.RUNNING,
        driver="ns",
        instance=Instance(
            slot_id=slot,
            driver="ns",
            pid=123456,
            envd=f"unix:/var/lib/cube/slots/{slot}/envd.sock",
            state_dir=f"/var/lib/cube/slots/{slot}",
            root=f"/var/lib/cube/slots/{slot}/root",
            cgroups=[f"/sys/fs/cgroup/cube/{slot}"],
            netns=f"cube-{slot}",
            host_if="cbv0042",
            ip="10.77.0.42",
        ),
        metadata={"app": "prod", "user": "alice"},
        env_vars={"FOO": "bar", "PATH": "/usr/local/bin:/usr/bin:/bin"},
        end_at=time.time() + 300,
        envd_version="0.6.13",
        envd_access_token="x" * 32,
        client_id="cube",
    )


def plain_sqlite(path: Path, synchronous: Synchronous, records: list[SandboxRecord]) -> float:
    """Inserts per second of bare sqlite3, one autocommit insert each, on this thread."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, record TEXT)")
    started = time.perf_counter()
    for r in records:
        conn.execute("INSERT INTO t VALUES (?, ?)", (r.id, encode_record(r).decode()))
    elapsed = time.perf_counter() - started
    conn.close()
    return len(records) / elapsed


async def thread_hop_rate() -> float:
    """Round trips per second through one ``to_thread.run_sync`` with a limiter of one."""
    limiter = trio.CapacityLimiter(1)
    started = time.perf_counter()
    for _ in range(COUNT):
        await trio.to_thread.run_sync(int, limiter=limiter)
    return COUNT / (time.perf_counter() - started)


async def concurrently(
    writers: int, records: list[SandboxRecord], write: Callable[[SandboxRecord], Awaitable[Any]]
) -> float:
    """Writes per second with ``writers`` tasks sharing ``records``."""

    async def worker(share: list[SandboxRecord]) -> None:
        for r in share:
            await write(r)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(writers):
            nursery.start_soon(worker, records[k::writers])
    return len(records) / (time.perf_counter() - started)


async def journal_rates(directory: Path, synchronous: Synchronous) -> dict[str, float]:
    rates: dict[str, float] = {}
    async with Journal.open(
        directory / f"journal-{synchronous}.db", synchronous=synchronous
    ) as journal:
        rates["single"] = await concurrently(1, [sandbox() for _ in range(COUNT)], journal.insert)
        before = journal.stats()
        rates["batched"] = await concurrently(
            WRITERS, [sandbox() for _ in range(COUNT)], journal.insert
        )
        after = journal.stats()
        rates["batched_writes_per_tx"] = (after.writes - before.writes) / (
            after.transactions - before.transactions
        )
    async with open_actor_system("rates") as system:
        store = await system.spawn(
            Store(directory / f"store-{synchronous}.db", synchronous=synchronous), "store"
        )

        async def call(r: SandboxRecord) -> Any:
            return await store.call(Insert(r))

        rates["actor_single"] = await concurrently(1, [sandbox() for _ in range(COUNT)], call)
        rates["actor_batched"] = await concurrently(
            WRITERS, [sandbox() for _ in range(COUNT)], call
        )
    return rates


async def main() -> dict[str, Any]:
    results: dict[str, Any] = {"count": COUNT, "writers": WRITERS}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        results["thread_hop_per_s"] = await thread_hop_rate()
        for synchronous in ("NORMAL", "FULL"):
            sync: Synchronous = synchronous
            rows = [sandbox() for _ in range(COUNT)]
            base = plain_sqlite(directory / f"plain-{synchronous}.db", sync, rows)
            rates = await journal_rates(directory, sync)
            results[synchronous] = {
                "plain_sqlite_per_s": base,
                **{f"{k}_per_s" if "per_tx" not in k else k: v for k, v in rates.items()},
                "batched_vs_plain": rates["batched"] / base,
                "single_vs_thread_hop": rates["single"] / results["thread_hop_per_s"],
            }
    return results


def show(results: dict[str, Any]) -> str:
    lines = [
        f"{results['count']} inserts per case, {results['writers']} concurrent writers when batched",
        f"to_thread round trips: {results['thread_hop_per_s']:,.0f}/s",
    ]
    for mode in ("NORMAL", "FULL"):
        r = results[mode]
        lines.append(
            f"synchronous={mode}: plain sqlite3 {r['plain_sqlite_per_s']:,.0f}/s | journal single "
            f"{r['single_per_s']:,.0f}/s, batched {r['batched_per_s']:,.0f}/s "
            f"({r['batched_writes_per_tx']:.0f} writes/tx, {r['batched_vs_plain']:.2f}x plain) | "
            f"Store actor single {r['actor_single_per_s']:,.0f}/s, batched {r['actor_batched_per_s']:,.0f}/s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    out = trio.run(main)
    print(json.dumps(out, indent=2) if "--json" in sys.argv else show(out))
