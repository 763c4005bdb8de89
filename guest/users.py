"""Who a request runs as: accounts, their homes, and the credentials to act as them.

envd runs as root inside a sandbox and acts for a user (``user`` by default, ``root`` on
request): processes are spawned with that user's uid, gid and groups, and relative paths resolve
against that user's home. File operations take the user's filesystem identity for the duration
of each syscall (Linux ``setfsuid``/``setfsgid`` plus a thread-local ``setgroups``), so the
kernel checks the user's permissions and new files belong to the user. Where that is not
available, envd acts with its own rights and hands new files to the user with ``chown``.

When envd is not root (a developer's machine, the ``process`` driver) it can act only as itself:
the default user falls back to the current account and any other user is refused.
"""

import contextlib
import grp
import os
import platform
import pwd
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from guest.protocol import InvalidArgument, PermissionDenied, Unauthenticated

# Raw setgroups(2) changes only the calling thread (glibc's wrapper changes every thread), which
# is what a temporary filesystem identity needs. Numbers per architecture, from the kernel ABI.
_SETGROUPS_SYSCALL = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "arm64": 159}


@dataclass(frozen=True, slots=True)
class Account:
    """A resolved user: name, ids, supplementary groups and home directory."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]
    shell: str


def _account_from_pwd(entry: pwd.struct_passwd) -> Account:
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return Account(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=entry.pw_dir or "/",
        groups=groups,
        shell=entry.pw_shell or "/bin/sh",
    )


class Accounts:
    """Resolves user names to accounts and provides the means to act as them."""

    def __init__(
        self,
        default_user: str = "user",
        default_workdir: str | None = None,
        *,
        euid: int | None = None,
    ) -> None:
        """``euid`` is who envd acts as itself (default: its effective uid)."""
        euid = os.geteuid() if euid is None else euid
        self.is_root = euid == 0
        self.current = self._current_account(euid)
        self._cache: dict[str, Account] = {}
        self.default = self._pick_default(default_user)
        self.default_workdir = default_workdir
        self._fs_switch = self._filesystem_switch()

    # -- resolution --------------------------------------------------------------------------

    @staticmethod
    def _current_account(uid: int) -> Account:
        try:
            return _account_from_pwd(pwd.getpwuid(uid))
        except KeyError:
            # A uid with no passwd entry (containers often run like that): describe it anyway.
            name = os.environ.get("USER") or str(uid)
            home = os.environ.get("HOME") or "/"
            gid = os.getegid() if uid == os.geteuid() else uid
            return Account(name, uid, gid, home, (gid,), "/bin/sh")

    def _pick_default(self, name: str) -> Account:
        """The default account: ``name`` if it exists and envd may act as it, else envd's own."""
        if not name or name == self.current.name:
            return self.current
        if not self.is_root:
            return self.current
        try:
            return self._lookup(name)
        except Unauthenticated:
            print(
                f"envd: default user {name!r} does not exist; acting as {self.current.name!r}",
                file=sys.stderr,
            )
            return self.current

    def set_default(self, name: str) -> None:
        """Make ``name`` the default user (``envd.configure``); it must exist."""
        self.default = self.resolve(name)

    def _lookup(self, name: str) -> Account:
        account = self._cache.get(name)
        if account is None:
            try:
                account = _account_from_pwd(pwd.getpwnam(name))
            except KeyError:
                raise Unauthenticated(f"user {name!r} does not exist") from None
            if len(self._cache) < 64:
                self._cache[name] = account
        return account

    def resolve(self, name: str | None) -> Account:
        """The account a request acts as.

        ``None`` or empty means the default user. Raises `Unauthenticated` for an unknown user
        and `PermissionDenied` when envd is not root and the user is not envd's own.
        """
        if not name or name == self.default.name:
            return self.default
        if name == self.current.name:
            return self.current
        if not self.is_root:
            raise PermissionDenied(
                f"envd runs as {self.current.name!r} and cannot act as {name!r}"
            )
        return self._lookup(name)

    def resolve_path(self, account: Account, path: str) -> str:
        """An absolute, normalised path: ``~`` and relative paths start at the user's home.

        An empty path means the default workdir (or the home). Raises `InvalidArgument` for
        ``~other`` forms, which would name someone else's home.
        """
        if not path:
            path = self.default_workdir or account.home
        if path.startswith("~"):
            if len(path) > 1 and path[1] != "/":
                raise InvalidArgument(f"cannot expand {path!r}: only ~ and ~/ are supported")
            path = account.home + path[1:]
        if not path.startswith("/"):
            path = os.path.join(account.home, path)
        return os.path.normpath(path)

    def environment(self, account: Account) -> dict[str, str]:
        """The base environment of a process run as ``account``, as E2B envd builds it."""
        return {
            "PATH": os.environ.get("PATH")
            or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": account.home,
            "USER": account.name,
            "LOGNAME": account.name,
        }

    # -- acting as an account -----------------------------------------------------------------

    def needs_switch(self, account: Account) -> bool:
        """Whether acting as ``account`` needs other credentials than envd's own."""
        return self.is_root and account.uid != self.current.uid

    def spawn_credentials(self, account: Account) -> dict[str, Any]:
        """Keyword arguments for `subprocess.Popen` that run the child as ``account``.

        CPython applies them in the child between fork and exec, without a preexec function,
        so the fast vfork path stays available when no switch is needed.
        """
        if not self.needs_switch(account):
            return {}
        return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}

    @contextlib.contextmanager
    def filesystem_identity(self, account: Account) -> Iterator[None]:
        """Perform the enclosed (synchronous) syscalls with ``account``'s filesystem identity.

        Never ``await`` inside: the identity belongs to the OS thread, and another trio task
        would run with it. Use it inside a worker thread's function for blocking work.
        Where per-thread identities are unavailable this does nothing; callers then hand new
        files to the user with `Accounts.give`.
        """
        switch = self._fs_switch
        if switch is None or not self.needs_switch(account):
            yield
            return
        switch(account.uid, account.gid, account.groups)
        try:
            yield
        finally:
            switch(self.current.uid, self.current.gid, self.current.groups)

    @property
    def switches_identity(self) -> bool:
        """Whether `filesystem_identity` really changes the filesystem identity."""
        return self._fs_switch is not None

    def give(self, account: Account, path: str) -> None:
        """Hand a newly created path to ``account`` when the identity switch is unavailable."""
        if self._fs_switch is None and self.needs_switch(account):
            with contextlib.suppress(OSError):
                os.chown(path, account.uid, account.gid, follow_symlinks=False)

    def _filesystem_switch(self) -> Callable[[int, int, tuple[int, ...]], None] | None:
        """A function that sets this thread's fsuid, fsgid and groups, or None if impossible."""
        if not self.is_root or sys.platform != "linux":
            return None
        setgroups_nr = _SETGROUPS_SYSCALL.get(platform.machine())
        if setgroups_nr is None:
            return None
        import ctypes  # only root on Linux pays for ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        setfsuid, setfsgid, syscall = libc.setfsuid, libc.setfsgid, libc.syscall

        def switch(uid: int, gid: int, groups: tuple[int, ...]) -> None:
            array = (ctypes.c_uint * max(len(groups), 1))(*groups)
            if syscall(setgroups_nr, len(groups), array) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            # Order matters: groups and fsgid first, while fsuid 0 still has the right to set them.
            setfsgid(gid)
            setfsuid(uid)

        return switch


def group_name(gid: int, cache: dict[int, str]) -> str:
    """The name of group ``gid`` (its number when it has none), memoised in ``cache``."""
    name = cache.get(gid)
    if name is None:
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        if len(cache) < 256:
            cache[gid] = name
    return name


def user_name(uid: int, cache: dict[int, str]) -> str:
    """The name of user ``uid`` (its number when it has none), memoised in ``cache``."""
    name = cache.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        if len(cache) < 256:
            cache[uid] = name
    return name
