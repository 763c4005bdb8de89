"""A small blocking client of a running ``cube serve``, for the CLI (``cube ls``, ``exec`` ...).

Standard library only: the CLI must start fast and work without the SDKs. It speaks the same
HTTP surfaces the E2B SDK does — REST with ``X-API-KEY``, and envd's Connect protocol (JSON
codec, enveloped stream) with the sandbox's access token and routing headers.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["Remote", "RemoteError", "find_api_key"]

ENVD_PORT = "49983"


class RemoteError(Exception):
    """The server answered with an error (or could not be reached); the message says which."""


def find_api_key(state_dir: str | None) -> str | None:
    """``CUBE_API_KEY``/``E2B_API_KEY``, else the key a local node generated in its journal."""
    for var in ("CUBE_API_KEY", "E2B_API_KEY"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value:
            return value
    if state_dir:
        journal = Path(state_dir) / "journal.db"
        if journal.exists():
            try:
                with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
                    row = db.execute("SELECT value FROM settings WHERE key = 'api_key'").fetchone()
            except sqlite3.Error:
                return None
            if row:
                return str(row[0])
    return None


class Remote:
    """Talks to one server at ``url`` with ``api_key``."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _open(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> IO[bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if self.api_key:
            request.add_header("X-API-KEY", self.api_key)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise RemoteError(f"{method} {path}: {exc.code} {detail}") from None
        except urllib.error.URLError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc.reason}") from None

    def rest(self, method: str, path: str, payload: Any = None) -> Any:
        """One REST call; returns the decoded JSON body (None when empty)."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with self._open(method, path, body, headers) as response:
            data = response.read()
        return json.loads(data) if data else None

    def text(self, path: str) -> str:
        with self._open("GET", path) as response:
            return str(response.read().decode())

    # -- commands ---------------------------------------------------------------------------

    def sandboxes(self, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?{urllib.parse.urlencode({'state': state})}" if state else ""
        result: list[dict[str, Any]] = self.rest("GET", f"/v2/sandboxes{query}")
        return result

    def create(self, template: str, timeout: int | None, metadata: dict[str, str]) -> dict[str, Any]:
        payload: dict[str, Any] = {"templateID": template, "metadata": metadata}
        if timeout is not None:
            payload["timeout"] = timeout
        result: dict[str, Any] = self.rest("POST", "/sandboxes", payload)
        return result

    def kill(self, sandbox_id: str) -> None:
        self.rest("DELETE", f"/sandboxes/{urllib.parse.quote(sandbox_id)}")

    def tree(self) -> str:
        return self.text("/admin/tree?format=text")

    def exec(self, sandbox_id: str, argv: list[str], out: IO[bytes], err: IO[bytes]) -> int:
        """Run ``argv`` in the sandbox, copying its output as it comes; returns its exit code."""
        info = self.rest("GET", f"/sandboxes/{urllib.parse.quote(sandbox_id)}")
        request = {"process": {"cmd": argv[0], "args": argv[1:]}, "stdin": False}
        headers = {
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
            "E2b-Sandbox-Id": sandbox_id,
            "E2b-Sandbox-Port": ENVD_PORT,
        }
        token = info.get("envdAccessToken")
        if token:
            headers["X-Access-Token"] = token
        body = _envelope(json.dumps(request).encode())
        code = 0
        with self._open("POST", "/process.Process/Start", body, headers) as response:
            for flags, message in _envelopes(response):
                data = json.loads(message)
                if flags & 0x02:  # end of stream: an error travels here
                    if data.get("error"):
                        raise RemoteError(data["error"].get("message", "the command failed"))
                    break
                event = data.get("event", {})
                if "data" in event:
                    for key, sink in (("stdout", out), ("stderr", err)):
                        if key in event["data"]:
                            sink.write(base64.b64decode(event["data"][key]))
                            sink.flush()
                elif "end" in event:
                    code = int(event["end"].get("exitCode", 0))
        return code


def _envelope(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def _envelopes(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    while True:
        header = stream.read(5)
        if len(header) < 5:
            return
        flags, size = struct.unpack(">BI", header)
        yield flags, stream.read(size)
