"""The image builder: cpio archives, kernel modules, keys, the cache and the built tree."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cube.images import (
    Image,
    ImageError,
    ImageSpec,
    Progress,
    build_image,
    debian,
    image_key,
    rootfs,
)
from cube.images.cpio import CpioEntry, write_cpio

# Shared with tests/cube/qemu: one cached build per machine and input set.
TEST_IMAGES = os.environ.get("CUBE_TEST_IMAGES", "/var/tmp/cube-test-images")

needs_debian = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or shutil.which("apt-get") is None
    or shutil.which("cpio") is None,
    reason="needs a Debian host with apt and cpio",
)


def cpio_listing(archive: bytes) -> list[str]:
    """``cpio -itv`` of an uncompressed archive: the real tool reads what we wrote."""
    done = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    )
    return done.stdout.decode().splitlines()


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(ImageSpec(agent="standin"), TEST_IMAGES)


@needs_debian
def test_cpio_archives_are_read_back_by_the_cpio_tool(tmp_path: Path):
    source = tmp_path / "hello.txt"
    source.write_text("hello\n")
    entries = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("etc", stat.S_IFDIR | 0o755),
        CpioEntry("etc/hello", stat.S_IFREG | 0o644, source=str(source)),
        CpioEntry("etc/odd", stat.S_IFREG | 0o600, data=b"abc"),
        CpioEntry("bin", stat.S_IFLNK | 0o777, target="usr/bin"),
    ]
    out = io.BytesIO()
    assert write_cpio(entries, out) == len(entries)
    listing = cpio_listing(out.getvalue())
    assert [line.split()[-1] for line in listing[:5]] == [
        "dev",
        "dev/console",
        "etc",
        "etc/hello",
        "etc/odd",
    ]
    assert listing[1].startswith("crw-------") and "5," in listing[1]
    assert listing[5].startswith("lrwxrwxrwx") and listing[5].endswith("bin -> usr/bin")
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "etc/hello", "etc/odd"],
        input=out.getvalue(),
        cwd=extract,
        check=True,
    )
    assert (extract / "etc/hello").read_text() == "hello\n"
    assert (extract / "etc/odd").read_bytes() == b"abc"


def test_cpio_archives_are_reproducible(tmp_path: Path):
    (tmp_path / "a").write_text("x")
    entries = [CpioEntry("a", stat.S_IFREG | 0o644, source=str(tmp_path / "a"))]
    first, second = io.BytesIO(), io.BytesIO()
    write_cpio(entries, first)
    os.utime(tmp_path / "a", (1, 1))  # times are not archived
    write_cpio(entries, second)
    assert first.getvalue() == second.getvalue()


def test_the_key_changes_with_a_file_and_only_then(tmp_path: Path):
    spec = ImageSpec()
    data = tmp_path / "module.py"
    data.write_text("x = 1\n")
    files = [rootfs.GuestFile("/opt/m.py", source=str(data)), rootfs.GuestFile("/etc/x", data=b"1")]
    inputs = {"kernel": "k=1"}
    key = image_key(spec, inputs, files)
    assert image_key(spec, inputs, list(reversed(files))) == key
    data.write_text("x = 2\n")
    assert image_key(spec, inputs, files) != key
    data.write_text("x = 1\n")
    assert image_key(spec, inputs, files) == key
    assert image_key(spec, {"kernel": "k=2"}, files) != key
    assert image_key(ImageSpec(compression="zstd"), inputs, files) != key


def test_the_init_script_refuses_a_channel_name_that_is_not_a_word():
    with pytest.raises(ImageError):
        rootfs.init_script(kernel="6.1", modules=["virtio"], channel="a b; reboot", agent=["x"])
    script = rootfs.init_script(
        kernel="6.1",
        modules=["virtio", "virtio_console"],
        channel="agent",
        agent=["python3", "-m", "a"],
    )
    assert b"for module in virtio virtio_console; do" in script
    assert b'python3 -m a --device "/dev/virtio-ports/agent"' in script


def test_progress_prints_one_line_per_step_when_not_on_a_terminal():
    stream = io.StringIO()
    progress = Progress(2, stream)
    progress.step("first")
    progress.advance(1, 2)
    progress.step("second")
    progress.done("built")
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["[1/2] first", "[2/2] second"]
    assert lines[2].startswith("built (")


@needs_debian
def test_a_second_build_with_the_same_inputs_comes_from_the_cache(image: Image):
    stream = io.StringIO()
    again = build_image(ImageSpec(agent="standin"), TEST_IMAGES, progress=Progress(8, stream))
    assert again == image
    assert "is cached" in stream.getvalue()
    assert Path(image.directory).name == image.key


@needs_debian
def test_the_initramfs_holds_python_the_agent_and_the_virtio_modules(image: Image):
    raw = Path(image.initrd).read_bytes()  # uncompressed by default: faster to unpack under TCG
    listing = cpio_listing(raw)
    names = {line.split()[-1] if "->" not in line else line.split()[-3] for line in listing}
    modules = f"usr/lib/modules/{image.kernel_version}"
    for wanted in [
        "init",
        "dev/console",
        "usr/bin/busybox",
        "usr/bin/python3.11",
        "usr/lib/python3.11/os.py",
        "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
        "opt/cube/lib/trio/__init__.py",
        "opt/cube/lib/msgspec/_core.cpython-311-x86_64-linux-gnu.so",
        "opt/cube/lib/guest/protocol.py",
        "opt/cube/lib/cube_standin_envd.py",
        f"{modules}/virtio_console.ko",
        f"{modules}/virtio_mmio.ko",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
    ]:
        assert wanted in names, wanted
    assert not any(
        name.startswith(("usr/lib/python3.11/test/", "usr/lib/python3.11/idlelib/"))
        for name in names
    )
    assert not any("/_tests/" in name for name in names)


@needs_debian
def test_modules_load_after_what_they_depend_on(image: Image, tmp_path: Path):
    kernel = image.inputs["kernel"].split("=")
    deb = debian.fetch_deb(
        debian.DebPackage(kernel[0], kernel[1]), Path(TEST_IMAGES) / "images" / "debs"
    )
    unpacked = debian.unpack_deb(deb, tmp_path / "k")
    modules_dir = unpacked / "lib/modules" / image.kernel_version
    order = [
        m.name
        for m in debian.module_load_order(
            modules_dir, ["virtio_console", "virtio_mmio"], optional=["no_such_module"]
        )
    ]
    assert order.index("virtio") < order.index("virtio_console")
    assert order.index("virtio_ring") < order.index("virtio")
    assert order.index("virtio") < order.index("virtio_mmio")
    assert "no_such_module" not in order
    with pytest.raises(ImageError):
        debian.module_load_order(modules_dir, ["no_such_module"])
    info = debian.modinfo(modules_dir / "kernel/drivers/char/virtio_console.ko")
    assert info["name"] == "virtio_console"


def test_the_gpt_table_has_valid_checksums_and_one_esp_at_1_mib():
    import struct
    import zlib

    from cube.images.uefi_disk import ESP_START, ESP_TYPE, SECTOR, gpt_partition_table

    total, esp = 200_000, 131_072
    head, tail = gpt_partition_table(total, esp, "seed")
    assert head[510:512] == b"\x55\xaa" and head[446 + 4] == 0xEE  # protective MBR
    for header, entries in (
        (head[SECTOR : 2 * SECTOR], head[2 * SECTOR :]),
        (tail[-SECTOR:], tail[:-SECTOR]),
    ):
        assert header[:8] == b"EFI PART"
        crc = struct.unpack_from("<I", header, 16)[0]
        assert zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:92]) == crc
        assert struct.unpack_from("<I", header, 88)[0] == zlib.crc32(entries)
        type_guid, _, first, last = struct.unpack_from("<16s16sQQ", entries)
        assert (type_guid, first, last) == (ESP_TYPE.bytes_le, ESP_START, ESP_START + esp - 1)
    assert gpt_partition_table(total, esp, "seed") == (head, tail)  # reproducible
    with pytest.raises(ImageError):
        gpt_partition_table(total, total, "seed")
