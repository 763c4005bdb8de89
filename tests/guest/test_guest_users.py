"""Who requests act as: default users, homes, relative paths, and refusing what envd cannot do."""

from __future__ import annotations

import os
import pwd

import pytest

from guest.protocol import InvalidArgument, PermissionDenied, Unauthenticated
from guest.users import Accounts

NOBODY = pwd.getpwnam("nobody")
ROOT = pwd.getpwuid(0)


def test_a_missing_default_user_falls_back_to_envds_own_account():
    accounts = Accounts("no-such-user-anywhere", euid=0)
    assert accounts.default.name == ROOT.pw_name and accounts.resolve(None).uid == 0


def test_an_existing_default_user_is_used_when_envd_is_root():
    accounts = Accounts("nobody", euid=0)
    assert accounts.resolve(None).uid == NOBODY.pw_uid
    assert accounts.resolve("root").uid == 0


def test_when_envd_is_not_root_the_default_user_is_envd_itself():
    accounts = Accounts("root", euid=NOBODY.pw_uid)
    assert not accounts.is_root and accounts.default.uid == NOBODY.pw_uid


def test_when_envd_is_not_root_it_refuses_to_act_as_someone_else():
    accounts = Accounts("user", euid=NOBODY.pw_uid)
    with pytest.raises(PermissionDenied):
        accounts.resolve("root")
    assert accounts.resolve("nobody").uid == NOBODY.pw_uid


def test_an_unknown_user_is_unauthenticated():
    with pytest.raises(Unauthenticated):
        Accounts("nobody", euid=0).resolve("no-such-user-anywhere")


def test_relative_paths_and_tilde_start_at_the_users_home():
    accounts = Accounts("nobody", euid=0)
    nobody = accounts.resolve(None)
    assert accounts.resolve_path(nobody, "a/b") == os.path.join(NOBODY.pw_dir, "a/b")
    assert accounts.resolve_path(nobody, "~/c") == os.path.join(NOBODY.pw_dir, "c")
    assert accounts.resolve_path(nobody, "/abs/../x") == "/x"
    assert accounts.resolve_path(nobody, "") == NOBODY.pw_dir


def test_the_default_workdir_replaces_an_empty_path():
    accounts = Accounts("nobody", "/srv", euid=0)
    assert accounts.resolve_path(accounts.default, "") == "/srv"


def test_another_users_tilde_is_refused():
    accounts = Accounts("nobody", euid=0)
    with pytest.raises(InvalidArgument):
        accounts.resolve_path(accounts.default, "~root/x")


def test_a_process_environment_names_the_user_and_home():
    accounts = Accounts("nobody", euid=0)
    env = accounts.environment(accounts.default)
    assert (env["USER"], env["LOGNAME"], env["HOME"]) == ("nobody", "nobody", NOBODY.pw_dir)
    assert env["PATH"]


def test_spawning_as_another_user_switches_ids_only_when_envd_is_root():
    as_root = Accounts("nobody", euid=0)
    assert as_root.spawn_credentials(as_root.default)["user"] == NOBODY.pw_uid
    as_nobody = Accounts("nobody", euid=NOBODY.pw_uid)
    assert as_nobody.spawn_credentials(as_nobody.default) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_the_filesystem_identity_is_the_users_inside_and_envds_after(tmp_path):
    accounts = Accounts("nobody", euid=0)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with accounts.filesystem_identity(accounts.default), pytest.raises(PermissionError):
        os.listdir(private)
    assert os.listdir(private) == []
