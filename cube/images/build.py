"""``cube image build``: a bootable guest (kernel + initramfs), content-addressed and cached.

Building is a batch job, so this module is synchronous (``build_image``); async callers run it in
a thread (``ensure_image``). The image key hashes every input: the builder's own source, the
spec, the versions of the Debian packages fetched with apt, and the bytes of every host file the
guest gets. An image is built into ``<state_dir>/images/.tmp-*`` and renamed to
``<state_dir>/images/<key>/`` when complete, so a directory named by a key is always whole; a
second build with the same inputs finds it and returns at once.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Literal

import msgspec
import trio

from cube.images import debian, rootfs
from cube.images.cpio import CpioEntry, entries_from_tree, write_cpio
from cube.images.errors import ImageError

__all__ = [
    "DEFAULT_STATE_DIR",
    "Image",
    "ImageSpec",
    "Progress",
    "build_image",
    "ensure_image",
    "image_key",
    "load_image",
    "main",
    "prune_images",
]

DEFAULT_STATE_DIR = "/var/lib/cube"
MANIFEST = "manifest.json"

# Kernel command line every boot of the image starts from; the driver appends its own
# options. quiet: printing to a UART is slow under TCG. panic=-1: a dead /init resets the VM,
# which QEMU (-no-reboot) turns into an exit the supervisor sees. init_on_free: freed pages
# (the initramfs archive, boot-time buffers) are zeroed, and migration skips zero pages, so
# snapshots are ~30% smaller and restore faster (boot pays ~1 s for the zeroing: docs/vm.md).
# The rest skips probes a microVM has nothing for.
BASE_CMDLINE = (
    "console=ttyS0 quiet loglevel=3 panic=-1 random.trust_cpu=on tsc=reliable no_timer_check"
    " init_on_free=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests"
)


class ImageSpec(msgspec.Struct, frozen=True):
    """The inputs of an image a caller chooses; everything else is found on the host."""

    kernel_package: str = "linux-image-cloud-amd64"
    busybox_package: str = "busybox-static"
    python: str = "/usr/bin/python3.11"
    # what the agent imports, found where the host's interpreter finds them (the venv)
    packages: tuple[str, ...] = (
        "guest",
        "actors",
        "supervisors",
        "trio",
        "outcome",
        "sniffio",
        "attr",
        "attrs",
        "sortedcontainers",
        "idna",
        "msgspec",
    )
    # virtio-mmio for the microvm machine, virtio-pci for q35/bhyve; console is the channel
    modules: tuple[str, ...] = (
        "virtio_mmio",
        "virtio_pci",
        "virtio_console",
        "virtio_net",
        "virtio_blk",
    )
    optional_modules: tuple[str, ...] = ("vmw_vsock_virtio_transport", "virtio_rng", "brd")
    # /home and /tmp on an ext2 RAM disk (brd, half the guest's RAM) instead of the
    # initramfs: E2B keeps file metadata in user.* xattrs, which tmpfs has only since Linux 6.6
    scratch_ramdisk: bool = True
    channel: str = "agent"  # the virtio-console port name envd serves
    # the port of the control agent (guestctl.py: clock and network after a restore); "" none
    control_channel: str = "cube-ctl"
    # host executables copied in with their libraries; E2B's SDKs run commands with bash
    binaries: tuple[str, ...] = ("/usr/bin/bash",)
    # "envd": python3 -m guest.envd; "standin": the stand-in in standin_envd.py; "auto": envd
    # when it imports, else the stand-in
    agent: Literal["auto", "envd", "standin"] = "auto"
    # none: under TCG the kernel unpacks a 53 MB archive in ~0.5-1.0 s plain and ~1.3-1.9 s
    # from zstd (17 MB); the bytes on the host's disk matter less than boot time
    compression: Literal["zstd", "gzip", "none"] = "none"
    ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"


class Image(msgspec.Struct, frozen=True):
    """A built image: what QEMU boots, and what it was built from (its manifest.json)."""

    key: str
    directory: str
    kernel: str  # path of the vmlinuz
    initrd: str  # path of the compressed initramfs
    kernel_version: str
    cmdline: str  # the base kernel command line
    channel: str
    agent: str  # "envd" or "standin"
    inputs: dict[str, str]
    initrd_bytes: int
    files: int
    build_seconds: float
    control_channel: str = ""  # the control agent's port; "" in images built without one


class Progress:
    """Build progress on stderr: a step counter, and a bar for steps that count items.

    On a terminal the bar redraws in place; elsewhere (CI logs) each step is one line.
    """

    def __init__(
        self, total_steps: int, stream: IO[str] | None = None, *, quiet: bool = False
    ) -> None:
        self.total = total_steps
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.step_no = 0
        self.label = ""
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0

    def step(self, label: str) -> None:
        """Start the next step."""
        self.step_no += 1
        self.label = label
        self._line(f"[{self.step_no}/{self.total}] {label}", final=not self.tty)

    def advance(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` items of the current step (redraws at most 10/s)."""
        now = time.monotonic()
        if not self.tty or (now - self._last_draw < 0.1 and done < total):
            return
        self._last_draw = now
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        self._line(
            f"[{self.step_no}/{self.total}] {self.label} [{bar}] {done}/{total}", final=False
        )

    def note(self, text: str) -> None:
        """A line of information that stays on screen."""
        self._line(f"    {text}", final=True)

    def done(self, text: str) -> None:
        """The last line: what was built, and how long it took."""
        self._line(f"{text} ({time.monotonic() - self.started:.1f} s)", final=True)

    def _line(self, text: str, *, final: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# The key


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# The modules whose code decides an image's bytes (uefi_disk.py keys its own output).
BUILDER_SOURCES = (
    "build.py",
    "cpio.py",
    "debian.py",
    "guestctl.py",
    "rootfs.py",
    "standin_envd.py",
)


def builder_digest() -> str:
    """A hash of the builder's own source: changing how images are built changes every key."""
    digest = hashlib.sha256()
    for name in BUILDER_SOURCES:
        digest.update(name.encode() + b"\0" + Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()


def image_key(spec: ImageSpec, inputs: dict[str, str], files: Sequence[rootfs.GuestFile]) -> str:
    """The content address of an image: every input, hashed; 20 hex digits."""
    digest = hashlib.sha256()
    digest.update(
        msgspec.json.encode({"builder": builder_digest(), "spec": spec, "inputs": inputs})
    )
    for item in sorted(files, key=lambda f: f.path):
        content = (
            _sha256_file(item.source)
            if item.source
            else hashlib.sha256(item.data or b"").hexdigest()
        )
        digest.update(
            msgspec.json.encode([item.path, item.mode, item.link, item.directory, content])
        )
    return digest.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Inputs


def _choose_agent(spec: ImageSpec, python: str, progress: Progress) -> tuple[str, list[str]]:
    """(kind, argv) of the agent the image runs on its channel."""
    # --subreaper: envd adopts orphaned daemons so a process's tree stays whole
    envd = [f"/usr/bin/{Path(python).name}", "-m", "guest.envd", "--subreaper"]
    standin = [f"/usr/bin/{Path(python).name}", "-m", "cube_standin_envd"]
    if spec.agent == "envd":
        return "envd", envd
    if spec.agent == "auto":
        check = subprocess.run(
            [sys.executable, "-c", "import guest.envd"], capture_output=True, text=True, check=False
        )
        if check.returncode == 0:
            return "envd", envd
        progress.note("guest.envd does not import here; the image runs the stand-in agent")
    return "standin", standin


def _plan(spec: ImageSpec, agent_kind: str) -> list[rootfs.GuestFile]:
    """Every host file and generated file of the guest except busybox, the kernel modules and
    /init, which come from the .debs and need them unpacked first."""
    files = rootfs.python_files(spec.python)
    files += rootfs.package_files(spec.packages)
    if agent_kind == "standin":
        standin = Path(__file__).with_name("standin_envd.py")
        files += rootfs.library_files([(str(standin), f"{rootfs.AGENT_LIB}/cube_standin_envd.py")])
    if spec.control_channel:
        guestctl = Path(__file__).with_name("guestctl.py")
        files += rootfs.library_files([(str(guestctl), f"{rootfs.AGENT_LIB}/cube_guestctl.py")])
    files += rootfs.binary_files(spec.binaries)
    files += rootfs.etc_files(ca_bundle=spec.ca_bundle)
    # every python3 in the guest (code contexts, user scripts) finds the agent's packages
    files.append(
        rootfs.GuestFile(
            "/usr/lib/python3/dist-packages/cube.pth", data=f"{rootfs.AGENT_LIB}\n".encode()
        )
    )
    return files + rootfs.library_closure(files)


def _inputs(
    spec: ImageSpec, images: Path
) -> tuple[dict[str, str], debian.DebPackage, debian.DebPackage]:
    """The versions that go into the key: the .debs apt would fetch, the host's Python."""
    python_pkg = f"{Path(spec.python).name}-minimal"
    packages, host = debian.resolve_packages(
        [spec.kernel_package, spec.busybox_package], [python_pkg], images / "apt-resolved.json"
    )
    kernel, busybox = packages[spec.kernel_package], packages[spec.busybox_package]
    inputs = {
        "kernel": f"{kernel.name}={kernel.version}",
        "busybox": f"{busybox.name}={busybox.version}",
        "python": f"{python_pkg}={host[python_pkg]}",
    }
    return inputs, kernel, busybox


# ---------------------------------------------------------------------------------------------
# Steps


def _stage(files: Iterable[rootfs.GuestFile], root: Path, progress: Progress) -> int:
    """Copy the plan into the staging tree ``root``; returns how many entries it has."""
    items = list(files)
    for done, item in enumerate(items, start=1):
        target = root / item.path.lstrip("/")
        if item.directory:
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(item.mode)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.link is not None:
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(item.link)
        elif item.source is not None:
            shutil.copyfile(item.source, target)
            target.chmod(item.mode)
        else:
            target.write_bytes(item.data or b"")
            target.chmod(item.mode)
        progress.advance(done, len(items))
    return len(items)


def _merged_usr(root: Path) -> None:
    """Debian 12's merged /usr: /bin, /sbin, /lib and /lib64 are links into /usr."""
    for name in ("bin", "sbin", "lib", "lib64"):
        (root / "usr" / name).mkdir(parents=True, exist_ok=True)
        link = root / name
        if not link.is_symlink():
            link.symlink_to(f"usr/{name}")


def _busybox(unpacked: Path, root: Path) -> int:
    """Install busybox and a symlink per applet that does not clash with a real file."""
    binary = unpacked / "bin" / "busybox"
    if not binary.exists():
        raise ImageError(f"{unpacked} holds no bin/busybox")
    shutil.copyfile(binary, root / "usr/bin/busybox")
    (root / "usr/bin/busybox").chmod(0o755)
    listing = subprocess.run(
        [str(binary), "--list-full"], capture_output=True, text=True, check=True
    )
    count = 0
    for applet in listing.stdout.split():
        name = Path(applet).name
        directory = "usr/sbin" if "sbin" in applet else "usr/bin"
        target = root / directory / name
        if target.exists() or target.is_symlink():
            continue
        target.symlink_to("/usr/bin/busybox")
        count += 1
    return count


def _kernel(unpacked: Path, spec: ImageSpec, out: Path, root: Path) -> tuple[str, list[str]]:
    """Copy the vmlinuz to ``out`` and the needed modules into the tree; returns the kernel
    version and the module load order."""
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one vmlinuz in the kernel package, found {len(kernels)}")
    version = kernels[0].name[len("vmlinuz-") :]
    shutil.copyfile(kernels[0], out / "vmlinuz")
    modules_dir = unpacked / "lib/modules" / version
    if not modules_dir.exists():
        modules_dir = unpacked / "usr/lib/modules" / version
    order = debian.module_load_order(modules_dir, spec.modules, optional=spec.optional_modules)
    target = root / "usr/lib/modules" / version
    target.mkdir(parents=True, exist_ok=True)
    for module in order:
        shutil.copyfile(module.path, target / f"{module.name}.ko")
    return version, [module.name for module in order]


def _compile(python: str, root: Path) -> None:
    """Precompile every module: a guest must not spend boot time (or tmpfs) compiling.

    unchecked-hash pycs are used without looking at the source's mtime, which the archive does
    not keep, and they make the image reproducible.
    """
    targets = [str(root / "usr/lib" / Path(python).name), str(root / rootfs.AGENT_LIB.lstrip("/"))]
    done = subprocess.run(
        [
            python,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(root),
            "-p",
            "/",
            *targets,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ImageError(f"compileall failed: {(done.stdout + done.stderr).strip()[-800:]}")


def _smoke_test(root: Path, python: str, agent_kind: str) -> None:
    """Import the agent inside the staged tree (chroot), which proves the interpreter finds
    its libraries, standard library and packages exactly as the guest will."""
    chroot = shutil.which("chroot")
    if os.geteuid() != 0 or chroot is None:
        return
    module = "guest.envd" if agent_kind == "envd" else "cube_standin_envd"
    code = f"import sys; sys.path.insert(0, {rootfs.AGENT_LIB!r}); import trio, msgspec, {module}"
    done = subprocess.run(
        [chroot, str(root), f"/usr/bin/{Path(python).name}", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin", "LANG": "C.UTF-8"},
    )
    if done.returncode != 0:
        raise ImageError(
            f"the guest's Python cannot import its agent: {done.stderr.strip()[-800:]}"
        )


def _device_nodes() -> list[CpioEntry]:
    """/dev/console and /dev/null before devtmpfs is mounted: the kernel opens the console for
    /init's stdio from the archive itself."""
    import stat

    return [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
    ]


def _archive(root: Path, out: Path, compression: str, progress: Progress) -> int:
    """Write the tree as a (compressed) newc archive; returns the entry count."""
    entries = [_owned(entry) for entry in entries_from_tree(root) if entry.name != "dev"]
    entries = _device_nodes() + entries
    raw = out.with_suffix(".cpio")
    with open(raw, "wb") as f:
        count = write_cpio(_counted(entries, progress), f)
    if compression == "none":
        raw.replace(out)
    elif compression == "zstd":
        if shutil.which("zstd") is None:
            raise ImageError(
                "zstd is not installed (apt-get install zstd), or use compression='gzip'"
            )
        subprocess.run(
            ["zstd", "-q", "-f", "-T0", "-12", "--rm", str(raw), "-o", str(out)], check=True
        )
    else:
        with open(raw, "rb") as src, gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        raw.unlink()
    return count


def _owned(entry: CpioEntry) -> CpioEntry:
    """The entry with its guest owner (``rootfs.OWNERS``); the staging tree's are the
    builder's."""
    owner = rootfs.OWNERS.get("/" + entry.name)
    return msgspec.structs.replace(entry, uid=owner[0], gid=owner[1]) if owner else entry


def _counted(entries: list[CpioEntry], progress: Progress) -> Iterable[CpioEntry]:
    for done, entry in enumerate(entries, start=1):
        progress.advance(done, len(entries))
        yield entry


# ---------------------------------------------------------------------------------------------
# The build


def prune_images(
    state_dir: str | os.PathLike[str], *, keep: int = 4, spare: Iterable[str] = ()
) -> list[str]:
    """Remove all but the ``keep`` newest images (and those in ``spare``); returns the removed
    keys. A snapshot refers to its image's files, so callers spare the keys snapshots use."""
    images = Path(state_dir) / "images"
    built = (
        sorted(
            (d for d in images.iterdir() if d.is_dir() and (d / MANIFEST).exists()),
            key=lambda d: (d / MANIFEST).stat().st_mtime,
            reverse=True,
        )
        if images.is_dir()
        else []
    )
    removed = []
    for directory in built[keep:]:
        if directory.name not in set(spare):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
    return removed


def load_image(directory: Path) -> Image | None:
    """The image in ``directory`` if it is complete, else None."""
    try:
        return msgspec.json.decode((directory / MANIFEST).read_bytes(), type=Image)
    except (OSError, msgspec.DecodeError):
        return None


def build_image(
    spec: ImageSpec | None = None,
    state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
    *,
    progress: Progress | None = None,
    force: bool = False,
    keep_images: int = 4,
) -> Image:
    """The image for ``spec``: from the cache when its key is there, else built now.

    Blocks for the whole build (tens of seconds, most of it compiling bytecode and
    compressing); prints progress on stderr. After a build, only the ``keep_images`` newest
    images stay (0 keeps all). Raises ``ImageError`` with the failing step.
    """
    spec = spec or ImageSpec()
    progress = progress or Progress(8)
    images = Path(state_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    with open(images / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per state dir at a time
        progress.step("resolving inputs (apt, python, packages)")
        inputs, kernel_pkg, busybox_pkg = _inputs(spec, images)
        agent_kind, agent_argv = _choose_agent(spec, spec.python, progress)
        inputs["agent"] = agent_kind
        files = _plan(spec, agent_kind)
        key = image_key(spec, inputs, files)
        final = images / key
        cached = None if force else load_image(final)
        if cached is not None:
            progress.done(f"image {key} is cached in {final}")
            return cached
        started = time.monotonic()
        tmp = images / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        root = tmp / "root"
        root.mkdir(parents=True)
        try:
            image = _build(
                spec,
                key,
                inputs,
                files,
                (kernel_pkg, busybox_pkg),
                (agent_kind, agent_argv),
                images,
                tmp,
                progress,
            )
            shutil.rmtree(root)
            manifest = msgspec.structs.replace(
                image,
                directory=str(final),
                kernel=str(final / "vmlinuz"),
                initrd=str(final / Path(image.initrd).name),
                build_seconds=round(time.monotonic() - started, 1),
            )
            (tmp / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress.done(
            f"built image {key} in {final} ({manifest.initrd_bytes / 1e6:.1f} MB initramfs)"
        )
        return manifest


def _build(
    spec: ImageSpec,
    key: str,
    inputs: dict[str, str],
    files: list[rootfs.GuestFile],
    packages: tuple[debian.DebPackage, debian.DebPackage],
    agent: tuple[str, list[str]],
    images: Path,
    tmp: Path,
    progress: Progress,
) -> Image:
    root = tmp / "root"
    kernel_pkg, busybox_pkg = packages
    progress.step(f"fetching {kernel_pkg.name} and {busybox_pkg.name} with apt")
    debs = images / "debs"
    kernel_deb = debian.fetch_deb(kernel_pkg, debs)
    busybox_deb = debian.fetch_deb(busybox_pkg, debs)
    progress.step("unpacking the kernel and busybox")
    _merged_usr(root)
    kernel_version, modules = _kernel(
        debian.unpack_deb(kernel_deb, tmp / "kernel"), spec, tmp, root
    )
    _busybox(debian.unpack_deb(busybox_deb, tmp / "busybox"), root)
    shutil.rmtree(tmp / "kernel")
    shutil.rmtree(tmp / "busybox")
    progress.note(f"kernel {kernel_version}; modules: {' '.join(modules)}")
    progress.step(f"copying {len(files)} files (python, stdlib, packages)")
    _stage(files, root, progress)
    init = rootfs.init_script(
        kernel=kernel_version,
        modules=modules,
        channel=spec.channel,
        agent=agent[1],
        control=spec.control_channel,
        python=f"/usr/bin/{Path(spec.python).name}",
        scratch=spec.scratch_ramdisk and "brd" in modules,
    )
    (root / "init").write_bytes(init)
    (root / "init").chmod(0o755)
    progress.step("compiling bytecode")
    _compile(spec.python, root)
    progress.step(f"checking that the guest's Python imports its agent ({agent[0]})")
    _smoke_test(root, spec.python, agent[0])
    suffix = {"zstd": ".zst", "gzip": ".gz", "none": ""}[spec.compression]
    initrd = tmp / f"initramfs.cpio{suffix}"
    progress.step(f"writing the initramfs ({spec.compression})")
    count = _archive(root, initrd, spec.compression, progress)
    progress.step("finishing")
    return Image(
        key=key,
        directory=str(tmp),
        kernel=str(tmp / "vmlinuz"),
        initrd=str(initrd),
        kernel_version=kernel_version,
        cmdline=BASE_CMDLINE,
        channel=spec.channel,
        agent=agent[0],
        control_channel=spec.control_channel,
        inputs=inputs,
        initrd_bytes=initrd.stat().st_size,
        files=count,
        build_seconds=0.0,
    )


async def ensure_image(
    spec: ImageSpec | None = None,
    state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
    *,
    quiet: bool = False,
) -> Image:
    """``build_image`` from trio: runs in a worker thread (cached images return at once)."""
    progress = Progress(8, quiet=quiet)
    return await trio.to_thread.run_sync(lambda: build_image(spec, state_dir, progress=progress))


def main(argv: Sequence[str] | None = None) -> int:
    """``cube image build``: build (or find) the guest image and print its directory."""
    parser = argparse.ArgumentParser(prog="cube image build", description=main.__doc__)
    parser.add_argument("--state-dir", default=os.environ.get("CUBE_STATE_DIR", DEFAULT_STATE_DIR))
    parser.add_argument("--agent", choices=["auto", "envd", "standin"], default="auto")
    parser.add_argument("--compression", choices=["zstd", "gzip", "none"], default="none")
    parser.add_argument("--force", action="store_true", help="rebuild even if the image is cached")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument(
        "--uefi-disk",
        action="store_true",
        help="also build the raw UEFI disk (bhyve) and print its path",
    )
    args = parser.parse_args(argv)
    spec = ImageSpec(agent=args.agent, compression=args.compression)
    try:
        image = build_image(spec, args.state_dir, force=args.force)
        disk = None
        if args.uefi_disk:
            from cube.images.uefi_disk import build_uefi_disk

            disk = build_uefi_disk(image, args.state_dir)
    except ImageError as e:
        print(f"cube image build: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(image)).decode())
    else:
        print(image.directory)
    if disk:
        print(disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
