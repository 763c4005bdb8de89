"""envd's plain-HTTP surface: ``GET /files``, ``POST /files`` and ``/health`` (docs/e2b-protocol.md §4).

Downloads stream the guest's ``fs.read`` events into the response; uploads stream the request
body into the guest's ``fs.write`` input, part by part for ``multipart/form-data`` (decoded
with werkzeug's sans-IO decoder, nothing spooled to the host's disk) and whole for
``application/octet-stream`` (gunzipped on the fly when ``Content-Encoding: gzip``). Either
kind is bounded by ``Limits.upload`` after decompression.

Access: ``X-Access-Token`` or a valid URL signature (§3.8). A signed URL fetched without the
routing headers (``download_url()`` with ``E2B_SANDBOX_URL``) names no sandbox; the one whose
token produced the signature is the one meant.
"""

from __future__ import annotations

import contextlib
import posixpath
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from guest import protocol
from guest.protocol import GuestError

from .auth import BAD_TOKEN, file_signature, token_matches, verify_file_signature
from .connect import Done, Failed, Relay
from .context import ApiContext
from .errors import (
    ApiError,
    BadRequest,
    PayloadTooLarge,
    SandboxGone,
    StreamAborted,
    Unauthorized,
    rest_body,
)
from .routing import sandbox_of
from .sandboxes import Target

__all__ = ["register_files"]

OCTET: Final = "application/octet-stream"
MULTIPART: Final = "multipart/form-data"
_ENCODER: Final = msgspec.json.Encoder()


class WrittenFile(msgspec.Struct, frozen=True, omit_defaults=True):
    path: str
    name: str
    type: str = "file"
    metadata: dict[str, str] | None = None


def _error_response(error: Exception) -> Response:
    status, body = rest_body(error)
    return Response(body, status=status, content_type="application/json")


def _content_disposition(name: str) -> str:
    if name.isascii() and '"' not in name and "\\" not in name:
        return f'inline; filename="{name}"'
    return "inline; filename*=UTF-8''" + urllib.parse.quote(name, safe="")


def _wants_gzip(header: str | None) -> bool:
    """Only an explicit ``Accept-Encoding: gzip`` (the SDK's ``gzip=True``) gets compression.

    httpx advertises ``gzip, deflate`` on every request; compressing every download for it
    would cost CPU on the host for no gain on a fast link.
    """
    if not header:
        return False
    codings = [c.split(";")[0].strip().lower() for c in header.split(",") if c.strip()]
    return codings == ["gzip"]


def _metadata_headers() -> dict[str, str]:
    """The ``X-Metadata-*`` headers; an upload without any clears the file's old metadata."""
    return {
        name[len("X-Metadata-") :].lower(): value
        for name, value in request.headers.items()
        if name.lower().startswith("x-metadata-") and len(name) > len("X-Metadata-")
    }


class FileTransfer:
    """The ``/files`` handlers of one server."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def target(self, operation: str) -> Target:
        """The sandbox of a ``/files`` request, with its token or signature checked."""
        query = request.args
        address = sandbox_of(request.scope)
        if address is None:
            return await self._target_by_signature(operation)
        target = await self.ctx.directory.resolve(address.sandbox_id)
        token = request.headers.get("X-Access-Token")
        if token is not None:
            if not token_matches(token, target.record.envd_access_token):
                raise Unauthorized(BAD_TOKEN)
        else:
            verify_file_signature(query, operation, target.record.envd_access_token)
        return target

    async def _target_by_signature(self, operation: str) -> Target:
        query = request.args
        signature = query.get("signature", "")
        for record in await self.ctx.directory.running():
            token = record.envd_access_token
            if not token:
                continue
            expiration = query.get("signature_expiration")
            expected = file_signature(
                query.get("path", ""),
                operation,
                query.get("username", ""),
                token,
                int(expiration) if expiration and expiration.isdigit() else None,
            )
            if token_matches(signature, expected):
                verify_file_signature(query, operation, token)
                return await self.ctx.directory.resolve(record.id)
        raise Unauthorized("the signature matches no running sandbox")

    # -- download ---------------------------------------------------------------------------------

    async def download(self) -> Response:
        try:
            target = await self.target("read")
            path = request.args.get("path", "")
            if not path:
                raise BadRequest("the path query parameter is required")
            user = request.args.get("username") or None
            args = protocol.FsRead(path=path, user=user)

            async def produce(send: Any) -> None:
                async with target.client.open_stream("fs.read", args) as stream:
                    async for item in stream:
                        await send.send(item)

            relay: Relay[Any] = Relay(self.ctx.nursery, produce)
            first = await relay.next()
            if isinstance(first, Failed):
                relay.close()
                raise first.error
        except (ApiError, GuestError) as exc:
            return _error_response(exc)
        name = posixpath.basename(path.rstrip("/")) or path
        if isinstance(first, tuple) and first[0] == "start":
            name = first[1].entry.name
        headers = {"Content-Disposition": _content_disposition(name)}
        gzip = _wants_gzip(request.headers.get("Accept-Encoding"))
        if gzip:
            headers["Content-Encoding"] = "gzip"
        return Response(_download_body(relay, first, gzip), status=200, content_type=OCTET, headers=headers)

    # -- upload -----------------------------------------------------------------------------------

    async def upload(self) -> Response:
        try:
            target = await self.target("write")
            user = request.args.get("username") or None
            metadata = _metadata_headers()
            mimetype = (request.mimetype or "").lower()
            if mimetype == MULTIPART:
                written = await self._multipart(target, user, metadata)
            elif mimetype == OCTET:
                written = [await self._octet_stream(target, user, metadata)]
            else:
                raise BadRequest(f"uploads take {MULTIPART} or {OCTET}, not {mimetype or 'nothing'}")
        except (ApiError, GuestError) as exc:
            return _error_response(exc)
        return Response(_ENCODER.encode(written), status=200, content_type="application/json")

    async def _octet_stream(self, target: Target, user: str | None, metadata: dict[str, str]) -> WrittenFile:
        path = request.args.get("path", "")
        if not path:
            raise BadRequest("the path query parameter is required for application/octet-stream uploads")
        encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip or identity)")
        inflater = zlib.decompressobj(wbits=31) if encoding == "gzip" else None
        limit = self.ctx.limits.upload
        size = 0
        args = protocol.FsWrite(path=path, user=user, metadata=metadata)
        async with target.client.open_stream("fs.write", args) as stream:
            async for chunk in request.body:
                if inflater is not None:
                    try:
                        chunk = inflater.decompress(chunk, limit - size + 1)
                    except zlib.error as exc:
                        raise BadRequest(f"invalid gzip body: {exc}") from None
                    if inflater.unconsumed_tail:
                        raise PayloadTooLarge(f"upload exceeds the {limit} byte limit")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"upload exceeds the {limit} byte limit")
                if chunk:
                    await stream.send_input(chunk)
            if inflater is not None and not inflater.eof:
                raise BadRequest("the gzip body is truncated")
            await stream.send_input(b"", eof=True)
            result: protocol.EntryResult = await stream.wait()
        return _written(result.entry, metadata)

    async def _multipart(self, target: Target, user: str | None, metadata: dict[str, str]) -> list[WrittenFile]:
        _, options = parse_options_header(request.headers.get("Content-Type", ""))
        boundary = options.get("boundary", "")
        if not boundary or len(boundary) > 200:
            raise BadRequest("multipart/form-data needs a boundary")
        decoder = MultipartDecoder(boundary.encode(), max_form_memory_size=8 << 20, max_parts=1000)
        path_param = request.args.get("path") or None
        limit = self.ctx.limits.upload
        size = 0
        seen: set[str] = set()
        written: list[WrittenFile] = []
        async with contextlib.AsyncExitStack() as files:
            stream: Any = None
            finished = False

            async def handle(event: Any) -> None:
                nonlocal stream, size
                if isinstance(event, File):
                    stream = None
                    if event.name != "file":
                        return
                    destination = path_param if path_param and not written and not seen else event.filename
                    if not destination:
                        raise BadRequest("a file part needs a filename (its destination path)")
                    if destination in seen:
                        raise BadRequest(f"two parts write to {destination!r}")
                    seen.add(destination)
                    args = protocol.FsWrite(path=destination, user=user, metadata=metadata)
                    stream = await files.enter_async_context(target.client.open_stream("fs.write", args))
                elif isinstance(event, Field):
                    stream = None
                elif isinstance(event, Data) and stream is not None and (event.data or not event.more_data):
                    size += len(event.data)
                    if size > limit:
                        raise PayloadTooLarge(f"upload exceeds the {limit} byte limit")
                    await stream.send_input(event.data, eof=not event.more_data)
                    if not event.more_data:
                        result: protocol.EntryResult = await stream.wait()
                        written.append(_written(result.entry, metadata))
                        stream = None

            try:
                async for chunk in request.body:
                    decoder.receive_data(chunk)
                    while not isinstance(event := decoder.next_event(), NeedData | Epilogue):
                        await handle(event)
                    if isinstance(event, Epilogue):
                        finished = True
                decoder.receive_data(None)
                while not finished and not isinstance(event := decoder.next_event(), Epilogue):
                    await handle(event)
            except RequestEntityTooLarge:
                raise PayloadTooLarge("a multipart part header is too large") from None
            except ValueError as exc:
                raise BadRequest(f"malformed multipart body: {exc}") from None
        if not written:
            raise BadRequest("the upload holds no file part named 'file'")
        return written


def _written(entry: protocol.EntryInfo, metadata: dict[str, str]) -> WrittenFile:
    return WrittenFile(path=entry.path, name=entry.name, metadata=metadata or None)


async def _download_body(relay: Relay[Any], first: Any, gzip: bool) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
    try:
        item = first
        while not isinstance(item, Done | Failed):
            ev, body = item
            if ev == "data" and body.data:
                yield compressor.compress(body.data) if compressor else body.data
            item = await relay.next()
        if isinstance(item, Failed):
            # Headers are gone already: cut the connection so the client sees a failed
            # transfer rather than a short file that looks complete.
            raise StreamAborted(f"download failed midway: {item.error}")
        if compressor is not None:
            yield compressor.flush()
    finally:
        relay.close()


def register_files(app: QuartTrio, ctx: ApiContext) -> FileTransfer:
    """Add ``/files`` and ``/health`` to the envd app."""
    transfer = FileTransfer(ctx)

    @app.get("/files")
    async def download() -> Response:
        return await transfer.download()

    @app.post("/files")
    async def upload() -> Response:
        return await transfer.upload()

    @app.get("/health")
    async def health() -> Response:
        address = sandbox_of(request.scope)
        try:
            await ctx.directory.resolve(address.sandbox_id if address else "")
        except SandboxGone as exc:
            return _error_response(exc)
        return Response(b"", status=204)

    return transfer
