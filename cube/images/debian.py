"""The guest's Debian parts: packages fetched with apt, unpacked, and kernel modules resolved.

The kernel (``linux-image-cloud-amd64``) and busybox (``busybox-static``) come from the host's
apt sources as .deb files (``apt-get download``), never installed on the host. Their versions
are part of the image key, so a kernel security update rebuilds the image. Downloaded .debs
are kept in a cache directory and reused while their version stays the same.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from cube.images.errors import ImageError

__all__ = [
    "DebPackage",
    "KernelModule",
    "apt_state",
    "fetch_deb",
    "host_package_version",
    "modinfo",
    "module_load_order",
    "resolve_package",
    "resolve_packages",
    "unpack_deb",
]


class DebPackage(msgspec.Struct, frozen=True):
    """A concrete binary package: the name apt downloads and the version it would get."""

    name: str
    version: str

    @property
    def filename(self) -> str:
        # apt-get download writes "name_version_arch.deb" with ":" in the version escaped
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


class KernelModule(msgspec.Struct, frozen=True):
    """A loadable kernel module of the guest kernel and the modules it needs loaded first."""

    name: str  # as the kernel names it: underscores, no ".ko"
    path: str  # host path of the .ko inside the unpacked kernel package
    depends: tuple[str, ...]


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run one apt/dpkg tool and return its stdout; a failure becomes an ImageError."""
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{argv[0]} is not installed; images are built on Debian hosts") from e
    if done.returncode != 0:
        raise ImageError(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
        )
    return done.stdout


def _candidate(name: str) -> str | None:
    """The version apt would install for ``name``, or None if apt knows no such package."""
    out = _run(["apt-cache", "policy", name])
    match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
    if match is None or match.group(1) == "(none)":
        return None
    return match.group(1)


def resolve_package(name: str) -> DebPackage:
    """The concrete package behind ``name``, following a metapackage to what it depends on.

    ``linux-image-cloud-amd64`` is a metapackage whose only dependency is the current versioned
    kernel package (``linux-image-6.1.0-NN-cloud-amd64``), which holds the kernel itself.
    """
    version = _candidate(name)
    if version is None:
        raise ImageError(f"apt knows no package {name!r}: run `apt-get update` first")
    if not name.startswith("linux-image-") or re.search(r"\d+\.\d+\.\d+-\d+", name):
        return DebPackage(name, version)
    show = _run(["apt-cache", "show", f"{name}={version}"])
    depends = re.search(r"^Depends:\s*(.+)$", show, re.MULTILINE)
    if depends is None:
        raise ImageError(f"{name}={version} depends on no kernel package")
    for alternative in re.split(r"[,|]", depends.group(1)):
        dep = alternative.strip().split(" ")[0]
        if dep.startswith("linux-image-"):
            return resolve_package(dep)
    raise ImageError(f"{name}={version} depends on no linux-image package: {depends.group(1)}")


def apt_state() -> str:
    """A stamp of what apt and dpkg know: the mtimes of the package lists and of dpkg's
    status. Resolutions cached under it stay valid until `apt-get update` or an install."""
    paths = [Path("/var/lib/dpkg/status"), Path("/var/cache/apt/pkgcache.bin")]
    lists = Path("/var/lib/apt/lists")
    if lists.is_dir():
        paths += [p for p in lists.iterdir() if p.is_file()]
    stamps = []
    for path in sorted(paths):
        try:
            stamps.append(f"{path.name}:{path.stat().st_mtime_ns}")
        except OSError:
            continue
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]


def resolve_packages(
    names: Iterable[str], host_packages: Iterable[str], cache: Path
) -> tuple[dict[str, DebPackage], dict[str, str]]:
    """``resolve_package`` for each of ``names`` and ``host_package_version`` for each of
    ``host_packages``, remembered in ``cache`` while ``apt_state`` stays the same (each apt
    query reads apt's whole cache: seconds on a busy machine)."""
    names, host_packages = list(names), list(host_packages)
    stamp = apt_state()
    try:
        cached = msgspec.json.decode(cache.read_bytes())
    except (OSError, msgspec.DecodeError):
        cached = {}
    if (
        isinstance(cached, dict)
        and cached.get("stamp") == stamp
        and set(names) <= set(cached.get("packages", {}))
        and set(host_packages) <= set(cached.get("host", {}))
    ):
        packages = {n: msgspec.convert(cached["packages"][n], DebPackage) for n in names}
        return packages, {n: cached["host"][n] for n in host_packages}
    packages = {name: resolve_package(name) for name in names}
    host = {name: host_package_version(name) for name in host_packages}
    record = {
        "stamp": stamp,
        "packages": {n: msgspec.to_builtins(p) for n, p in packages.items()},
        "host": host,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(record))
    tmp.replace(cache)
    return packages, host


def host_package_version(name: str) -> str:
    """The version of ``name`` installed on the host (for host files copied into the guest)."""
    try:
        out = _run(["dpkg-query", "-W", "-f", "${Version}", name])
    except ImageError:
        return "not-installed"
    return out.strip() or "not-installed"


def fetch_deb(package: DebPackage, cache: Path) -> Path:
    """The .deb of ``package`` in ``cache``, downloaded with ``apt-get download`` if missing."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / package.filename
    if path.exists():
        return path
    partial = cache / f".partial-{package.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        # apt drops to the _apt user for downloads; it needs to write where it downloads
        partial.chmod(0o777)
        _run(["apt-get", "download", "-q", f"{package.name}={package.version}"], cwd=partial)
        found = list(partial.glob("*.deb"))
        if len(found) != 1:
            raise ImageError(f"apt-get download {package.name} left {len(found)} .deb files")
        found[0].replace(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def unpack_deb(deb: Path, into: Path) -> Path:
    """Unpack the files of ``deb`` (not its maintainer scripts) into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)])
    return into


def modinfo(ko: Path) -> dict[str, str]:
    """The ``.modinfo`` fields of a kernel module (name, depends, ...), read from its ELF.

    Reading the section directly needs neither depmod nor modinfo on the host, and works on the
    unpacked package, which has no modules.dep (depmod runs at install time).
    """
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ImageError(f"{ko} is not a 64-bit ELF module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name_off, offset, size = section(index)
        name = data[strtab + name_off : data.index(b"\0", strtab + name_off)]
        if name == b".modinfo":
            fields: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep and key not in fields:
                    fields[key] = value
            return fields
    raise ImageError(f"{ko} has no .modinfo section")


def _index_modules(modules_dir: Path) -> dict[str, Path]:
    """Module name (underscored) -> its .ko, for every module of an unpacked kernel."""
    return {ko.name[: -len(".ko")].replace("-", "_"): ko for ko in modules_dir.rglob("*.ko")}


def module_load_order(
    modules_dir: Path, wanted: Iterable[str], *, optional: Iterable[str] = ()
) -> list[KernelModule]:
    """``wanted`` modules and everything they depend on, each after its dependencies.

    A wanted module that is built into the kernel (listed in ``modules.builtin``) needs no
    loading and is skipped; a missing one is an error unless it is in ``optional``.
    """
    index = _index_modules(modules_dir)
    builtin_file = modules_dir / "modules.builtin"
    builtin = {
        Path(line).name[: -len(".ko")].replace("-", "_")
        for line in (builtin_file.read_text().split() if builtin_file.exists() else [])
    }
    optional_names = {name.replace("-", "_") for name in optional}
    order: list[KernelModule] = []
    placed: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in placed or name in builtin:
            return
        if name in chain:
            raise ImageError(
                f"kernel modules depend on each other in a cycle: {' -> '.join((*chain, name))}"
            )
        ko = index.get(name)
        if ko is None:
            if name in optional_names and not chain:
                return
            raise ImageError(f"the guest kernel has no module {name!r}")
        depends = tuple(d for d in modinfo(ko).get("depends", "").split(",") if d)
        for dep in depends:
            visit(dep.replace("-", "_"), (*chain, name))
        placed.add(name)
        order.append(KernelModule(name, str(ko), depends))

    for name in [*wanted, *optional]:
        visit(name.replace("-", "_"), ())
    return order
