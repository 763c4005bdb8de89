"""The ns driver's pure parts, without root: the generated /etc, the root and /proc plans, the
init's step interpreter, resource names, and the address pool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cube.drivers import ns_init
from cube.drivers.base import DriverError
from cube.drivers.ns import dev_ops, etc_files, host_nameservers, pid1_ops, root_ops
from cube.drivers.ns_init import MS_NODEV, MS_RDONLY
from cube.drivers.ns_ipam import AddressPool
from cube.drivers.process import check_slot_id, node_tag, short_hash


def test_the_login_profile_sources_nothing_and_runs_no_command() -> None:
    profile, _ = etc_files("cube-s1", "10.99.0.2", ["192.0.2.53"])["profile"]
    assert "PATH=" in profile
    for slow in ("profile.d", ". ", "source", "$(", "`"):
        assert slow not in profile


def test_the_generated_etc_has_root_and_user_and_the_sandboxes_own_names() -> None:
    etc = etc_files("cube-s1", "10.99.0.2", ["192.0.2.53"])
    assert "user:x:1000:1000:user:/home/user:/bin/bash" in etc["passwd"][0]
    assert etc["passwd"][0].startswith("root:x:0:0:")
    assert "tty:x:5:" in etc["group"][0]  # devpts gid=5
    assert "10.99.0.2\tcube-s1" in etc["hosts"][0]
    assert etc["resolv.conf"][0] == "nameserver 192.0.2.53\n"
    assert etc["hostname"][0] == "cube-s1\n"
    assert etc["shadow"][1] == 0o600
    assert "hosts: files dns" in etc["nsswitch.conf"][0]


def test_loopback_nameservers_are_replaced_by_reachable_ones(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.1.2.3\nnameserver ::1\noptions edns0\n")
    assert host_nameservers(str(conf)) == ["10.1.2.3"]
    conf.write_text("nameserver 127.0.0.53\n")
    assert host_nameservers(str(conf)) == ["8.8.8.8", "1.1.1.1"]


def test_the_root_plan_binds_usr_read_only_and_mounts_limited_tmpfs() -> None:
    ops = root_ops(
        etc=etc_files("h", None, ["192.0.2.53"]),
        run_dir="/srv/slot/run",
        disk_mb=64,
        packages={"guest": "/src/guest"},
        site_packages=["/venv/site-packages"],
    )
    assert ("bind", "/usr", "usr", MS_RDONLY | MS_NODEV) in ops
    mounts = {op[2]: op[5] for op in ops if op[0] == "mount"}
    assert mounts["home/user"] == "size=64m,mode=755,uid=1000,gid=1000"
    assert mounts["tmp"] == "size=64m,mode=1777"
    binds = {op[2]: op for op in ops if op[0] == "bind"}
    assert (
        binds["opt/cube/src/guest"][1] == "/src/guest"
        and binds["opt/cube/src/guest"][3] & MS_RDONLY
    )
    assert binds["opt/cube/site-packages"][3] & MS_RDONLY
    assert binds["run/cube"][1] == "/srv/slot/run" and not binds["run/cube"][3] & MS_RDONLY
    if os.path.islink("/bin"):
        assert ("symlink", os.readlink("/bin"), "bin") in ops
    # every path is relative to the new root, never the host's
    assert all(
        not str(op[2] if op[0] in ("symlink", "bind", "mount") else op[1]).startswith("/")
        for op in ops
    )


def test_dev_holds_only_the_harmless_devices() -> None:
    nodes = {op[1]: (op[3], op[4]) for op in dev_ops(8) if op[0] == "mknod"}
    assert nodes == {
        "dev/null": (1, 3),
        "dev/zero": (1, 5),
        "dev/full": (1, 7),
        "dev/random": (1, 8),
        "dev/urandom": (1, 9),
        "dev/tty": (5, 0),
    }


def test_pid1_mounts_proc_first_and_makes_proc_sys_read_only() -> None:
    ops = pid1_ops()
    assert ops[0][:4] == ("mount", "proc", "proc", "proc")
    sys_bind = [op for op in ops if op[0] == "bind" and op[2] == "proc/sys"]
    assert sys_bind and sys_bind[0][3] & MS_RDONLY


def test_the_init_executes_file_steps_under_its_base(tmp_path: Path) -> None:
    ops: list[tuple[object, ...]] = [
        ("dir", "etc", 0o755, 0, 0),
        ("file", "etc/hostname", b"h\n", 0o640, 0, 0),
        ("symlink", "usr/bin", "bin"),
        ("dir", "var/tmp", 0o1777, 0, 0),
    ]
    old = os.umask(0o022)
    try:
        ns_init.run_ops(ns_init.Libc(), str(tmp_path), ops)
    finally:
        os.umask(old)
    assert (tmp_path / "etc/hostname").read_bytes() == b"h\n"
    assert os.readlink(tmp_path / "bin") == "usr/bin"
    assert (tmp_path / "var/tmp").stat().st_mode & 0o7777 == 0o1777
    with pytest.raises(ns_init.InitError, match=r"file .*etc/hostname"):
        ns_init.run_ops(ns_init.Libc(), str(tmp_path), [("file", "etc/hostname", b"", 0o644, 0, 0)])


def test_a_child_killed_by_a_signal_exits_the_holder_with_128_plus_the_signal() -> None:
    assert ns_init.exit_status(0) == 0
    assert ns_init.exit_status(3) == 3
    assert ns_init.exit_status(-9) == 137


def test_names_fit_the_kernels_limits_and_differ_between_nodes(tmp_path: Path) -> None:
    first, second = node_tag(str(tmp_path / "a")), node_tag(str(tmp_path / "b"))
    assert first != second and len(first) == 5
    assert node_tag(str(tmp_path / "a")) == first
    host_if = f"cv{first}{short_hash('a-rather-long-slot-id-of-forty-eight-characters', 8)}"
    assert len(host_if) == 15
    assert check_slot_id("pool-base-7", "start") == "pool-base-7"
    with pytest.raises(DriverError):
        check_slot_id("../etc", "start")


def test_the_address_pool_leases_each_address_once_and_never_the_gateway(tmp_path: Path) -> None:
    pool = AddressPool(str(tmp_path), "10.99.0.1", 29)  # 10.99.0.0-7: 5 usable addresses
    leased = {pool.acquire(f"n{i} s") for i in range(5)}
    assert leased == {"10.99.0.2", "10.99.0.3", "10.99.0.4", "10.99.0.5", "10.99.0.6"}
    with pytest.raises(DriverError, match="no free address"):
        pool.acquire("n9 s")
    assert not pool.release("10.99.0.2", "someone else")
    owner = pool.owner("10.99.0.2")
    assert owner is not None and pool.release("10.99.0.2", owner)
    assert set(pool.leases("n1 ")) <= leased and len(pool.leases("n")) == 4
