"""The first process of an ns sandbox: join its cgroup, enter new namespaces, build its root, and
become (through one fork) the sandbox's pid 1, a tiny init that runs envd and reaps zombies.

The ns driver starts it through the host reaper as::

    /usr/bin/python3 -S -E .../cube/drivers/ns_init.py <state_dir>/slots/<slot>/init.plan

The plan is a ``marshal`` file written by ``cube.drivers.ns`` (all policy lives there; this
program only executes it, step by step). It runs with ``-S -E`` and imports nothing beyond
``ctypes``, ``marshal``, the built-in ``time`` and ``ns_netlink`` (which needs only ``_socket``
and ``struct``):
``json``, ``socket`` and ``signal`` would pull in ``re`` and ``enum`` and add ~10 ms to every
sandbox start.

Two processes result:

* the **holder** (this process, in the host's pid namespace): it joins the slot's cgroups
  first of all, so everything the sandbox will ever run is inside; creates the network
  namespace and wires its veth to the host bridge over netlink; pins the namespace at
  ``/run/netns/<name>``; unshares mount, uts, ipc, pid and cgroup namespaces; builds the
  root on a tmpfs and pivots into it; forks pid 1 and waits for it. Its exit status is pid
  1's (128+N for a signal), so the reaper reports the sandbox's end as this process's exit.
* **pid 1** (the fork, first process of the new pid namespace): mounts ``/proc``, masks the
  sensitive parts of it, drops the capabilities envd must not have from the bounding set,
  forks envd and reaps every zombie until envd exits; then it exits, and the kernel kills
  whatever is left in the namespace. It dies with the holder (``PR_SET_PDEATHSIG``), so
  killing either process ends the whole sandbox.

When the plan names the node's envd zygote (``ns_zygote``), the holder connects to it before
anything else, and pid 1 does less: instead of mounting ``/proc``, dropping capabilities and
executing envd, it asks the zygote on that connection for a fork of its pre-imported envd. The
zygote's helper, born in this pid namespace, does those steps and forks envd, which becomes
pid 1's child when the helper exits; pid 1 learns its pid on the connection and waits for it
as for an envd it forked. If the zygote cannot be reached, envd is executed as above.

Errors are written to stderr (the slot's ``init.log``) as ``ns_init: <step>: <error>`` with
exit status 1.
"""

from __future__ import annotations

import _socket
import ctypes
import marshal
import os
import sys
import time

try:
    from cube.drivers import ns_netlink
except ImportError:  # run as a script: this file's directory is sys.path[0]
    import ns_netlink  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:  # ``typing`` costs milliseconds at run time; annotations are strings
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
SIGKILL = 9

SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}


class InitError(Exception):
    """A step of the plan failed; the message names the step."""


class Libc:
    """The few libc calls Python 3.11's ``os`` lacks, raising ``InitError`` on failure."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self.lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.unshare.argtypes = [ctypes.c_int]
        self.lib.prctl.argtypes = [
            ctypes.c_int,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise InitError(f"{what}: {os.strerror(err)} (errno {err})")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._check(
            self.lib.mount(
                source.encode() if source else None,
                target.encode(),
                fstype.encode() if fstype else None,
                flags,
                data.encode() if data else None,
            ),
            f"mount {fstype or source or ''} on {target}",
        )

    def umount(self, target: str, flags: int) -> None:
        self._check(self.lib.umount2(target.encode(), flags), f"umount {target}")

    def unshare(self, flags: int, what: str) -> None:
        self._check(self.lib.unshare(flags), f"unshare {what}")

    def prctl(self, option: int, arg: int, what: str) -> None:
        self._check(self.lib.prctl(option, arg, 0, 0, 0), what)

    def pivot_root(self, machine: str) -> None:
        number = SYS_PIVOT_ROOT.get(machine)
        if number is None:
            raise InitError(f"pivot_root: unknown syscall number on {machine}")
        self._check(self.lib.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")


def write_file(path: str, value: str, what: str) -> None:
    """Write a small control file (cgroup, sysctl) in one write."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise InitError(f"{what}: {path}: {exc.strerror}") from exc


# ------------------------------------------------------------------------------------------
# holder: cgroups, network, namespaces, root


def join_cgroups(procs_files: list[str]) -> None:
    pid = str(os.getpid())
    for path in procs_files:
        write_file(path, pid, "join cgroup")


def make_network(libc: Libc, net: dict[str, Any]) -> None:
    """Create the sandbox's network namespace, wire it to the host bridge (when ``net`` has a
    ``veth``) and pin the namespace by name."""
    veth = net["veth"]
    try:
        master = ns_netlink.link_index(veth["bridge"]) if veth else 0
        if veth and not master:
            raise InitError(f"network: bridge {veth['bridge']} not found")
        with ns_netlink.Netlink() as host:  # opened here, so it stays in the host namespace
            libc.unshare(CLONE_NEWNET, "net")
            for path, value in net["sysctls"]:
                write_file(path, value, "network sysctl")
            if veth:
                host.create_veth(veth["host_if"], "eth0", peer_netns_fd=_netns_fd(), master=master)
                host.configure_bridge_port(veth["host_if"], alias=veth["alias"])
        with ns_netlink.Netlink() as inside:
            inside.set_up(1)  # lo
            if veth:
                eth0 = ns_netlink.link_index("eth0")
                inside.add_address(eth0, veth["ip"], veth["prefix"])
                inside.set_up(eth0)
                inside.add_default_route(veth["gateway"])
    except OSError as exc:
        raise InitError(f"network: {exc}") from exc
    pin = net["netns_path"]
    if pin:
        try:
            os.makedirs(os.path.dirname(pin), mode=0o755, exist_ok=True)
            os.close(os.open(pin, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
        except OSError as exc:
            raise InitError(f"network: pin {pin}: {exc.strerror}") from exc
        libc.mount("/proc/self/ns/net", pin, None, MS_BIND, None)


def _netns_fd() -> int:
    """A descriptor of our (new) network namespace, closed with the process."""
    return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def run_ops(libc: Libc, base: str, ops: list[tuple[Any, ...]]) -> None:
    """Execute filesystem steps under ``base`` (paths in ops are relative to it)."""
    for op in ops:
        kind = op[0]
        path = os.path.join(base, op[2] if kind in ("symlink", "bind", "mount") else op[1])
        try:
            if kind == "dir":
                _, _, mode, uid, gid = op
                os.makedirs(path, exist_ok=True)
                os.chmod(path, mode)
                if uid or gid:
                    os.chown(path, uid, gid)
            elif kind == "file":
                _, _, data, mode, uid, gid = op
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                if uid or gid:
                    os.chown(path, uid, gid)
            elif kind == "symlink":
                os.symlink(op[1], path)
            elif kind == "mknod":
                _, _, mode, major, minor = op
                os.mknod(path, 0o020000 | mode, os.makedev(major, minor))  # S_IFCHR
            elif kind == "mount":
                _, source, _, fstype, flags, data = op
                libc.mount(source, path, fstype, flags, data)
            elif kind == "bind":
                _, source, _, flags = op
                libc.mount(source, path, None, MS_BIND, None)
                if flags:  # a bind takes its flags only on a remount
                    libc.mount(None, path, None, MS_REMOUNT | MS_BIND | flags, None)
            else:
                raise InitError(f"unknown step {kind!r}")
        except OSError as exc:
            raise InitError(f"{kind} {path}: {exc.strerror}") from exc


def enter_root(libc: Libc, plan: dict[str, Any]) -> None:
    """Unshare the remaining namespaces, build the root on a tmpfs and pivot into it."""
    libc.unshare(
        CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWCGROUP,
        "mnt,uts,ipc,pid,cgroup",
    )
    try:
        _socket.sethostname(plan["hostname"])
    except OSError as exc:
        raise InitError(f"sethostname: {exc.strerror}") from exc
    # private, so that nothing we mount from here on propagates back to the host
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    root = plan["root"]
    libc.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, plan["root_options"])
    run_ops(libc, root, plan["setup"])
    os.chdir(root)
    libc.pivot_root(os.uname().machine)
    libc.umount(".", MNT_DETACH)  # the host's tree, stacked under ours by pivot_root(".", ".")
    os.chdir("/")


# ------------------------------------------------------------------------------------------
# pid 1


def connect_zygote(path: str | None) -> Any:
    """A connection to the node's envd zygote (the kernel records our pid with it), or None
    (then pid 1 executes envd itself)."""
    if not path:
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        conn.close()
        os.write(2, f"ns_init: zygote {path}: {exc.strerror}; executing envd\n".encode())
        return None
    return conn


def open_last_pid() -> int:
    """The host's ``ns_last_pid``, opened while we still see it (-1 if we cannot). A write acts
    on the writer's pid namespace, so pid 1 can move its own namespace's next pid with it."""
    try:
        return os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def envd_from_zygote(conn: Any, last_pid: int, timeout: float) -> int:
    """Ask the zygote for this sandbox's envd; returns its pid (in our pid namespace).

    The zygote's helper is born here as pid 3 (the next pid is moved past 2 first) and sets it
    back, so that envd is pid 2, as when we fork it ourselves."""
    if last_pid >= 0:
        try:
            os.write(last_pid, b"2")
        except OSError:
            pass  # envd gets another pid: nothing depends on it
        os.close(last_pid)
    conn.settimeout(timeout)
    reply = b""
    try:
        conn.sendall(b"g")
        while not reply.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        raise InitError(f"zygote: {exc}") from exc
    finally:
        conn.close()
    if not reply.startswith(b"pid "):
        raise InitError(f"zygote: {reply.decode(errors='replace').strip() or 'no answer'}")
    return int(reply[4:])


def pid1(
    libc: Libc, plan: dict[str, Any], holder_alive: int, zygote: Any = None, last_pid: int = -1
) -> int:
    """Run as the first process of the sandbox's pid namespace; returns envd's exit code."""
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, "set parent-death signal")
    os.set_blocking(holder_alive, False)
    try:
        if os.read(holder_alive, 1) == b"":  # the holder died before we armed the signal
            return 1
    except BlockingIOError:
        pass
    os.close(holder_alive)
    libc.prctl(PR_SET_DUMPABLE, 0, "clear dumpable")  # envd, even as root, cannot ptrace us
    if zygote is not None:
        # The zygote's helper mounts /proc and drops envd's capabilities (it is in our pid
        # namespace too); we stay as small as we are, as every page we write is ours alone.
        return wait_for(envd_from_zygote(zygote, last_pid, plan.get("zygote_timeout", 30.0)))
    run_ops(libc, "/", plan["pid1"])
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    keep = set(plan["keep_caps"])
    for cap in range(last_cap + 1):
        if cap not in keep:
            libc.prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap}")
    os.umask(0o022)  # ours is 0 so that the plan's modes are exact; envd gets the usual one
    envd = plan["envd"]
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            os.chdir(envd["cwd"])
            os.execve(envd["argv"][0], envd["argv"], envd["env"])
        except OSError as exc:
            os.write(2, f"ns_init: exec {envd['argv'][0]}: {exc.strerror}\n".encode())
        os._exit(127)
    return wait_for(child)


def wait_for(envd: int) -> int:
    """Reap every process that ends up ours (orphans included) until ``envd`` exits; its exit
    code. The zygote's envd is not our child until its parent has exited: until then there
    may be nothing to wait for."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.001)
            continue
        if pid == envd:
            return os.waitstatus_to_exitcode(status)


# ------------------------------------------------------------------------------------------


def exit_status(code: int) -> int:
    """A child's exit code as ours: 128+N when it died of signal N, as shells do."""
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    os.umask(0)
    zygote = None
    last_pid = -1
    try:
        with open(argv[1], "rb") as f:
            plan = marshal.load(f)
        zygote = connect_zygote(plan.get("zygote"))
        if zygote is not None:
            last_pid = open_last_pid()
        libc = Libc()
        join_cgroups(plan["cgroup_procs"])
        make_network(libc, plan["net"])
        enter_root(libc, plan)
    except (InitError, OSError) as exc:
        os.write(2, f"ns_init: {exc}\n".encode())
        return 1
    holder_alive, keep_open = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(keep_open)
        try:
            code = pid1(libc, plan, holder_alive, zygote, last_pid)
        except (InitError, OSError) as exc:
            os.write(2, f"ns_init: pid 1: {exc}\n".encode())
            code = 1
        os._exit(exit_status(code))
    os.close(holder_alive)
    if zygote is not None:
        zygote.close()  # pid 1 has its own copy; the zygote sees the end when pid 1 closes it
    if last_pid >= 0:
        os.close(last_pid)
    _, status = os.waitpid(child, 0)
    return exit_status(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    os._exit(main(sys.argv))
