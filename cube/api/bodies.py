"""Reading request bodies within a limit, and decoding them into typed Structs."""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec
from quart import request

from .errors import BadRequest, PayloadTooLarge

__all__ = ["Decoders", "read_limited"]

S = TypeVar("S")
EMPTY: Final = b"{}"


async def read_limited(limit: int) -> bytes:
    """The whole body of the current request, or ``PayloadTooLarge`` past ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class Decoders:
    """One msgspec JSON decoder per message type, made on first use and kept."""

    def __init__(self) -> None:
        self._by_type: dict[type, msgspec.json.Decoder[Any]] = {}

    def decode(self, kind: type[S], data: bytes) -> S:
        """``data`` (``{}`` when empty) as a ``kind``, or ``BadRequest`` saying what is wrong."""
        decoder = self._by_type.get(kind)
        if decoder is None:
            decoder = self._by_type[kind] = msgspec.json.Decoder(kind)
        try:
            return decoder.decode(data or EMPTY)  # type: ignore[no-any-return]
        except msgspec.DecodeError as exc:
            raise BadRequest(f"invalid {kind.__name__}: {exc}") from None
