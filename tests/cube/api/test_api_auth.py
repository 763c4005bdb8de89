"""API keys, access tokens and E2B's signed file URLs."""

from __future__ import annotations

import base64
import re

import pytest

from cube.api.auth import (
    ApiKeys,
    basic_auth_user,
    file_signature,
    generate_api_key,
    token_matches,
    verify_file_signature,
)
from cube.api.errors import BadRequest, Unauthorized


def test_generated_keys_have_e2bs_format() -> None:
    key = generate_api_key()
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key)
    assert key != generate_api_key()


def test_keys_accept_any_configured_key_and_nothing_else() -> None:
    keys = ApiKeys(["e2b_one", "e2b_two"])
    keys.check("e2b_two")
    for wrong in ("e2b_three", "", None, "e2b_on"):
        with pytest.raises(Unauthorized):
            keys.check(wrong)


def test_no_keys_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        ApiKeys([])


def test_token_matches_never_matches_missing_tokens() -> None:
    assert token_matches("t", "t")
    assert not token_matches("", "")
    assert not token_matches(None, "t")
    assert not token_matches("t", None)


def test_basic_auth_user() -> None:
    header = "Basic " + base64.b64encode(b"root:").decode()
    assert basic_auth_user(header) == "root"
    assert basic_auth_user(None) is None
    with pytest.raises(Unauthorized):
        basic_auth_user("Bearer abc")
    with pytest.raises(Unauthorized):
        basic_auth_user("Basic !!!")


def test_file_signature_matches_the_sdks_algorithm() -> None:
    from e2b.sandbox.signature import get_signature

    ours = file_signature("/home/user/a.txt", "read", "", "tok")
    theirs = get_signature("/home/user/a.txt", "read", None, "tok")
    assert ours == theirs["signature"]


def test_verify_signature_checks_path_operation_user_and_expiry() -> None:
    good = file_signature("/a", "write", "user", "tok", 2000)
    query = {"path": "/a", "username": "user", "signature": good, "signature_expiration": "2000"}
    verify_file_signature(query, "write", "tok", now=1000)
    with pytest.raises(Unauthorized):
        verify_file_signature(query, "read", "tok", now=1000)
    with pytest.raises(Unauthorized):
        verify_file_signature({**query, "path": "/b"}, "write", "tok", now=1000)
    with pytest.raises(Unauthorized):
        verify_file_signature(query, "write", "tok", now=3000)
    with pytest.raises(BadRequest):
        verify_file_signature({**query, "signature_expiration": "soon"}, "write", "tok", now=1000)
    with pytest.raises(Unauthorized):
        verify_file_signature({"path": "/a"}, "write", "tok")
