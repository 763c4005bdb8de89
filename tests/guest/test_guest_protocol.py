"""The wire format: frames, payloads, errors and line splitting, without a running envd."""

from __future__ import annotations

import json

import msgspec
import pytest

from guest import protocol as p


def test_a_request_encodes_as_one_line_with_id_op_and_args():
    line = p.encode_request(7, "fs.stat", p.FsStat(path="/etc"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 7, "op": "fs.stat", "args": {"path": "/etc"}}


def test_a_cancel_frame_decodes_with_empty_args():
    request = p.decode_request(b'{"id": 7, "op": "cancel"}')
    assert (request.id, request.op, len(request.args)) == (7, "cancel", 0)


def test_args_decode_with_the_decoder_of_their_op():
    request = p.decode_request(p.encode_request(3, "process.start", p.ProcessStart(
        process=p.ProcessConfig(cmd="/bin/echo", args=["a"]), tag="t", timeout_ms=5)).strip())
    args = p.decode_args(request.op, request.args)
    assert isinstance(args, p.ProcessStart)
    assert (args.process.cmd, args.process.args, args.tag, args.stdin) == ("/bin/echo", ["a"], "t", True)


def test_missing_args_decode_as_the_ops_defaults():
    assert p.decode_args("process.list", msgspec.Raw()) == p.Empty()


def test_bytes_travel_as_standard_base64():
    line = p.encode_event(9, "data", p.ProcessOutput(stdout=b"\x00\xffhi"))
    assert json.loads(line) == {"id": 9, "ev": "data", "body": {"stdout": "AP9oaQ=="}}


def test_an_event_frame_routes_by_id_and_decodes_its_body_lazily():
    frame = p.decode_frame(p.encode_event(4, "end", p.ProcessEnded(
        exit_code=-1, exited=False, status="signal: killed", error="signal: killed")).strip())
    assert (frame.id, frame.ev) == (4, "end")
    end = p.decode_payload(p.OPS["process.start"].events["end"], frame.body)
    assert end.exit_code == -1 and end.status == "signal: killed"


def test_an_ok_frame_always_carries_a_payload_even_an_empty_one():
    assert json.loads(p.encode_ok(5)) == {"id": 5, "ok": {}}


def test_an_error_frame_carries_a_connect_code_and_a_message():
    line = p.encode_err(5, p.NotFound("no such file"))
    assert json.loads(line) == {"id": 5, "err": {"code": "not_found", "message": "no such file"}}


@pytest.mark.parametrize("error_type", p.GuestError.__subclasses__())
def test_every_error_code_comes_back_as_the_same_exception_type(error_type):
    body = error_type("why").to_wire()
    again = p.GuestError.from_wire(body)
    assert type(again) is error_type and again.message == "why"


def test_an_unknown_error_code_comes_back_as_unknown():
    assert type(p.GuestError.from_wire(p.ErrorBody(code="teapot"))) is p.Unknown


def test_error_codes_are_the_connect_codes():
    assert {code.value for code in p.ErrorCode} >= {
        "not_found", "invalid_argument", "already_exists", "deadline_exceeded",
        "permission_denied", "unavailable", "internal", "canceled", "resource_exhausted",
        "failed_precondition", "unimplemented", "unauthenticated",
    }


def test_a_line_that_is_not_json_is_an_invalid_argument():
    with pytest.raises(p.InvalidArgument):
        p.decode_request(b"{not json")


def test_an_unknown_op_is_unimplemented():
    with pytest.raises(p.Unimplemented):
        p.decode_args("teleport", msgspec.Raw(b"{}"))


def test_args_of_the_wrong_shape_are_an_invalid_argument():
    with pytest.raises(p.InvalidArgument):
        p.decode_args("fs.stat", msgspec.Raw(b'{"path": 5}'))


def test_entry_info_uses_e2b_field_names_and_enum_names():
    entry = p.EntryInfo(name="a", type=p.FileType.FILE, path="/a", mode=0o644,
                        permissions="-rw-r--r--", symlink_target=None)
    assert json.loads(p.encode(entry)) == {
        "name": "a", "type": "FILE_TYPE_FILE", "path": "/a", "mode": 420,
        "permissions": "-rw-r--r--",
    }


def test_every_op_has_an_args_decoder_and_typed_results():
    for op, spec in p.OPS.items():
        with pytest.raises(p.InvalidArgument):
            p.decode_args(op, msgspec.Raw(b"[]"))  # known op, wrong shape: not unimplemented
        for kind in (spec.args, spec.result, *spec.events.values()):
            assert issubclass(kind, p.Message)


def test_the_line_buffer_returns_complete_lines_only():
    lines = p.LineBuffer()
    assert lines.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert lines.feed(b":2}\n") == [b'{"b":2}']


def test_the_line_buffer_skips_blank_lines():
    assert p.LineBuffer().feed(b"\n\n{}\n\n") == [b"{}"]


def test_a_line_longer_than_the_limit_is_dropped_and_reported_once():
    lines = p.LineBuffer(max_frame=10)
    assert lines.feed(b"x" * 8) == []
    assert lines.feed(b"x" * 8) == [p.LineBuffer.OVERSIZED]
    assert lines.feed(b"x" * 100) == []
    assert lines.feed(b"x\n{}\n") == [b"{}"]


def test_a_complete_oversized_line_is_reported_in_its_place():
    assert p.LineBuffer(max_frame=4).feed(b"123456\n{}\n") == [p.LineBuffer.OVERSIZED, b"{}"]


def test_the_line_buffer_can_forget_a_partial_line():
    lines = p.LineBuffer()
    lines.feed(b'{"half')
    lines.discard_partial()
    assert lines.feed(b"{}\n") == [b"{}"]
