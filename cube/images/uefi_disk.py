"""A raw UEFI-bootable disk of an image: how bhyve (and QEMU with OVMF) boots the guest.

bhyve boots Linux guests through its UEFI firmware (contract §1.2, "UEFI guest"), which reads a
disk, not a kernel file. The disk is GPT with one EFI system partition (FAT32) holding
systemd-boot as the removable-media loader (``\\EFI\\BOOT\\BOOTX64.EFI``, which firmware runs
without any boot entry), one loader entry with the image's kernel command line, and the image's
own vmlinuz and initramfs (gzip-compressed on the disk). The guest still runs from its
initramfs; the disk only boots it.

systemd-boot comes from Debian's ``systemd-boot-efi`` .deb (fetched with apt like the kernel);
the FAT file system is made with mtools and the partition table is written here, so nothing
needs a loop device or root. The disk is derived from a built image and cached next to it as
``disk-<key>.raw``, keyed by the image, the systemd-boot version and this module's source.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

from cube.images import debian
from cube.images.build import Image
from cube.images.errors import ImageError

__all__ = ["SECTOR", "build_uefi_disk", "gpt_partition_table"]

SECTOR = 512
SDBOOT_PACKAGE = "systemd-boot-efi"
SDBOOT_EFI = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
ESP_START = 2048  # 1 MiB aligned, as partitioning tools do
ENTRIES = 128
ENTRY_SIZE = 128
ENTRY_SECTORS = ENTRIES * ENTRY_SIZE // SECTOR  # 32


def _gpt_header(
    *,
    current: int,
    backup: int,
    last_usable: int,
    disk_guid: uuid.UUID,
    entries_lba: int,
    entries_crc: int,
) -> bytes:
    fields = struct.pack(
        "<8sIIIIQQQQ16sQIII",
        b"EFI PART",
        0x00010000,
        92,
        0,  # header CRC, filled below
        0,
        current,
        backup,
        2 + ENTRY_SECTORS,  # first usable LBA
        last_usable,
        disk_guid.bytes_le,
        entries_lba,
        ENTRIES,
        ENTRY_SIZE,
        entries_crc,
    )
    crc = zlib.crc32(fields)
    fields = fields[:16] + struct.pack("<I", crc) + fields[20:]
    return fields + b"\0" * (SECTOR - len(fields))


def gpt_partition_table(total_sectors: int, esp_sectors: int, seed: str) -> tuple[bytes, bytes]:
    """(the first 34 sectors, the last 33 sectors) of a GPT disk with one ESP at 1 MiB.

    GUIDs derive from ``seed`` so the same image always gives the same disk.
    """
    disk_guid = uuid.uuid5(uuid.NAMESPACE_URL, f"cube-disk:{seed}")
    part_guid = uuid.uuid5(uuid.NAMESPACE_URL, f"cube-esp:{seed}")
    last_usable = total_sectors - 2 - ENTRY_SECTORS
    esp_end = ESP_START + esp_sectors - 1
    if esp_end > last_usable:
        raise ImageError("the ESP does not fit the disk")
    name = "EFI System".encode("utf-16-le").ljust(72, b"\0")
    entry = struct.pack(
        "<16s16sQQQ72s", ESP_TYPE.bytes_le, part_guid.bytes_le, ESP_START, esp_end, 0, name
    )
    entries = entry + b"\0" * (ENTRIES * ENTRY_SIZE - len(entry))
    entries_crc = zlib.crc32(entries)
    # protective MBR: one partition of type 0xEE covering the disk, so MBR tools keep off
    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack(
        "<B3sB3sII",
        0,
        b"\x00\x02\x00",
        0xEE,
        b"\xff\xff\xff",
        1,
        min(total_sectors - 1, 0xFFFFFFFF),
    )
    mbr[510:512] = b"\x55\xaa"
    primary = _gpt_header(
        current=1,
        backup=total_sectors - 1,
        last_usable=last_usable,
        disk_guid=disk_guid,
        entries_lba=2,
        entries_crc=entries_crc,
    )
    backup = _gpt_header(
        current=total_sectors - 1,
        backup=1,
        last_usable=last_usable,
        disk_guid=disk_guid,
        entries_lba=total_sectors - 1 - ENTRY_SECTORS,
        entries_crc=entries_crc,
    )
    return bytes(mbr) + primary + entries, entries + backup


def _mtools(*argv: str) -> None:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{argv[0]} is missing: apt-get install mtools") from e
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _compressed_initrd(image: Image, workdir: Path) -> Path:
    """The initramfs as the disk carries it: gzip-compressed when the image's is plain.

    Firmware reads the disk slowly (emulated under TCG) and the kernel's EFI stub must find
    room for the whole initrd in boot-services memory; a third of the size helps both, and
    unpacking gzip costs a native bhyve guest nothing worth mentioning.
    """
    source = Path(image.initrd)
    if source.suffix != ".cpio":
        return source
    target = workdir / "initrd.img"
    with open(source, "rb") as src, gzip.GzipFile(target, "wb", compresslevel=6, mtime=0) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def _esp(path: Path, image: Image, sdboot: Path) -> int:
    """Make the FAT32 ESP image at ``path``; returns its size in sectors."""
    initrd = _compressed_initrd(image, path.parent)
    payload = os.path.getsize(image.kernel) + os.path.getsize(initrd) + os.path.getsize(sdboot)
    size_mb = max(64, (payload * 5 // 4 >> 20) + 16)  # FAT32 wants >= ~33 MiB anyway
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    esp = f"{path}"
    _mtools("mformat", "-i", esp, "-F", "-v", "CUBE-ESP", "-N", "C0BE0001", "::")
    _mtools("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries")
    loader = path.with_name("loader.conf")
    loader.write_text("default cube.conf\ntimeout 0\nconsole-mode keep\neditor no\n")
    entry = path.with_name("cube.conf")
    entry.write_text(
        f"title cube {image.key}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {image.cmdline}\n"
    )
    for source, target in [
        (sdboot, "::/EFI/BOOT/BOOTX64.EFI"),
        (Path(image.kernel), "::/vmlinuz"),
        (initrd, "::/initrd.img"),
        (loader, "::/loader/loader.conf"),
        (entry, "::/loader/entries/cube.conf"),
    ]:
        _mtools("mcopy", "-i", esp, str(source), target)
    return (size_mb << 20) // SECTOR


def build_uefi_disk(image: Image, state_dir: str | os.PathLike[str]) -> str:
    """The raw UEFI disk of ``image`` (built now unless cached); returns its path."""
    images = Path(state_dir) / "images"
    packages, _ = debian.resolve_packages([SDBOOT_PACKAGE], [], images / "apt-resolved-uefi.json")
    sdboot_pkg = packages[SDBOOT_PACKAGE]
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{image.key}\0{sdboot_pkg.name}={sdboot_pkg.version}".encode())
    final = Path(image.directory) / f"disk-{digest.hexdigest()[:12]}.raw"
    if final.exists():
        return str(final)
    tmp = Path(image.directory) / f".disk-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        unpacked = debian.unpack_deb(debian.fetch_deb(sdboot_pkg, images / "debs"), tmp / "sdboot")
        sdboot = unpacked / SDBOOT_EFI
        if not sdboot.exists():
            raise ImageError(f"{sdboot_pkg.name} holds no {SDBOOT_EFI}")
        esp = tmp / "esp.img"
        esp_sectors = _esp(esp, image, sdboot)
        total = ESP_START + esp_sectors + 2048  # 1 MiB after it too: the backup table lives there
        head, tail = gpt_partition_table(total, esp_sectors, image.key)
        disk = tmp / "disk.raw"
        with open(disk, "wb") as out:
            out.write(head)
            out.seek(ESP_START * SECTOR)
            with open(esp, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            out.seek((total - 1 - ENTRY_SECTORS) * SECTOR)
            out.write(tail)
        disk.replace(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
