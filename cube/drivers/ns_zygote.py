"""The envd zygote of the ns driver: one pre-imported envd per node that forks into sandboxes.

envd's imports (trio, msgspec, the actor kernel, the guest services) take ~0.4 s and ~18 MB of
private memory in every sandbox when envd starts by ``execve``. The zygote pays both once: it
imports envd, runs it once on a scratch socket so that lazily built state exists before the
fork (``warm_up``), freezes the heap (``gc.freeze``), and then forks one envd per sandbox. The
forks share the zygote's pages copy-on-write; each keeps only what it writes.

The ns driver starts it through the host reaper, once per node, as::

    /usr/bin/python3 -S -E .../cube/drivers/ns_zygote.py <state_dir>/zygote-<id>/plan

and a sandbox gets its envd like this:

1. the **holder** (``ns_init``) connects to the zygote's socket first thing, still on the
   host; the kernel records its pid with the connection (``SO_PEERCRED``);
2. once the holder has made the namespaces and forked **pid 1**, pid 1 sends ``g`` on the
   connection it inherited;
3. the zygote forks **K** into the sandbox's pid namespace (``setns`` of the holder's
   ``pid_for_children`` around the fork) and goes back to waiting. K checks that the peer is
   a holder of this node (its command line names an ``init.plan`` under the node's
   ``slots/``) and reads that plan, joins the slot's cgroups, enters the holder's net, uts,
   ipc, cgroup and mount namespaces, mounts and masks ``/proc`` as pid 1 would (it can: it is
   in the pid namespace), drops the bounding set to the plan's capabilities, forks **E** and
   exits. Because K lives in the sandbox's pid namespace, its orphan E goes to the sandbox's
   pid 1, not to a subreaper on the host: E is pid 1's child from then on, and pid 1 gets its
   exit status as it would for an envd it forked itself;
4. **E** is the sandbox's envd. It leads a new session, limits its own capabilities to the
   plan's set (as ``execve`` under that bounding set would), writes ``pid <N>`` (its pid
   inside) back on the connection, closes every inherited descriptor and runs
   ``guest.envd.main``. Its imports already point at the sandbox's ``/opt/cube`` mounts: the
   zygote moved them there once, before its first fork (``move_imports``).

pid 1 moves the namespace's next pid out of the way before it asks (K is pid 3) and K moves it
back, so that envd is pid 2, as when pid 1 forks it.

Everything about the sandbox comes from the holder's plan and the holder's own namespaces,
never from the message; the socket lives in a 0700 directory of the state dir, which no
sandbox can see. Errors before E exists are sent back as ``error <text>`` (pid 1 fails the
start with it); the zygote's own log is ``<state_dir>/zygote-<id>/log``.
"""

from __future__ import annotations

import ctypes
import gc
import marshal
import os
import select
import socket
import struct
import sys
import traceback

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ns_init: Any = None  # cube/drivers/ns_init.py, imported at start (run_ops, Libc)
LIBC: Any = None  # an ns_init.Libc, made once before the zygote forks

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# K enters these in this order; the mount namespace last, as it changes what paths mean. The
# zygote itself enters the pid namespace (for its children) around the fork of K.
NAMESPACES = (
    ("pid_for_children", CLONE_NEWPID),
    ("net", CLONE_NEWNET),
    ("uts", CLONE_NEWUTS),
    ("ipc", CLONE_NEWIPC),
    ("cgroup", CLONE_NEWCGROUP),
    ("mnt", CLONE_NEWNS),
)
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
# Process starts in the warm-up: enough for the interpreter to settle its specialised code
# here rather than in every envd (each round is a few ms, once per node).
WARM_UP_ROUNDS = 20
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
LINUX_CAPABILITY_VERSION_3 = 0x20080522
ENVD_MODULE = ["-m", "guest.envd"]


class ZygoteError(Exception):
    """A request cannot be served; the text goes back to the sandbox's pid 1."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ZygoteError(f"{what}: {os.strerror(err)} (errno {err})")


# ------------------------------------------------------------------------------------------
# start-up: imports, warm-up, the socket


def load_envd(plan: dict[str, Any]) -> None:
    """Import envd and everything it imports, from the host's copies of the packages."""
    global ns_init, LIBC
    import ns_init  # type: ignore[import-not-found]  # beside this file: sys.path[0]

    LIBC = ns_init.Libc()

    sys.path[:1] = plan["path"]  # instead of this file's directory
    import guest.agent
    import guest.envd  # noqa: F401


def warm_up(path: str) -> None:
    """Run envd once in this process on ``path``: a hello and one process start, so that
    what envd builds lazily (op tables, encoders, specialised bytecode) is built here, once,
    and shared by every fork instead of being rebuilt in each."""
    import trio

    from guest import protocol
    from guest.agent import Config, serve
    from guest.client import GuestClient
    from guest.envd import parse_args

    parse_args(["--listen", f"unix:{path}"])
    # as root with a default user that is not root, so that the identity switches run too
    # ("user" exists inside the sandbox, "nobody" here)
    config = Config(unix=path, default_user="nobody")

    async def once() -> None:
        with trio.fail_after(30):
            await exercise()

    async def exercise() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            stream = await trio.open_unix_socket(path)
            async with stream, GuestClient.open(stream) as client:
                args = protocol.ProcessStart(
                    process=protocol.ProcessConfig(cmd="/bin/true"), stdin=False
                )
                for _ in range(WARM_UP_ROUNDS):
                    async with client.stream("process.start", args) as remote:
                        async for _ in remote:
                            pass
            nursery.cancel_scope.cancel()

    try:
        trio.run(once)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)  # in case envd made us one


def listen(path: str) -> socket.socket:
    """The zygote's socket, private to root; bound under a temporary name, then renamed, so
    that it accepts connections as soon as the driver sees it."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = path + ".new"
    if os.path.exists(temporary):
        os.unlink(temporary)
    server.bind(temporary)
    os.chmod(temporary, 0o600)
    server.listen(128)
    os.rename(temporary, path)
    return server


# ------------------------------------------------------------------------------------------
# serving: one poll loop, one fork per request


class Zygote:
    """The zygote's loop: accept holders, and fork an envd for each that asks."""

    def __init__(self, plan: dict[str, Any], server: socket.socket) -> None:
        self.plan = plan
        self.server = server
        self.poller = select.poll()
        self.poller.register(server.fileno(), select.POLLIN)
        self.peers: dict[int, tuple[socket.socket, int, int]] = {}  # fd -> (conn, pid, pidfd)
        self.children: dict[int, int] = {}  # pidfd -> pid of a K, reaped as soon as it exits
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.own_pid_ns_inode = os.fstat(self.own_pid_ns).st_ino

    def run(self) -> None:
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.server.fileno():
                    self._accept()
                elif fd in self.children:
                    self._reap(fd)
                else:
                    self._request(fd)

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid != 0:
            conn.close()
            return
        try:
            pidfd = os.pidfd_open(pid)  # pins the peer: its pid cannot be reused unnoticed
        except OSError:
            conn.close()
            return
        self.peers[conn.fileno()] = (conn, pid, pidfd)
        self.poller.register(conn.fileno(), select.POLLIN)

    def _request(self, fd: int) -> None:
        """Fork K into the sandbox of the peer on ``fd``, if it asks. The zygote itself does as
        little as it can here: every page it writes after a fork stays behind, unshared, in
        each envd forked before (K reads the plan and enters the rest)."""
        conn, peer, pidfd = self.peers.pop(fd)
        self.poller.unregister(fd)
        pid_ns = -1
        try:
            if conn.recv(16) != b"g":
                return  # the holder ended (or spoke nonsense): nothing to do
            pid_ns = os.open(f"/proc/{peer}/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(pid_ns).st_ino == self.own_pid_ns_inode:
                conn.sendall(b"error the holder has no pid namespace of its own\n")
                return
            sys.stdout.flush()
            sys.stderr.flush()
            child = self._fork_into(pid_ns)
            if child == 0:
                self._child(conn, peer, pidfd)  # never returns
            exited = os.pidfd_open(child)
            self.children[exited] = child
            self.poller.register(exited, select.POLLIN)
        except OSError as exc:
            print(f"ns_zygote: request from {peer}: {exc}", file=sys.stderr, flush=True)
        finally:
            if pid_ns >= 0:
                os.close(pid_ns)
            os.close(pidfd)
            conn.close()

    def _fork_into(self, pid_ns: int) -> int:
        """Fork a child born in the pid namespace ``pid_ns``; the zygote stays in its own."""
        _check(_libc.setns(pid_ns, CLONE_NEWPID), "setns pid")
        try:
            child = os.fork()
        except BaseException:
            _check(_libc.setns(self.own_pid_ns, CLONE_NEWPID), "setns pid back")
            raise
        if child:
            _check(_libc.setns(self.own_pid_ns, CLONE_NEWPID), "setns pid back")
        return child

    def _reap(self, exited: int) -> None:
        """K has exited (it does at once, once E exists): collect it."""
        child = self.children.pop(exited)
        self.poller.unregister(exited)
        os.close(exited)
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass

    # -- in the fork ----------------------------------------------------------------------

    def _child(self, conn: socket.socket, peer: int, pidfd: int) -> None:
        """K: check the holder, enter the rest of its sandbox and fork its envd (E); never
        returns."""
        code = 1
        answer = conn.detach()
        # E closes every inherited descriptor by number: no socket object may close it again
        for other, _, _ in self.peers.values():
            other.detach()
        self.server.detach()
        try:
            holder = self._holder_plan(peer)
            enter_sandbox(holder, open_namespaces(peer, pidfd))
            envd = os.fork()
            if envd == 0:
                code = 127
                become_envd(answer, holder, self.plan)  # never returns
            code = 0
        except BaseException as exc:  # everything goes back to pid 1, which fails the start
            message = f"error {type(exc).__name__}: {exc}".replace("\n", " ")
            try:
                os.write(answer, message.encode()[:4000] + b"\n")
            except OSError:
                pass
        finally:
            os._exit(code)

    def _holder_plan(self, peer: int) -> dict[str, Any]:
        """The plan of the holder ``peer``, which must be one of this node's holders."""
        try:
            with open(f"/proc/{peer}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError as exc:
            raise ZygoteError(f"holder {peer} is gone") from exc
        slots = os.path.join(self.plan["slots_dir"], "")
        if len(argv) != 5 or argv[3].decode() != self.plan["init_script"]:
            raise ZygoteError(f"process {peer} is not a holder")
        path = argv[4].decode()
        if not path.startswith(slots) or ".." in path or not path.endswith("/init.plan"):
            raise ZygoteError(f"holder {peer} is not one of this node's ({path})")
        with open(path, "rb") as f:
            holder: dict[str, Any] = marshal.load(f)
        if holder["envd"]["argv"][1:3] != ENVD_MODULE:
            raise ZygoteError("the plan's envd is not guest.envd")
        return holder


def open_namespaces(peer: int, pidfd: int) -> list[tuple[int, int, str]]:
    """(fd, CLONE_NEW*, name) of each namespace of the holder ``peer`` in ``NAMESPACES`` but
    the pid namespace (K was born in it); every one must be the holder's own, not the host's,
    and the holder must still be alive once they are open."""
    opened: list[tuple[int, int, str]] = []
    try:
        for name, flag in NAMESPACES[1:]:
            path = f"/proc/{peer}/ns/{name}"
            if os.readlink(path) == os.readlink(f"/proc/self/ns/{name}"):
                raise ZygoteError(f"holder {peer} has not made its {name} namespace")
            opened.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag, name))
        if select.select([pidfd], [], [], 0)[0]:
            raise ZygoteError(f"holder {peer} exited")  # the namespaces may be another's
    except BaseException:
        for fd, _, _ in opened:
            os.close(fd)
        raise
    return opened


def enter_sandbox(holder: dict[str, Any], namespaces: list[tuple[int, int, str]]) -> None:
    """In K (already in the sandbox's pid namespace): the log as stdout and stderr, the slot's
    cgroups, the next pid set back to 2 (pid 1 moved it out of the way for K) for envd, the
    holder's other namespaces, pid 1's part of the root (``/proc``, masked: K is in the pid
    namespace, and pid 1 leaves it to K to stay small), the bounding set, the umask."""
    log = os.open(holder["log"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    me = str(os.getpid()).encode()  # cgroup.procs reads pids in the writer's pid namespace
    for path in holder["cgroup_procs"]:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, me)
        finally:
            os.close(fd)
    try:  # the host's /proc still: ns_last_pid acts on the writer's pid namespace
        fd = os.open(NS_LAST_PID, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except OSError:
        pass  # envd gets another pid: nothing depends on it
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for fd, flag, name in namespaces:
        _check(_libc.setns(fd, flag), f"setns {name}")
    os.chdir("/")
    try:
        ns_init.run_ops(LIBC, "/", holder["pid1"])
    except ns_init.InitError as exc:
        raise ZygoteError(str(exc)) from exc
    keep = set(holder["keep_caps"])
    for cap in range(last_cap + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.umask(0o022)


def limit_capabilities(keep: list[int]) -> None:
    """Make the permitted and effective sets ``keep`` (and trim the inheritable set), as an
    ``execve`` by root under a bounding set of ``keep`` leaves them."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    for index in range(2):
        word = (mask >> (32 * index)) & 0xFFFFFFFF
        data[index].effective = word
        data[index].permitted = word
        data[index].inheritable &= word
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def become_envd(answer: int, holder: dict[str, Any], plan: dict[str, Any]) -> None:
    """E: the sandbox's envd. Reports its pid to pid 1, then runs envd's main; never returns."""
    code = 1
    try:
        os.setsid()
        limit_capabilities(holder["keep_caps"])
        os.write(answer, b"pid %d\n" % os.getpid())
        # the zygote's socket, other holders' connections, this one, the namespaces
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        envd = holder["envd"]
        os.chdir(envd["cwd"])
        os.environ.clear()
        os.environ.update(envd["env"])
        sys.dont_write_bytecode = True
        sys.argv = [envd["argv"][0], *envd["argv"][3:]]
        import guest.envd

        code = guest.envd.main(envd["argv"][3:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def move_imports(inside: dict[str, str]) -> None:
    """Point the imported packages at the sandbox's copies (``/opt/cube/...``) of the host
    directories the zygote imported them from: ``sys.path`` and each package's ``__path__``,
    so that a module envd imports later is found inside, and the module-level strings that
    name a file there (``__file__``, or a path computed from it at import, such as the code
    kernel's), so that envd finds its files inside. Done once in the zygote, before it forks:
    touching every module in each fork would copy their pages."""

    mapping = sorted(inside.items(), key=lambda item: -len(item[0]))  # the most specific first

    def moved(path: str) -> str:
        for host, there in mapping:
            if path == host or path.startswith(host + "/"):
                return there + path[len(host) :]
        return path

    sys.path[:] = [moved(p) for p in sys.path]
    for module in list(sys.modules.values()):
        locations = getattr(module, "__path__", None)
        if isinstance(locations, list):
            locations[:] = [moved(p) for p in locations]
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or moved(file) == file:
            continue  # not imported from a moved directory: its strings are not ours to touch
        namespace = vars(module)
        for name, value in list(namespace.items()):
            if isinstance(value, str) and moved(value) != value:
                namespace[name] = moved(value)
        spec = getattr(module, "__spec__", None)
        if spec is not None and isinstance(spec.origin, str):
            spec.origin = moved(spec.origin)
    sys.path_importer_cache.clear()


def main(argv: list[str]) -> int:
    with open(argv[1], "rb") as f:
        plan = marshal.load(f)
    load_envd(plan)
    if plan.get("warm", True):
        try:
            warm_up(plan["socket"] + ".warm")
        except Exception:
            traceback.print_exc()  # only a slower first request in each sandbox
    move_imports(plan["inside"])  # the zygote imports nothing more itself
    gc.collect()
    gc.freeze()  # the heap as it is now is shared: no collection in a fork ever touches it
    server = listen(plan["socket"])
    print(f"ns_zygote: ready on {plan['socket']}", file=sys.stderr, flush=True)
    Zygote(plan, server).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
