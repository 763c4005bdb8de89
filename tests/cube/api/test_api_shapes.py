"""REST shapes, the list filter decoding, routing by header and host, error bodies."""

from __future__ import annotations

import json

import msgspec
import pytest

from cube.api.errors import BadRequest, NotFound, SandboxGone, connect_body, rest_body
from cube.api.rest import decode_metadata_filter
from cube.api.routing import sandbox_address
from cube.api.shapes import (
    NewSandbox,
    detail_from_record,
    listed_from_record,
    rfc3339,
    sandbox_from_record,
)
from cube.store import Phase, SandboxRecord
from guest.protocol import NotFound as GuestNotFound

RECORD = SandboxRecord(
    id="abcdefghij0123456789",
    template="base",
    driver="process",
    state=Phase.PAUSED,
    metadata={"k": "v"},
    started_at=1700000000.5,
    end_at=1700000300.25,
    envd_access_token="tok",
    traffic_access_token="traffic",
)


def test_rfc3339_has_milliseconds_and_z() -> None:
    assert rfc3339(1700000000.5) == "2023-11-14T22:13:20.500Z"


def test_sandbox_shape_has_every_key_the_sdk_requires() -> None:
    body = json.loads(msgspec.json.encode(sandbox_from_record(RECORD)))
    assert {"templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken", "trafficAccessToken"} <= body.keys()


def test_listed_and_detail_shapes() -> None:
    listed = json.loads(msgspec.json.encode(listed_from_record(RECORD)))
    assert listed["state"] == "paused"
    assert listed["startedAt"] == "2023-11-14T22:13:20.500Z"
    assert {"cpuCount", "memoryMB", "diskSizeMB", "endAt", "clientID", "envdVersion"} <= listed.keys()
    detail = json.loads(msgspec.json.encode(detail_from_record(RECORD)))
    assert detail["lifecycle"] == {"autoResume": False, "onTimeout": "kill"}
    assert detail["envdAccessToken"] == "tok"


def test_new_sandbox_accepts_the_captured_body_and_rejects_bad_types() -> None:
    body = b'{"templateID":"base","timeout":120,"metadata":{"k":"v"},"envVars":{"FOO":"bar"}}'
    req = msgspec.json.decode(body, type=NewSandbox)
    assert (req.timeout, req.envVars) == (120, {"FOO": "bar"})
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"templateID":"base","timeout":-5}', type=NewSandbox)


def test_metadata_filter_is_decoded_as_e2b_encodes_it() -> None:
    # what the framework hands over after its own decoding of the captured query
    assert decode_metadata_filter("user%2520id=a%2526b&app=prod") == {"user id": "a&b", "app": "prod"}
    assert decode_metadata_filter(None) is None
    with pytest.raises(BadRequest):
        decode_metadata_filter("novalue")


def _scope(**headers: str) -> dict[str, object]:
    return {"headers": [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_routing_by_headers_and_by_host() -> None:
    by_header = sandbox_address(_scope(e2b_sandbox_id="abcdefghij0123456789", e2b_sandbox_port="49999"))
    assert by_header is not None and (by_header.sandbox_id, by_header.port) == ("abcdefghij0123456789", 49999)
    by_host = sandbox_address(_scope(host="49983-abcdefghij0123456789.cube.example:3000"))
    assert by_host is not None and by_host.port == 49983
    assert sandbox_address(_scope(host="api.cube.example")) is None
    assert sandbox_address(_scope(host="49983-../../etc.example")) is None
    junk = sandbox_address(_scope(e2b_sandbox_id="x", e2b_sandbox_port="port"))
    assert junk is not None and junk.port == 0


def test_error_bodies() -> None:
    assert rest_body(NotFound("gone")) == (404, b'{"code":404,"message":"gone"}')
    status, body = rest_body(SandboxGone("abcdefghij0123456789"))
    assert status == 502
    assert json.loads(body) == {"sandboxId": "abcdefghij0123456789", "message": "The sandbox was not found", "code": 502}
    status, body = connect_body(GuestNotFound("process with pid 9 not found"))
    assert status == 404 and json.loads(body)["code"] == "not_found"
    status, body = rest_body(RuntimeError("secret detail"))
    assert status == 500 and b"secret" not in body
