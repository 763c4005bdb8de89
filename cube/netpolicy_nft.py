"""How an nftables batch reaches the kernel: libnftables through ctypes, or ``nft -f -``.

Both runners take one script of nft commands and commit it as one netlink transaction:
either every command applies or none does. ``LibNftables`` calls ``nft_run_cmd_from_buffer``
in a worker thread (about 0.3 ms a batch here); ``NftProcess`` starts one ``nft -f -``
process per batch with the script on stdin (about 16 ms a batch here, nearly all of it
process start-up). ``open_runner("auto")`` takes the library when it loads and the
command otherwise. Numbers and method: docs/network.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import threading
from collections.abc import Iterator
from typing import Any, Literal, Protocol

import trio

__all__ = [
    "LibNftables",
    "NetPolicyError",
    "NftError",
    "NftProcess",
    "NftRunner",
    "RunnerKind",
    "decode_json_documents",
    "open_runner",
]

RunnerKind = Literal["auto", "lib", "process"]

# enum nft_output_flags in <nftables/libnftables.h>
_NFT_CTX_OUTPUT_JSON = 1 << 4
_LIBNAMES = ("libnftables.so.1", "libnftables.so")


class NetPolicyError(Exception):
    """A network policy operation failed; the message says which and why."""


class NftError(NetPolicyError):
    """nft refused a batch (nothing of it was applied) or could not be run at all.

    ``message`` is nft's own error text, which quotes the offending line of the batch.
    """

    def __init__(self, message: str, script: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.script = script


class NftRunner(Protocol):
    """Something that commits one nft script as one transaction."""

    name: str

    async def run(self, script: str, *, json_output: bool = False) -> str:
        """Run ``script``; return what nft printed (JSON text when ``json_output``).

        Raises ``NftError`` if nft rejects any command: then none of them applied.
        """
        ...

    def close(self) -> None:
        """Release what the runner holds; it is not used afterwards."""
        ...


class NftProcess:
    """Runs each batch as one ``nft -f -`` process, the script on its stdin."""

    name = "process"

    def __init__(self, nft: str | None = None) -> None:
        path = nft or shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
        if path is None:
            raise NftError("the nft command is not installed (Debian package: nftables)")
        self.nft = path

    async def run(self, script: str, *, json_output: bool = False) -> str:
        argv = [self.nft, *(["-j"] if json_output else []), "-f", "-"]
        done = await trio.run_process(
            argv,
            stdin=script.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if done.returncode != 0:
            raise NftError(done.stderr.decode(errors="replace").strip(), script)
        return done.stdout.decode()

    def close(self) -> None:
        pass


class LibNftables:
    """Runs each batch through libnftables in a worker thread.

    One nft context serves every call; a lock keeps calls one at a time because a context
    is not thread-safe and its output buffers are per context. The worker thread is not
    abandoned on cancellation, so a batch that started always finishes (it is atomic in
    the kernel anyway) and the context stays consistent.
    """

    name = "lib"

    def __init__(self, library: str | None = None) -> None:
        self._lib = _load_libnftables(library)
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        self._lock = trio.Lock()
        # Guards the context against close() racing a worker thread still inside it.
        self._thread_lock = threading.Lock()

    async def run(self, script: str, *, json_output: bool = False) -> str:
        async with self._lock:
            return await trio.to_thread.run_sync(self._run_blocking, script, json_output)

    def run_blocking(self, script: str, *, json_output: bool = False) -> str:
        """The synchronous form of ``run``, for callers outside trio (benchmarks, tools)."""
        return self._run_blocking(script, json_output)

    def _run_blocking(self, script: str, json_output: bool) -> str:
        with self._thread_lock:
            ctx = self._ctx
            if ctx is None:
                raise NftError("libnftables context is closed", script)
            lib = self._lib
            lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON if json_output else 0)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            # Reading a buffer also rewinds it, so read both on every call: stale text
            # must never leak into the next call's answer.
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            if json_output:
                lib.nft_ctx_output_set_flags(ctx, 0)
        if rc != 0:
            raise NftError(err.strip() or f"libnftables returned {rc}", script)
        return out

    def close(self) -> None:
        with self._thread_lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


def _load_libnftables(library: str | None) -> Any:
    """Load libnftables and declare the few functions we call; ``NftError`` if absent."""
    names = [library] if library else [*_LIBNAMES, ctypes.util.find_library("nftables")]
    errors: list[str] = []
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        return lib
    raise NftError("libnftables is not available: " + "; ".join(errors or ["not found"]))


def open_runner(kind: RunnerKind = "auto") -> NftRunner:
    """A runner of the given kind; ``auto`` prefers libnftables and falls back to nft.

    Raises ``NftError`` if the requested kind (or, for ``auto``, either kind) is missing.
    """
    if kind == "lib":
        return LibNftables()
    if kind == "process":
        return NftProcess()
    try:
        return LibNftables()
    except NftError:
        return NftProcess()


def decode_json_documents(text: str) -> Iterator[dict[str, Any]]:
    """Each JSON document of ``text``: nft prints one per ``list`` command, back to back."""
    decoder = json.JSONDecoder()
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return
        doc, pos = decoder.raw_decode(text, pos)
        yield doc
