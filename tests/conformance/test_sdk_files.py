"""Files through the real ``e2b`` SDK (sync client): /files both encodings, gzip, the
filesystem RPCs, watches, and signed URLs."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from e2b import FileNotFoundException, FileType, Sandbox
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType


def test_write_and_read_text_and_bytes(sbx: Sandbox, workdir: str) -> None:
    info = sbx.files.write(f"{workdir}/a/b.txt", "héllo")
    assert info.path == f"{workdir}/a/b.txt" and info.name == "b.txt"
    assert sbx.files.read(f"{workdir}/a/b.txt") == "héllo"
    payload = bytes(range(256)) * 100
    sbx.files.write(f"{workdir}/bin", payload)
    assert sbx.files.read(f"{workdir}/bin", format="bytes") == payload
    streamed = b"".join(sbx.files.read(f"{workdir}/bin", format="stream"))
    assert streamed == payload


def test_write_overwrites(sbx: Sandbox, workdir: str) -> None:
    sbx.files.write(f"{workdir}/f", "long content")
    sbx.files.write(f"{workdir}/f", "short")
    assert sbx.files.read(f"{workdir}/f") == "short"


def test_write_a_file_like_object_and_an_iterable_streams_octets(sbx: Sandbox, workdir: str) -> None:
    big = b"x" * (3 << 20) + b"end"
    sbx.files.write(f"{workdir}/big", io.BytesIO(big))
    assert sbx.files.read(f"{workdir}/big", format="bytes") == big
    sbx.files.write(f"{workdir}/chunks", iter([b"a", b"b", b"c"]))
    assert sbx.files.read(f"{workdir}/chunks") == "abc"


def test_gzip_both_ways(sbx: Sandbox, workdir: str) -> None:
    text = "compress me " * 1000
    sbx.files.write(f"{workdir}/z.txt", text, gzip=True)
    assert sbx.files.read(f"{workdir}/z.txt", gzip=True) == text


def test_write_files_writes_several(sbx: Sandbox, workdir: str) -> None:
    written = sbx.files.write_files(
        [{"path": f"{workdir}/m/1.txt", "data": "one"}, {"path": f"{workdir}/m/2.txt", "data": b"two"}]
    )
    assert sorted(w.name for w in written) == ["1.txt", "2.txt"]
    assert sbx.files.read(f"{workdir}/m/2.txt") == "two"


def test_metadata_round_trips_through_stat(sbx: Sandbox, workdir: str) -> None:
    sbx.files.write(f"{workdir}/meta.txt", "m", metadata={"Owner": "alice"})
    info = sbx.files.get_info(f"{workdir}/meta.txt")
    assert info.metadata == {"owner": "alice"}


def test_read_missing_raises(sbx: Sandbox, workdir: str) -> None:
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{workdir}/missing")


def test_exists_info_list_make_dir_rename_remove(sbx: Sandbox, workdir: str) -> None:
    assert sbx.files.make_dir(f"{workdir}/d/e") is True
    assert sbx.files.make_dir(f"{workdir}/d/e") is False
    sbx.files.write(f"{workdir}/d/e/f.txt", "12345")
    assert sbx.files.exists(f"{workdir}/d/e/f.txt")
    assert not sbx.files.exists(f"{workdir}/nope")
    info = sbx.files.get_info(f"{workdir}/d/e/f.txt")
    assert (info.name, info.type, info.size, info.mode) == ("f.txt", FileType.FILE, 5, 0o644)
    assert info.permissions == "-rw-r--r--"
    shallow = sbx.files.list(f"{workdir}/d")
    assert [(e.name, e.type) for e in shallow] == [("e", FileType.DIR)]
    deep = sbx.files.list(f"{workdir}/d", depth=2)
    assert sorted(e.path for e in deep) == [f"{workdir}/d/e", f"{workdir}/d/e/f.txt"]
    moved = sbx.files.rename(f"{workdir}/d/e/f.txt", f"{workdir}/g.txt")
    assert moved.path == f"{workdir}/g.txt"
    assert sbx.files.read(f"{workdir}/g.txt") == "12345"
    sbx.files.remove(f"{workdir}/d")
    assert not sbx.files.exists(f"{workdir}/d")
    sbx.files.remove(f"{workdir}/d")  # a missing path is not an error
    with pytest.raises(FileNotFoundException):
        sbx.files.list(f"{workdir}/d")


def test_watch_dir_polls_events(sbx: Sandbox, workdir: str) -> None:
    sbx.files.make_dir(workdir)
    handle = sbx.files.watch_dir(workdir, recursive=True)
    try:
        sbx.files.write(f"{workdir}/w.txt", "1")
        events = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            events += handle.get_new_events()
            if any(e.name == "w.txt" for e in events):
                break
            time.sleep(0.1)
        assert any(e.name == "w.txt" and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE) for e in events)
    finally:
        handle.stop()


def test_watching_a_missing_dir_raises(sbx: Sandbox, workdir: str) -> None:
    with pytest.raises(FileNotFoundException):
        sbx.files.watch_dir(f"{workdir}/none")


def test_signed_urls_work_without_routing_headers(sbx: Sandbox, workdir: str) -> None:
    upload = sbx.upload_url(f"{workdir}/signed.txt")
    download = sbx.download_url(f"{workdir}/signed.txt", use_signature_expiration=60)
    with httpx.Client(timeout=10) as plain:
        sent = plain.post(upload, files={"file": ("signed.txt", b"via url")})
        assert sent.status_code == 200, sent.text
        got = plain.get(download)
        assert got.status_code == 200 and got.content == b"via url"
        forged = plain.get(download.replace("signature=v1_", "signature=v1_x"))
        assert forged.status_code == 401


def test_overwriting_without_metadata_clears_it(sbx: Sandbox, workdir: str) -> None:
    sbx.files.write(f"{workdir}/m.txt", "1", metadata={"author": "ann"})
    sbx.files.write(f"{workdir}/m.txt", "2")
    assert not sbx.files.get_info(f"{workdir}/m.txt").metadata
