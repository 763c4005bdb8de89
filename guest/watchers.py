"""Directory watchers: one `Watcher` per watch, fed by inotify, kqueue or polling.

Backends, picked once per envd (``--watcher``):

* ``inotify`` (Linux): the kernel's events through ctypes, one inotify instance per watcher,
  one watch per directory when recursive. Events map the way Go's fsnotify (used by E2B's envd)
  maps them: create and moved-to are CREATE, modify is WRITE, delete is REMOVE, moved-from is
  RENAME, attrib is CHMOD.
* ``kqueue`` (FreeBSD, macOS): vnode events wake the watcher, which then diffs a snapshot of
  the tree, since kqueue says *that* a directory changed but not *what*.
* ``poll`` (anywhere): the same snapshot diff on a timer.

A stream watch (``fs.watch``) delivers each event to its request under flow control: when the
host is slow the watcher stops reading, and the kernel's bounded queue absorbs (or drops) the
rest. A polled watcher (``fs.watcher.create``) keeps a bounded buffer that drops its oldest
events when the host does not poll.
"""

import collections
import contextlib
import logging
import os
import select
import stat
import struct
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from actors import Actor, ActorRef, ExitReason, Failure
from guest import protocol
from guest.channel import Call, Handler, Reply, Sink
from guest.files import EntryMaker, translated
from guest.protocol import EventType, FsEvent, GuestError, Internal, InvalidArgument, NotFound
from guest.users import Account, Accounts
from supervisors import ChildNotFound, ChildStartFailed, start_dynamic_child, terminate_child

log = logging.getLogger("guest.watchers")

# Events a polled watcher keeps between polls before it drops the oldest.
POLLED_BUFFER = 4096

RawEvent = tuple[str, EventType]

# The kqueue names exist only on BSD and macOS builds of Python.
_select: Any = select


class EventSource(Protocol):
    """Where a watcher's raw events come from."""

    async def next_batch(self) -> list[RawEvent]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Snapshots (the poll and kqueue backends)


@dataclass(frozen=True, slots=True)
class _Seen:
    ino: int
    dev: int
    is_dir: bool
    mtime: int
    size: int
    mode: int
    uid: int
    gid: int


def snapshot(root: str, recursive: bool) -> dict[str, _Seen]:
    """What is under ``root`` now, by path relative to it (symlinks are not followed)."""
    seen: dict[str, _Seen] = {}

    def visit(directory: str, prefix: str) -> None:
        try:
            it = os.scandir(directory)
        except OSError:
            return
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                name = prefix + entry.name
                is_dir = stat.S_ISDIR(st.st_mode)
                seen[name] = _Seen(
                    st.st_ino,
                    st.st_dev,
                    is_dir,
                    st.st_mtime_ns,
                    st.st_size,
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                )
                if recursive and is_dir:
                    visit(entry.path, name + "/")

    visit(root, "")
    return seen


def diff(old: dict[str, _Seen], new: dict[str, _Seen]) -> list[RawEvent]:
    """The events that turn snapshot ``old`` into ``new``, as inotify would have reported them.

    A path that disappeared while the same inode appeared elsewhere is a rename: RENAME for the
    old name and CREATE for the new one.
    """
    events: list[RawEvent] = []
    removed = sorted(old.keys() - new.keys())
    created = sorted(new.keys() - old.keys())
    by_inode = {(new[name].dev, new[name].ino): name for name in created}
    renamed_to: set[str] = set()
    for name in removed:
        target = by_inode.get((old[name].dev, old[name].ino))
        if target is not None and target not in renamed_to:
            renamed_to.add(target)
            events.append((name, EventType.RENAME))
        else:
            events.append((name, EventType.REMOVE))
    events.extend((name, EventType.CREATE) for name in created)
    for name in sorted(old.keys() & new.keys()):
        before, after = old[name], new[name]
        if (before.ino, before.dev) != (after.ino, after.dev):
            events.append((name, EventType.REMOVE))
            events.append((name, EventType.CREATE))
            continue
        if not after.is_dir and (before.mtime, before.size) != (after.mtime, after.size):
            events.append((name, EventType.WRITE))
        if (before.mode, before.uid, before.gid) != (after.mode, after.uid, after.gid):
            events.append((name, EventType.CHMOD))
    return events


class PollSource:
    """Diffs snapshots of the tree every ``interval`` seconds."""

    def __init__(self, root: str, recursive: bool, interval: float) -> None:
        self._root = root
        self._recursive = recursive
        self._interval = interval
        self._seen = snapshot(root, recursive)

    async def next_batch(self) -> list[RawEvent]:
        """Wait for the next non-empty difference."""
        while True:
            await trio.sleep(self._interval)
            if not os.path.isdir(self._root):
                self._seen = {}
                return [("", EventType.REMOVE)]
            current = snapshot(self._root, self._recursive)
            events = diff(self._seen, current)
            self._seen = current
            if events:
                return events

    def close(self) -> None:
        """Nothing to release."""


class KqueueSource:  # pragma: no cover - runs on FreeBSD and macOS only
    """kqueue vnode events as wake-ups, snapshot diffs for the details."""

    MAX_FILES = 4096

    def __init__(self, root: str, recursive: bool) -> None:
        self._root = root
        self._recursive = recursive
        self._kq = _select.kqueue()
        self._fds: dict[str, int] = {}
        self._seen = snapshot(root, recursive)
        self._register()

    def _register(self) -> None:
        wanted = {"": self._root}
        files = 0
        for name, seen in self._seen.items():
            if seen.is_dir or files < self.MAX_FILES:
                wanted[name] = os.path.join(self._root, name)
                files += not seen.is_dir
        for name in list(self._fds):
            if name not in wanted:
                os.close(self._fds.pop(name))
        flags = _select.KQ_NOTE_WRITE | _select.KQ_NOTE_DELETE | _select.KQ_NOTE_RENAME
        flags |= _select.KQ_NOTE_ATTRIB | _select.KQ_NOTE_EXTEND
        changes = []
        for name, path in wanted.items():
            if name in self._fds:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            self._fds[name] = fd
            changes.append(
                _select.kevent(
                    fd,
                    filter=_select.KQ_FILTER_VNODE,
                    flags=_select.KQ_EV_ADD | _select.KQ_EV_CLEAR,
                    fflags=flags,
                )
            )
        if changes:
            self._kq.control(changes, 0, 0)

    async def next_batch(self) -> list[RawEvent]:
        """Wait for vnode events, then report what changed."""
        while True:
            await trio.lowlevel.wait_readable(self._kq.fileno())
            self._kq.control(None, 256, 0)
            current = snapshot(self._root, self._recursive)
            events = diff(self._seen, current)
            self._seen = current
            self._register()
            if events:
                return events

    def close(self) -> None:
        """Release the kqueue and every watched descriptor."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._kq.close()


# --------------------------------------------------------------------------------------------
# inotify


class _Inotify:
    """The three inotify calls through ctypes, loaded once per service."""

    IN_MODIFY = 0x00000002
    IN_ATTRIB = 0x00000004
    IN_MOVED_FROM = 0x00000040
    IN_MOVED_TO = 0x00000080
    IN_CREATE = 0x00000100
    IN_DELETE = 0x00000200
    IN_DELETE_SELF = 0x00000400
    IN_MOVE_SELF = 0x00000800
    IN_Q_OVERFLOW = 0x00004000
    IN_IGNORED = 0x00008000
    IN_ONLYDIR = 0x01000000
    IN_DONT_FOLLOW = 0x02000000
    IN_ISDIR = 0x40000000
    WATCH_MASK = (
        IN_MODIFY
        | IN_ATTRIB
        | IN_MOVED_FROM
        | IN_MOVED_TO
        | IN_CREATE
        | IN_DELETE
        | IN_DELETE_SELF
        | IN_MOVE_SELF
        | IN_ONLYDIR
    )

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            err = self._ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    def open(self) -> int:
        """A new non-blocking, close-on-exec inotify descriptor."""
        return self._check(self._init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")

    def add(self, fd: int, path: str) -> int:
        """Watch directory ``path``; returns the watch descriptor."""
        return self._check(self._add(fd, os.fsencode(path), self.WATCH_MASK), path)


class InotifySource:
    """One inotify instance watching a directory (and, if recursive, every one below)."""

    _HEADER = struct.Struct("iIII")

    def __init__(self, api: _Inotify, root: str, recursive: bool) -> None:
        self._api = api
        self._root = root
        self._recursive = recursive
        self._fd = api.open()
        self._dirs: dict[int, str] = {}  # watch descriptor -> path relative to root
        try:
            self._watch_tree(root, "")
        except BaseException:
            os.close(self._fd)
            raise

    def _watch_tree(self, path: str, relative: str) -> None:
        try:
            wd = self._api.add(self._fd, path)
        except OSError:
            if relative == "":
                raise
            return  # a subdirectory that vanished or is unreadable
        self._dirs[wd] = relative
        if not self._recursive:
            return
        try:
            with os.scandir(path) as it:
                subdirs = [e for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for entry in subdirs:
            self._watch_tree(entry.path, f"{relative}{entry.name}/" if relative else entry.name + "/")

    async def next_batch(self) -> list[RawEvent]:
        """Wait for and translate the next batch of kernel events."""
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            events = self._translate(data)
            if events:
                return events

    def _translate(self, data: bytes) -> list[RawEvent]:
        api = self._api
        events: list[RawEvent] = []
        offset = 0
        while offset + self._HEADER.size <= len(data):
            wd, mask, _cookie, length = self._HEADER.unpack_from(data, offset)
            offset += self._HEADER.size
            raw_name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & api.IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed under %s; events were lost", self._root)
                continue
            directory = self._dirs.get(wd)
            if directory is None:
                continue
            if mask & api.IN_IGNORED:
                del self._dirs[wd]
                continue
            name = directory + os.fsdecode(raw_name)
            if not raw_name:
                # An event about a watched directory itself: only the root's matter (its
                # subdirectories were already reported by their parent).
                if directory == "":
                    if mask & api.IN_DELETE_SELF:
                        events.append(("", EventType.REMOVE))
                    elif mask & api.IN_MOVE_SELF:
                        events.append(("", EventType.RENAME))
                    elif mask & api.IN_ATTRIB:
                        events.append(("", EventType.CHMOD))
                continue
            if mask & (api.IN_CREATE | api.IN_MOVED_TO):
                events.append((name, EventType.CREATE))
                if self._recursive and mask & api.IN_ISDIR:
                    self._watch_tree(os.path.join(self._root, name), name + "/")
            if mask & api.IN_MODIFY:
                events.append((name, EventType.WRITE))
            if mask & api.IN_DELETE:
                events.append((name, EventType.REMOVE))
            if mask & api.IN_MOVED_FROM:
                events.append((name, EventType.RENAME))
            if mask & api.IN_ATTRIB:
                events.append((name, EventType.CHMOD))
        return events

    def close(self) -> None:
        """Release the inotify descriptor (and with it every watch)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------------------------
# One watcher


class WatchRecord:
    """What envd knows about one watch; survives its actor's restarts."""

    def __init__(
        self,
        root: str,
        recursive: bool,
        include_entry: bool,
        account: Account,
        sink: Sink | None,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self.account = account
        self.sink = sink  # a stream watch's request; None for a polled watcher
        self.buffer: collections.deque[FsEvent] = collections.deque(maxlen=POLLED_BUFFER)
        self.ended = trio.Event()  # a stream watch's subscriber went away, or it failed
        self.failure: str | None = None

    def drain(self) -> list[FsEvent]:
        """Take the events collected since the last poll."""
        events = list(self.buffer)
        self.buffer.clear()
        return events


class WatcherActor(Actor[Any]):
    """Watches one directory: ``init`` opens the backend, a background task delivers events.

    A stream watch sends each event to its request (``start`` first) and stops when the request
    goes away. A polled watcher appends to a bounded buffer. A crash (an error from the
    backend) restarts a polled watcher with a fresh source; a stream watch just ends.
    """

    background_tasks = True

    def __init__(self, service: "WatchService", record: WatchRecord) -> None:
        self._service = service
        self._record = record
        self._entries = EntryMaker()
        self._source: EventSource | None = None

    async def init(self) -> None:
        self._source = self._service.open_source(self._record)
        self.ctx.start_soon(self._deliver, self._source)

    async def terminate(self, reason: ExitReason) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if type(reason) is Failure:
            self._record.failure = f"{type(reason.error).__name__}: {reason.error}"
        if self._record.sink is not None:
            self._record.ended.set()

    def _event(self, name: str, kind: EventType) -> FsEvent:
        record = self._record
        entry = None
        if record.include_entry and kind in (EventType.CREATE, EventType.WRITE, EventType.CHMOD):
            path = os.path.join(record.root, name) if name else record.root
            accounts = self._service.accounts
            with contextlib.suppress(OSError), accounts.filesystem_identity(record.account):
                entry = self._entries.from_path(path)
        return FsEvent(name=name, type=kind, entry=entry)

    async def _deliver(self, source: EventSource) -> None:
        sink = self._record.sink
        try:
            if sink is not None and not await sink.emit("start", protocol.Empty()):
                return
            while True:
                for name, kind in await source.next_batch():
                    event = self._event(name, kind)
                    if sink is None:
                        self._record.buffer.append(event)
                    elif not await sink.emit("event", event):
                        return
        finally:
            if sink is not None and sink.closed:
                self.ctx.stop()


# --------------------------------------------------------------------------------------------
# The service


def pick_backend(name: str) -> str:
    """The watcher backend to use: ``auto`` becomes the best one this platform has."""
    if name != "auto":
        return name
    platform: str = sys.platform  # a plain str: type checkers keep every platform's branch
    if platform.startswith("linux"):
        return "inotify"
    return "kqueue" if hasattr(select, "kqueue") else "poll"


class WatchService:
    """Answers ``fs.watch`` and the polled ``fs.watcher.*`` ops, starting watcher actors."""

    def __init__(self, accounts: Accounts, backend: str = "auto", interval: float = 0.2) -> None:
        self.accounts = accounts
        self.backend = pick_backend(backend)
        self._interval = interval
        self._inotify = _Inotify() if self.backend == "inotify" else None
        self._polled: dict[str, WatchRecord] = {}
        self.streams: ActorRef[Any] | None = None  # DynamicSupervisor of stream watches
        self.polled: ActorRef[Any] | None = None  # DynamicSupervisor of polled watchers

    @property
    def handlers(self) -> dict[str, Handler]:
        """The ops this service answers."""
        return {
            "fs.watch": Handler(self.watch),
            "fs.watcher.create": Handler(self.create),
            "fs.watcher.events": Handler(self.events, inline=True),
            "fs.watcher.remove": Handler(self.remove),
        }

    def open_source(self, record: WatchRecord) -> EventSource:
        """Open a backend source on the record's directory, with the user's rights to read it."""
        root = record.root
        with translated(root), self.accounts.filesystem_identity(record.account):
            if not stat.S_ISDIR(os.stat(root).st_mode):
                raise InvalidArgument(f"path is not a directory: {root}")
            if self._inotify is not None:
                return InotifySource(self._inotify, root, record.recursive)
            if self.backend == "kqueue":
                return KqueueSource(root, record.recursive)
            return PollSource(root, record.recursive, self._interval)

    async def _start(self, supervisor: ActorRef[Any] | None, record: WatchRecord) -> None:
        assert supervisor is not None
        try:
            await start_dynamic_child(supervisor, record, id=record.id)
        except ChildStartFailed as exc:
            if isinstance(exc.cause, GuestError):
                raise exc.cause from None
            raise Internal(f"cannot watch {record.root}: {exc.cause}") from None

    def _record(self, args: protocol.FsWatch, sink: Sink | None) -> WatchRecord:
        account = self.accounts.resolve(args.user)
        root = self.accounts.resolve_path(account, args.path)
        return WatchRecord(root, args.recursive, args.include_entry, account, sink)

    async def watch(self, call: Call, args: protocol.FsWatch) -> None:
        """``fs.watch``: ``start``, then one ``event`` per change until cancelled."""
        record = self._record(args, call)
        await self._start(self.streams, record)
        try:
            await record.ended.wait()
        finally:
            assert self.streams is not None
            with trio.CancelScope(shield=True), contextlib.suppress(ChildNotFound):
                await terminate_child(self.streams, record.id, timeout=10)
        if record.failure is not None:
            raise Internal(f"watching {record.root} failed: {record.failure}")

    async def create(self, call: Call, args: protocol.FsWatch) -> protocol.WatcherId:
        """``fs.watcher.create``: start a polled watcher; its events wait for ``events``."""
        record = self._record(args, None)
        await self._start(self.polled, record)
        self._polled[record.id] = record
        return protocol.WatcherId(watcher_id=record.id)

    def _get(self, watcher_id: str) -> WatchRecord:
        record = self._polled.get(watcher_id)
        if record is None:
            raise NotFound(f"watcher with id {watcher_id} not found")
        return record

    def events(self, reply: Reply, args: protocol.WatcherId) -> None:
        """``fs.watcher.events``: the events since the last poll."""
        reply.ok(protocol.WatcherEvents(events=self._get(args.watcher_id).drain()))

    async def remove(self, call: Call, args: protocol.WatcherId) -> None:
        """``fs.watcher.remove``: stop and forget a polled watcher."""
        record = self._get(args.watcher_id)
        del self._polled[args.watcher_id]
        assert self.polled is not None
        with contextlib.suppress(ChildNotFound):
            await terminate_child(self.polled, record.id, timeout=10)
