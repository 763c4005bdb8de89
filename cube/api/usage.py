"""A sandbox's resource use, sampled on the host for ``GET /sandboxes/{id}/metrics``.

From the sandbox's cgroup when its driver made one (``memory.current``, ``cpu.stat``), else
from ``/proc`` for its process tree. CPU use is the average since the previous sample of the
same sandbox (since its start for the first one). Runs in a worker thread: it reads files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from supervisors.reaper import tree_pids

from ..store import SandboxRecord
from .shapes import SandboxMetric, rfc3339

__all__ = ["UsageSampler"]

_MIB = 1 << 20
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_usage(cgroup: str) -> tuple[float, int, int] | None:
    """(cpu seconds, memory bytes, page cache bytes) of a cgroup v2 directory."""
    base = Path(cgroup)
    cpu = _read(base / "cpu.stat")
    memory = _read(base / "memory.current")
    if cpu is None or memory is None:
        return None
    usec = 0
    for line in cpu.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            usec = int(value)
    cache = 0
    for line in (_read(base / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "file":
            cache = int(value)
    return usec / 1e6, int(memory.strip() or 0), cache


def _proc_usage(pid: int) -> tuple[float, int, int]:
    """(cpu seconds, resident bytes, 0) of a process tree from /proc."""
    cpu = 0.0
    rss = 0
    for member in tree_pids(pid) if pid > 0 else []:
        stat = _read(Path(f"/proc/{member}/stat"))
        statm = _read(Path(f"/proc/{member}/statm"))
        if stat is None or statm is None:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / _TICKS
        rss += int(statm.split()[1]) * _PAGE
    return cpu, rss, 0


def _disk_used(directory: str | None, limit: int = 20000) -> int:
    """Bytes allocated under ``directory`` (at most ``limit`` entries are looked at)."""
    if not directory:
        return 0
    used = 0
    seen = 0
    for root, dirs, files in os.walk(directory):
        for name in files:
            seen += 1
            if seen > limit:
                return used
            try:
                used += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return used


class UsageSampler:
    """Samples sandboxes' resource use; remembers each one's previous CPU reading."""

    def __init__(self, max_tracked: int = 4096) -> None:
        self._previous: dict[str, tuple[float, float]] = {}
        self._max = max_tracked

    def _sample(self, record: SandboxRecord) -> SandboxMetric:
        now = time.time()
        instance = record.instance
        usage = None
        if instance is not None:
            for cgroup in instance.cgroups:
                usage = _cgroup_usage(cgroup)
                if usage is not None:
                    break
            if usage is None:
                usage = _proc_usage(instance.pid)
        cpu, memory, cache = usage or (0.0, 0, 0)
        since, cpu_before = self._previous.get(record.id, (record.started_at, 0.0))
        elapsed = max(now - since, 1e-3)
        percent = max(0.0, min(100.0, (cpu - cpu_before) / elapsed / record.cpu_count * 100))
        if len(self._previous) >= self._max:
            self._previous.clear()
        self._previous[record.id] = (now, cpu)
        disk = _disk_used(instance.state_dir if instance else None)
        return SandboxMetric(
            timestamp=rfc3339(now),
            timestampUnix=int(now),
            cpuCount=record.cpu_count,
            cpuUsedPct=round(percent, 2),
            memUsed=memory,
            memTotal=record.memory_mb * _MIB,
            memCache=cache,
            diskUsed=disk,
            diskTotal=record.disk_mb * _MIB,
        )

    async def sample(self, record: SandboxRecord) -> SandboxMetric:
        """One reading of ``record``'s sandbox, taken now."""
        return await trio.to_thread.run_sync(self._sample, record)

    def forget(self, sandbox_id: str) -> None:
        self._previous.pop(sandbox_id, None)
