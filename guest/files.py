"""The filesystem service: stat, list, make_dir, move, remove, and streamed read and write.

Semantics follow E2B's envd (docs/e2b-protocol.md §3.4 and §9): ``EntryInfo`` mode holds the
permission bits only, permissions are Go's ``FileMode.String()``, owner and group are names,
``make_dir`` of an existing directory is ``already_exists``, ``remove`` of a missing path
succeeds. Every syscall runs with the requesting user's filesystem identity (see
`guest.users`), and relative paths start at that user's home.

Reads and writes are chunked (`protocol.FILE_CHUNK`) and flow-controlled like every stream, so a
100 MB file never sits in memory. Regular-file I/O runs on the event loop one chunk at a time:
a chunk from the page cache costs far less than a hop to a worker thread. Recursive deletes and
cross-device moves, which can take arbitrarily long, run in a worker thread.
"""

import contextlib
import errno
import os
import shutil
import stat
import time
from collections.abc import Iterator

import trio

from guest import protocol
from guest.channel import Call, Handler, Reply
from guest.protocol import (
    AlreadyExists,
    EntryInfo,
    FailedPrecondition,
    FileType,
    GuestError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from guest.users import Account, Accounts, group_name, user_name

METADATA_PREFIX = "user.e2b."
_HAS_XATTR = hasattr(os, "listxattr")


def os_error(exc: OSError, path: str) -> GuestError:
    """The protocol error for an OSError raised while working on ``path``."""
    where = exc.filename if isinstance(exc.filename, str) else path
    match exc.errno:
        case errno.ENOENT:
            return NotFound(f"path not found: {where}")
        case errno.EEXIST:
            return AlreadyExists(f"path already exists: {where}")
        case errno.EACCES | errno.EPERM | errno.EROFS:
            return PermissionDenied(f"permission denied: {where}")
        case errno.ENOTDIR:
            return InvalidArgument(f"not a directory: {where}")
        case errno.EISDIR:
            return InvalidArgument(f"path is a directory: {where}")
        case errno.ENOSPC | errno.EDQUOT:
            return ResourceExhausted(f"not enough disk space: {where}")
        case errno.ELOOP:
            return FailedPrecondition(f"too many levels of symbolic links: {where}")
        case errno.ENAMETOOLONG | errno.EINVAL | errno.ENXIO:
            return InvalidArgument(f"{exc.strerror}: {where}")
        case errno.ENOTEMPTY:
            return FailedPrecondition(f"directory not empty: {where}")
        case _:
            return Internal(f"{exc.strerror or exc}: {where}")


@contextlib.contextmanager
def translated(path: str) -> Iterator[None]:
    """Turn OSErrors raised inside into protocol errors about ``path``."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, path) from None


# --------------------------------------------------------------------------------------------
# EntryInfo

# Go's FileMode.String() letters, in its order: dir, append, exclusive, temporary, symlink,
# device, named pipe, socket, setuid, setgid, char device, sticky, irregular.
def go_mode_string(mode: int) -> str:
    """``mode`` (an ``st_mode``) spelled like Go's ``FileMode.String()``: ``drwxr-xr-x``."""
    kind = ""
    if stat.S_ISDIR(mode):
        kind += "d"
    if stat.S_ISLNK(mode):
        kind += "L"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        kind += "D"
    if stat.S_ISFIFO(mode):
        kind += "p"
    if stat.S_ISSOCK(mode):
        kind += "S"
    if mode & stat.S_ISUID:
        kind += "u"
    if mode & stat.S_ISGID:
        kind += "g"
    if stat.S_ISCHR(mode):
        kind += "c"
    if mode & stat.S_ISVTX:
        kind += "t"
    perms = "".join(
        letter if mode & bit else "-"
        for letter, bit in zip(
            "rwxrwxrwx",
            (0o400, 0o200, 0o100, 0o040, 0o020, 0o010, 0o004, 0o002, 0o001),
            strict=True,
        )
    )
    return (kind or "-") + perms


def rfc3339(ns: int) -> str:
    """A UTC RFC 3339 timestamp as protobuf's JSON writes it (0, 3, 6 or 9 fraction digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        if nanos % 1_000_000 == 0:
            text += f".{nanos // 1_000_000:03d}"
        elif nanos % 1000 == 0:
            text += f".{nanos // 1000:06d}"
        else:
            text += f".{nanos:09d}"
    return text + "Z"


def _file_type(mode: int) -> FileType:
    if stat.S_ISREG(mode):
        return FileType.FILE
    if stat.S_ISDIR(mode):
        return FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return FileType.SYMLINK
    return FileType.UNSPECIFIED


def read_metadata(path: str) -> dict[str, str]:
    """The file's ``user.e2b.*`` xattrs, prefix stripped (empty where xattrs are missing)."""
    if not _HAS_XATTR:
        return {}
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        if name.startswith(METADATA_PREFIX):
            with contextlib.suppress(OSError):
                value = os.getxattr(path, name)
                metadata[name[len(METADATA_PREFIX) :]] = value.decode("utf-8", "replace")
    return metadata


def write_metadata(fd: int, metadata: dict[str, str]) -> None:
    """Replace the file's ``user.e2b.*`` xattrs with ``metadata``."""
    if not _HAS_XATTR:
        raise protocol.Unimplemented("file metadata needs extended attributes")
    for name in os.listxattr(fd):
        if name.startswith(METADATA_PREFIX):
            os.removexattr(fd, name)
    for key, value in metadata.items():
        os.setxattr(fd, METADATA_PREFIX + key.lower(), value.encode())


class EntryMaker:
    """Builds `EntryInfo`s, remembering uid and gid names (a lookup reads /etc/passwd)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def from_stat(self, path: str, st: os.stat_result, *, name: str | None = None) -> EntryInfo:
        """The entry for ``path`` whose ``lstat`` is ``st``."""
        mode = st.st_mode
        target: str | None = None
        if stat.S_ISLNK(mode):
            # As E2B envd: a symlink reports its target's type and permission bits.
            target = os.path.realpath(path)
            try:
                target_mode = os.stat(path).st_mode
                kind = _file_type(target_mode)
                perm = target_mode & 0o777
            except OSError:
                kind, perm = FileType.UNSPECIFIED, 0
        else:
            kind, perm = _file_type(mode), mode & 0o777
        return EntryInfo(
            name=name if name is not None else os.path.basename(path) or path,
            type=kind,
            path=path,
            size=st.st_size,
            mode=perm,
            permissions=go_mode_string(mode),
            owner=user_name(st.st_uid, self._users),
            group=group_name(st.st_gid, self._groups),
            modified_time=rfc3339(st.st_mtime_ns),
            symlink_target=target,
            metadata=read_metadata(path),
            is_symlink=target is not None,
        )

    def from_path(self, path: str) -> EntryInfo:
        """The entry for ``path`` (not following a final symlink). Raises OSError."""
        return self.from_stat(path, os.lstat(path))


# --------------------------------------------------------------------------------------------
# The service


class FileService:
    """Answers the ``fs.*`` ops except watching (see `guest.watchers`)."""

    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts
        self.entries = EntryMaker()

    @property
    def handlers(self) -> dict[str, Handler]:
        """The ops this service answers."""
        return {
            "fs.stat": Handler(self.stat, inline=True),
            "fs.make_dir": Handler(self.make_dir, inline=True),
            "fs.move": Handler(self.move),
            "fs.list": Handler(self.list_dir),
            "fs.remove": Handler(self.remove),
            "fs.read": Handler(self.read),
            "fs.write": Handler(self.write),
        }

    def _where(self, user: str | None, path: str) -> tuple[Account, str]:
        account = self._accounts.resolve(user)
        return account, self._accounts.resolve_path(account, path)

    def _make_parents(self, account: Account, directory: str) -> None:
        """Create ``directory`` and its missing parents as ``account`` (mode 0755)."""
        missing: list[str] = []
        current = directory
        while not os.path.lexists(current):
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            self._accounts.give(account, path)

    # -- unary ops -----------------------------------------------------------------------------

    def stat(self, reply: Reply, args: protocol.FsStat) -> None:
        """``fs.stat``: the entry at a path (a final symlink is not followed)."""
        account, path = self._where(args.user, args.path)
        with translated(path), self._accounts.filesystem_identity(account):
            entry = self.entries.from_path(path)
        reply.ok(protocol.EntryResult(entry=entry))

    def make_dir(self, reply: Reply, args: protocol.FsMakeDir) -> None:
        """``fs.make_dir``: create a directory and its parents."""
        account, path = self._where(args.user, args.path)
        with translated(path), self._accounts.filesystem_identity(account):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(st.st_mode):
                    raise AlreadyExists(f"directory already exists: {path}")
                raise InvalidArgument(f"path already exists but it is not a directory: {path}")
            self._make_parents(account, path)
            entry = self.entries.from_path(path)
        reply.ok(protocol.EntryResult(entry=entry))

    async def move(self, call: Call, args: protocol.FsMove) -> protocol.EntryResult:
        """``fs.move``: rename, creating the destination's parents; across devices, copy."""
        account, source = self._where(args.user, args.source)
        destination = self._accounts.resolve_path(account, args.destination)
        with translated(source), self._accounts.filesystem_identity(account):
            os.lstat(source)
        with translated(destination), self._accounts.filesystem_identity(account):
            self._make_parents(account, os.path.dirname(destination))
            try:
                os.rename(source, destination)
                moved = True
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                moved = False
        if not moved:
            await trio.to_thread.run_sync(self._move_across, account, source, destination)
        with translated(destination), self._accounts.filesystem_identity(account):
            return protocol.EntryResult(entry=self.entries.from_path(destination))

    def _move_across(self, account: Account, source: str, destination: str) -> None:
        with translated(destination), self._accounts.filesystem_identity(account):
            shutil.move(source, destination)

    async def remove(self, call: Call, args: protocol.FsRemove) -> None:
        """``fs.remove``: remove a file, link or whole tree; a missing path is fine."""
        account, path = self._where(args.user, args.path)
        with translated(path), self._accounts.filesystem_identity(account):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(path)
                return
        await trio.to_thread.run_sync(self._remove_tree, account, path)

    def _remove_tree(self, account: Account, path: str) -> None:
        with translated(path), self._accounts.filesystem_identity(account):
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass

    async def list_dir(self, call: Call, args: protocol.FsList) -> protocol.EntryList:
        """``fs.list``: the entries under a directory, ``depth`` levels down (0 means 1)."""
        account, path = self._where(args.user, args.path)
        depth = max(args.depth, 1)
        with translated(path), self._accounts.filesystem_identity(account):
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise InvalidArgument(f"path is not a directory: {path}")
        entries = await trio.to_thread.run_sync(self._walk, account, path, depth)
        return protocol.EntryList(entries=entries)

    def _walk(self, account: Account, root: str, depth: int) -> list[EntryInfo]:
        """Depth-first, lexical order, parents before children; symlinks are not followed."""
        entries: list[EntryInfo] = []
        maker = EntryMaker()  # a worker thread gets its own name caches

        def visit(directory: str, level: int) -> None:
            try:
                with os.scandir(directory) as it:
                    children = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if directory == root:
                    raise
                del exc  # an unreadable subdirectory is listed but not entered
                return
            for child in children:
                try:
                    st = child.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append(maker.from_stat(child.path, st, name=child.name))
                if level < depth and stat.S_ISDIR(st.st_mode):
                    visit(child.path, level + 1)

        with translated(root), self._accounts.filesystem_identity(account):
            visit(root, 1)
        return entries

    # -- streams -------------------------------------------------------------------------------

    async def read(self, call: Call, args: protocol.FsRead) -> protocol.ReadDone:
        """``fs.read``: ``start`` with the entry, ``data`` chunks, then the byte count."""
        account, path = self._where(args.user, args.path)
        if args.offset < 0 or (args.length is not None and args.length < 0):
            raise InvalidArgument("offset and length must not be negative")
        # O_NONBLOCK: opening a FIFO must not wait for a writer (and stall envd).
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        with translated(path), self._accounts.filesystem_identity(account):
            fd = os.open(path, flags)
        try:
            with translated(path):
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise InvalidArgument(f"path is a directory: {path}")
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidArgument(f"not a regular file: {path}")
                entry = self.entries.from_stat(path, st)
            await call.emit("start", protocol.EntryResult(entry=entry))
            remaining = args.length if args.length is not None else -1
            offset = args.offset
            sent = 0
            while remaining != 0:
                size = protocol.FILE_CHUNK if remaining < 0 else min(remaining, protocol.FILE_CHUNK)
                with translated(path):
                    chunk = os.pread(fd, size, offset)
                if not chunk:
                    break
                offset += len(chunk)
                sent += len(chunk)
                if remaining > 0:
                    remaining -= len(chunk)
                if not await call.emit("data", protocol.FileChunk(data=chunk)):
                    break
            return protocol.ReadDone(size=sent)
        finally:
            os.close(fd)

    async def write(self, call: Call, args: protocol.FsWrite) -> protocol.EntryResult:
        """``fs.write``: create or replace a file from inline data or ``input`` frames."""
        account, path = self._where(args.user, args.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
        flags |= os.O_APPEND if args.append else os.O_TRUNC
        flags |= os.O_NONBLOCK  # a FIFO must fail now, not block envd until a reader comes
        mode = 0o644 if args.mode is None else args.mode & 0o7777
        with translated(path), self._accounts.filesystem_identity(account):
            if args.create_parents:
                self._make_parents(account, os.path.dirname(path))
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode)
        try:
            with translated(path):
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InvalidArgument(f"not a regular file: {path}")
                if not existed:
                    self._accounts.give(account, path)
                    if args.mode is not None:
                        os.fchmod(fd, mode)  # exactly as asked, whatever envd's umask
                if args.data is not None:
                    _write_all(fd, args.data)
                else:
                    while (piece := await call.receive_input()) is not None:
                        _write_all(fd, piece)
                if args.metadata is not None:
                    write_metadata(fd, args.metadata)
        finally:
            os.close(fd)
        with translated(path), self._accounts.filesystem_identity(account):
            return protocol.EntryResult(entry=self.entries.from_path(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
