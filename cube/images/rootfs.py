"""What goes into the guest's root filesystem (the initramfs), as a plan of files.

The plan lists every file by its guest path and where its bytes come from (a host file, or
bytes generated here), without copying anything. The builder hashes the plan to get the image
key, and copies it into a staging tree only when no image with that key is cached.

Layout inside the guest (merged /usr, like Debian 12):

    /init                          the init script (busybox sh), below
    /usr/bin/busybox + applets     from busybox-static
    /usr/bin/python3.11, python3   the host's Debian interpreter ...
    /usr/lib/x86_64-linux-gnu/     ... and the shared libraries it and its extensions need
    /usr/lib/python3.11/           the standard library, without tests, idle, tkinter, ...
    /opt/cube/lib/                 guest, actors, supervisors, trio, msgspec and their deps
    /lib/modules/VERSION/*.ko      the virtio modules, loaded by /init in the order listed
    /etc/                          passwd, group, hosts, resolv.conf, CA certificates
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import msgspec

from cube.images.errors import ImageError

__all__ = [
    "AGENT_LIB",
    "GuestFile",
    "binary_files",
    "etc_files",
    "init_script",
    "library_closure",
    "library_files",
    "package_files",
    "python_files",
    "shared_libraries",
]

# Where the Python packages of the agent live in the guest (on envd's PYTHONPATH only, so
# they do not shadow what a user installs).
AGENT_LIB = "/opt/cube/lib"

# Standard-library directories a sandbox does without: tests, GUI, packaging bootstraps, the
# static libpython of config-*, and old tooling. They are most of its size.
STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "__pycache__",
        "site-packages",
        "dist-packages",
    }
)
STDLIB_SKIP_PREFIXES = ("config-",)
# Extension modules that exist only to test CPython itself.
DYNLOAD_SKIP = re.compile(r"^(_test|_ctypes_test|_xxtestfuzz|xxlimited)")
# Directories inside third-party packages that are their own test suites.
PACKAGE_SKIP_DIRS = frozenset({"__pycache__", "_tests", "tests", "test"})


class GuestFile(msgspec.Struct, frozen=True):
    """One entry of the guest tree: a file (from ``source`` or ``data``), a symlink, or a dir."""

    path: str  # absolute path inside the guest
    source: str | None = None  # host file with the contents
    data: bytes | None = None  # generated contents
    mode: int = 0o644
    link: str | None = None  # symlink target
    directory: bool = False


def _walk(
    root: Path, skip_dirs: frozenset[str], *, skip_suffixes: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Files under ``root`` (following no symlinked dirs), pruning ``skip_dirs`` by name."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in skip_dirs and not d.startswith(STDLIB_SKIP_PREFIXES)
        )
        for name in sorted(filenames):
            if not name.endswith((".pyc", *skip_suffixes)):
                yield Path(dirpath) / name


def _host_file(path: Path, guest_path: str) -> GuestFile:
    mode = 0o755 if os.access(path, os.X_OK) else 0o644
    if path.is_symlink() and not path.resolve().exists():
        raise ImageError(f"{path} is a dangling symlink")
    return GuestFile(guest_path, source=str(path.resolve()), mode=mode)


def _guest_lib_path(host: str) -> str:
    """Where a host shared library goes in the merged-/usr guest (/lib/x -> /usr/lib/x)."""
    directory = os.path.realpath(os.path.dirname(host))
    return f"{directory}/{os.path.basename(host)}"


def shared_libraries(binaries: Sequence[str]) -> list[str]:
    """Host paths of the shared libraries (and the ELF interpreter) ``binaries`` load, per ldd."""
    if not binaries:
        return []
    done = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # 1: some argument was not dynamic, which is fine
        raise ImageError(f"ldd failed: {done.stderr.strip()}")
    libs: set[str] = set()
    for line in done.stdout.splitlines():
        if "not found" in line:
            raise ImageError(
                f"a shared library of the guest Python is missing on the host: {line.strip()}"
            )
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.add(match.group(1))
    return sorted(libs)


def python_files(python: str) -> list[GuestFile]:
    """The interpreter and its standard library, trimmed (``library_closure`` adds the shared
    libraries they load)."""
    interpreter = Path(python)
    if not interpreter.exists():
        raise ImageError(
            f"{python} not found: install Debian's python3.11 (apt-get install python3.11)"
        )
    version = re.sub(r"^python", "", interpreter.name)  # "3.11"
    stdlib = Path(f"/usr/lib/python{version}")
    if not (stdlib / "os.py").exists():
        raise ImageError(f"{stdlib} holds no standard library for {python}")
    files = [
        GuestFile(f"/usr/bin/python{version}", source=str(interpreter.resolve()), mode=0o755),
        GuestFile("/usr/bin/python3", link=f"python{version}"),
        GuestFile("/usr/bin/python", link=f"python{version}"),
    ]
    for path in _walk(stdlib, STDLIB_SKIP_DIRS):
        if path.parent.name == "lib-dynload" and DYNLOAD_SKIP.match(path.name):
            continue
        files.append(_host_file(path, str(path)))
    return files


def library_closure(files: Sequence[GuestFile]) -> list[GuestFile]:
    """The shared libraries (and ELF interpreter) that the executables and extension modules
    among ``files`` load, as guest files; the interpreter's and msgspec's alike."""
    binaries = [
        item.source
        for item in files
        if item.source
        and (item.path.endswith(".so") or (item.path.startswith("/usr/bin/") and item.mode & 0o111))
    ]
    have = {item.path for item in files}
    libs = []
    for lib in shared_libraries(binaries):
        path = _guest_lib_path(lib)
        if path not in have:
            libs.append(GuestFile(path, source=os.path.realpath(lib), mode=0o755))
    return libs


def package_files(names: Iterable[str], *, into: str = AGENT_LIB) -> list[GuestFile]:
    """The importable packages or modules ``names`` as the host's interpreter finds them.

    Project packages (guest, actors, supervisors) and third-party ones from the venv alike:
    whatever ``import name`` would load here is what the guest gets, tests left out.
    """
    files: list[GuestFile] = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or (spec.origin is None and not spec.submodule_search_locations):
            raise ImageError(f"package {name!r} is not importable here: install it in the venv")
        if spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations)))
            for path in _walk(root, PACKAGE_SKIP_DIRS, skip_suffixes=(".pyi",)):
                files.append(_host_file(path, f"{into}/{name}/{path.relative_to(root)}"))
        else:
            assert spec.origin is not None
            files.append(_host_file(Path(spec.origin), f"{into}/{Path(spec.origin).name}"))
    return files


def binary_files(binaries: Iterable[str]) -> list[GuestFile]:
    """Host executables the guest gets at the same path under /usr/bin (``library_closure``
    adds their shared libraries): bash, which E2B's SDKs run every command with."""
    files = []
    for binary in binaries:
        path = Path(binary)
        if not path.exists():
            raise ImageError(f"{binary} is not installed on the host")
        files.append(GuestFile(f"/usr/bin/{path.name}", source=str(path.resolve()), mode=0o755))
    return files


def library_files(sources: Iterable[tuple[str, str]]) -> list[GuestFile]:
    """Single files copied as they are: ``(host path, guest path)`` pairs."""
    return [_host_file(Path(host), guest) for host, guest in sources]


# Guest paths owned by someone other than root: E2B's default user owns its home.
OWNERS = {"/home/user": (1000, 1000)}

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
user:x:1000:1000:user:/home/user:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """\
root:x:0:
tty:x:5:
user:x:1000:
nogroup:x:65534:
"""
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def etc_files(*, ca_bundle: str | None) -> list[GuestFile]:
    """The guest's /etc, home directories and the empty mount points /init uses."""
    files = [
        GuestFile("/etc/passwd", data=PASSWD.encode()),
        GuestFile("/etc/group", data=GROUP.encode()),
        GuestFile("/etc/hosts", data=HOSTS.encode()),
        GuestFile("/etc/hostname", data=b"sandbox\n"),
        GuestFile("/etc/resolv.conf", data=b"nameserver 10.200.0.1\n"),
        GuestFile("/etc/os-release", data=b'NAME="cube guest"\nID=cube\nID_LIKE=debian\n'),
        GuestFile("/root", directory=True, mode=0o700),
        GuestFile("/home/user", directory=True, mode=0o755),
        GuestFile("/tmp", directory=True, mode=0o1777),
    ]
    files += [
        GuestFile(path, directory=True, mode=0o755)
        for path in ("/proc", "/sys", "/dev", "/run", "/mnt")
    ]
    if ca_bundle and os.path.exists(ca_bundle):
        files.append(
            GuestFile("/etc/ssl/certs/ca-certificates.crt", source=os.path.realpath(ca_bundle))
        )
    return files


INIT_TEMPLATE = r"""#!/bin/sh
# cube guest init: mount, load the virtio modules, bring up the network, run the agent.
# Generated by cube.images; PID 1 stays this shell, which reaps orphans while it waits.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
for module in @MODULES@; do
    case "$module" in
        # one RAM disk of half the memory (tmpfs's default); pages are taken as written
        brd) options="rd_nr=1 rd_size=$((mem_kb / 2)) max_part=0" ;;
        *) options="" ;;
    esac
    insmod "/lib/modules/@KERNEL@/$module.ko" $options 2>/dev/null || echo "cube-init: insmod $module failed"
done

# /home and /tmp on an ext2 file system on that RAM disk: E2B keeps file metadata in user.*
# extended attributes, which this kernel's tmpfs (the initramfs) does not have (Linux 6.6+).
if [ -n "@SCRATCH@" ] && [ -b /dev/ram0 ] && mke2fs -F -m 0 -L scratch /dev/ram0 >/dev/null 2>&1 \
        && mkdir -p /run/scratch && mount -t ext2 -o user_xattr /dev/ram0 /run/scratch; then
    for dir in home tmp; do
        cp -a "/$dir" /run/scratch/ && mount -o bind "/run/scratch/$dir" "/$dir"
    done
    chmod 1777 /tmp
fi

# Kernel command line options the host passes: cube.ip=ADDR/LEN cube.gw=ADDR cube.hostname=NAME
for option in $(cat /proc/cmdline); do
    case "$option" in
        cube.ip=*) ip_addr="${option#cube.ip=}" ;;
        cube.gw=*) ip_gw="${option#cube.gw=}" ;;
        cube.hostname=*) hostname "${option#cube.hostname=}" ;;
    esac
done
ip link set lo up
if [ -n "$ip_addr" ] && [ -e /sys/class/net/eth0 ]; then
    ip addr add "$ip_addr" dev eth0
    ip link set eth0 up
    [ -n "$ip_gw" ] && ip route add default via "$ip_gw"
fi

# No udev here: name a port as udev would (/dev/virtio-ports/NAME -> /dev/vportNpM).
# find_port NAME TRIES: the port's device (polled every 10 ms), or nothing.
find_port() {
    tries=0
    while [ "$tries" -lt "$2" ]; do
        for dir in /sys/class/virtio-ports/*; do
            if [ -e "$dir/name" ] && [ "$(cat "$dir/name")" = "$1" ] && [ -e "/dev/${dir##*/}" ]; then
                ln -sf "/dev/${dir##*/}" "/dev/virtio-ports/$1"
                echo "/dev/${dir##*/}"
                return
            fi
        done
        sleep 0.01
        tries=$((tries + 1))
    done
}
port=$(find_port @CHANNEL@ 500)
if [ -z "$port" ]; then
    echo "cube-init: no virtio-console port named @CHANNEL@; powering off"
    poweroff -f
fi

cd /
echo "cube-init: starting the agent on $port"
PYTHONPATH=@AGENT_LIB@ @AGENT@ --device "/dev/virtio-ports/@CHANNEL@" &
agent=$!
# The control port (clock and network after a restore) comes with the same virtio-serial
# device as the agent's, so it is there by now or not at all.
if [ -n "@CONTROL@" ] && [ -n "$(find_port @CONTROL@ 20)" ]; then
    @PYTHON@ -S -c 'import sys; sys.path[:0] = ["@AGENT_LIB@"]; import cube_guestctl; cube_guestctl.serve(sys.argv[1])' \
        "/dev/virtio-ports/@CONTROL@" &
fi
wait $agent
echo "cube-init: the agent exited with status $?; powering off"
poweroff -f
"""


def init_script(
    *,
    kernel: str,
    modules: Sequence[str],
    channel: str,
    agent: Sequence[str],
    control: str = "",
    python: str = "/usr/bin/python3",
    scratch: bool = False,
) -> bytes:
    """The /init of the guest: ``agent`` is the argv that serves the channel (``--device`` is
    appended), ``modules`` are loaded in the order given; ``control`` names the port of the
    control agent (cube/images/guestctl.py, run by ``python``), empty for none; ``scratch``
    puts /home and /tmp on an ext2 file system on the ``brd`` RAM disk."""
    for name in (channel, control):
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ImageError(f"port name {name!r} must be a plain word")
    text = (
        INIT_TEMPLATE.replace("@MODULES@", " ".join(modules))
        .replace("@KERNEL@", kernel)
        .replace("@CHANNEL@", channel)
        .replace("@CONTROL@", control)
        .replace("@SCRATCH@", "yes" if scratch else "")
        .replace("@PYTHON@", python)
        .replace("@AGENT_LIB@", AGENT_LIB)
        .replace("@AGENT@", " ".join(agent))
    )
    return text.encode()
