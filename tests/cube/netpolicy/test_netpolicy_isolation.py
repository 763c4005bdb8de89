"""The nft policy against real traffic: namespaces, veths, a bridge, NAT, real nftables.

Each test starts TCP servers in "the internet" namespace (198.18.N.1 and .2, and a private
LAN host 172.31.N.1), in both sandboxes (port 8080) and on the host (all addresses, a
free port), then probes them from the sandboxes. A server greets with its name and the
address it sees the client at, so a test also sees where NAT happened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import trio
from netpolicy_kit import (
    DENIED_TIMEOUT,
    Conversation,
    Topology,
    add_sandbox,
    free_port,
    probe,
    probe_udp,
    remove_sandbox,
    send_udp,
    serve,
    serve_udp,
    sh,
)

from cube.netpolicy import (
    DEFAULT_BLOCKED_OUT,
    EgressPolicy,
    NftError,
    NftPolicy,
    PortMap,
    SandboxNet,
)

DENIED = {"timeout", "EHOSTUNREACH", "ECONNREFUSED", "ENETUNREACH", "EACCES", "EPERM"}


async def denied(netns: str | None, address: str, port: int) -> bool:
    """True if a TCP connection from ``netns`` fails or is not answered within 0.3 s."""
    return await probe(netns, address, port, timeout=DENIED_TIMEOUT) in DENIED


@dataclass
class World:
    """The servers of one test."""

    host_port: int  # the host's own server, on every host address


@pytest.fixture
async def world(topology: Topology, nursery: trio.Nursery) -> AsyncIterator[World]:
    t = topology
    for host in (1, 2):
        await nursery.start(serve, t.inet, t.internet(host), 80, f"net{host}")
    await nursery.start(serve, t.inet, t.private, 80, "private")
    for name in "ab":
        await nursery.start(serve, t.netns(name), "0.0.0.0", 8080, name)
    host_port = await nursery.start(serve, None, "0.0.0.0", 0, "host")
    yield World(host_port)  # the nursery fixture stops the servers after the test


# ------------------------------------------------------------------------------ egress


async def test_sandbox_reaches_the_internet_by_default_through_nat(policy, world, topology):
    await policy.apply(topology.sandbox("a"))
    greeting = await probe(topology.netns("a"), topology.internet(1), 80)
    assert greeting == f"net1 {topology.uplink_ip}"  # masqueraded to the host's address


async def test_denied_address_is_unreachable_and_others_stay_open(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a", EgressPolicy(deny_out=(t.internet(2),))))
    assert await denied(t.netns("a"), t.internet(2), 80)
    assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")


async def test_deny_is_fast_feedback_not_a_timeout(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a", EgressPolicy(deny_out=(t.internet(2),))))
    assert await probe(t.netns("a"), t.internet(2), 80) == "EHOSTUNREACH"


async def test_allow_out_beats_deny_out(policy, world, topology):
    t = topology
    rules = EgressPolicy(allow_out=(t.internet(1),), deny_out=(f"198.18.{t.n}.0/24",))
    await policy.apply(t.sandbox("a", rules))
    assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")
    assert await denied(t.netns("a"), t.internet(2), 80)


async def test_no_internet_access_blocks_all_but_allow_out(policy, world, topology):
    t = topology
    rules = EgressPolicy(allow_internet=False, allow_out=(t.internet(1),))
    await policy.apply(t.sandbox("a", rules))
    assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")
    assert await denied(t.netns("a"), t.internet(2), 80)


async def test_no_internet_access_without_allow_out_blocks_everything(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a", EgressPolicy(allow_internet=False)))
    for host in (1, 2):
        assert await denied(t.netns("a"), t.internet(host), 80)


async def test_private_ranges_are_blocked_by_default(policy, world, topology):
    await policy.apply(topology.sandbox("a"))
    assert await denied(topology.netns("a"), topology.private, 80)


async def test_allow_out_cannot_reopen_a_blocked_range(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a", EgressPolicy(allow_out=(t.private, "172.16.0.0/12"))))
    assert await denied(t.netns("a"), t.private, 80)


async def test_the_operator_can_unblock_a_private_range(world, topology):
    blocked = tuple(cidr for cidr in DEFAULT_BLOCKED_OUT if cidr != "172.16.0.0/12")
    driver = NftPolicy(topology.config(blocked_out=blocked))
    await driver.ensure()
    try:
        await driver.apply(topology.sandbox("a"))
        assert (await probe(topology.netns("a"), topology.private, 80)).startswith("private")
    finally:
        await driver.destroy()
        driver.close()


async def test_dns_servers_are_reachable_on_port_53_only(world, topology, nursery):
    t = topology
    await nursery.start(serve_udp, t.inet, t.private, 53, "dns")
    driver = NftPolicy(t.config(dns_servers=(t.private,)))
    await driver.ensure()
    try:
        await driver.apply(t.sandbox("a", EgressPolicy(allow_internet=False)))
        assert (await probe_udp(t.netns("a"), t.private, 53)).startswith("dns")
        assert await denied(t.netns("a"), t.private, 80)
    finally:
        await driver.destroy()
        driver.close()


async def test_unapplied_sandbox_has_no_network(policy, world, topology):
    await policy.apply(topology.sandbox("a"))
    assert await denied(topology.netns("b"), topology.internet(1), 80)
    assert await denied(topology.netns("b"), topology.ip("a"), 8080)


# ---------------------------------------------------------------------------- the host


async def test_sandbox_cannot_reach_the_gateways_services(policy, world, topology):
    await policy.apply(topology.sandbox("a"))
    assert (await probe(None, "127.0.0.1", world.host_port)).startswith("host")
    assert await probe(topology.netns("a"), topology.gateway, world.host_port, timeout=DENIED_TIMEOUT) == "timeout"


async def test_sandbox_cannot_reach_the_hosts_other_addresses(policy, world, topology):
    await policy.apply(topology.sandbox("a"))
    assert await probe(topology.netns("a"), topology.uplink_ip, world.host_port, timeout=DENIED_TIMEOUT) == "timeout"


async def test_host_services_open_only_the_listed_port(world, topology, nursery):
    t = topology
    other_port = await nursery.start(serve, None, "0.0.0.0", 0, "other")
    driver = NftPolicy(t.config(host_services=(f"tcp/{world.host_port}",)))
    await driver.ensure()
    try:
        await driver.apply(t.sandbox("a"))
        assert (await probe(t.netns("a"), t.gateway, world.host_port)).startswith("host")
        assert await probe(t.netns("a"), t.gateway, other_port, timeout=DENIED_TIMEOUT) == "timeout"
    finally:
        await driver.destroy()
        driver.close()


@pytest.fixture
def evil(topology: Topology) -> Iterator[str]:
    """Sandbox c, which routes 127.0.0.0/8 to the gateway as a hostile kernel could."""
    t = topology
    add_sandbox(t, "c")
    ns = ["ip", "-n", t.netns("c")]
    try:
        sh("ip", "netns", "exec", t.netns("c"), "sysctl", "-q", "-w",
           "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.eth0.route_localnet=1")  # fmt: skip
        sh(*ns, "rule", "add", "pref", "100", "lookup", "local")
        sh(*ns, "rule", "del", "pref", "0")
        sh(*ns, "rule", "add", "pref", "10", "to", "127.0.0.0/8", "lookup", "100")
        sh(*ns, "route", "add", "127.0.0.0/8", "via", t.gateway, "dev", "eth0", "table", "100")
        yield t.netns("c")
    finally:
        remove_sandbox(t, "c")


async def test_sandbox_cannot_reach_host_loopback_even_when_routed_there(
    policy, world, topology, evil
):
    await policy.apply(topology.sandbox("c"))
    assert await probe(evil, "127.0.0.1", world.host_port, timeout=DENIED_TIMEOUT) == "timeout"
    # Without the table the same packets do reach the host's loopback service: the
    # input guard is what stops them (route_localnet on the bridge lets them in).
    await policy.destroy()
    try:
        greeting = await probe(evil, "127.0.0.1", world.host_port)
        assert greeting.startswith("host")
    finally:
        await policy.ensure()


# ------------------------------------------------------------------ sandbox to sandbox


async def test_sandboxes_cannot_reach_each_other_on_the_bridge(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a"))
    await policy.apply(t.sandbox("b"))
    assert await denied(t.netns("a"), t.ip("b"), 8080)
    assert await denied(t.netns("b"), t.ip("a"), 8080)
    # Not even ARP gets through (with br_netfilter on, the inet table would also drop the
    # IPv4 part, so this is what shows the bridge table at work).
    neighbour = sh("ip", "-n", t.netns("a"), "neigh", "show", t.ip("b")).stdout
    assert "lladdr" not in neighbour
    # The bridge itself would forward them: the bridge table is what isolates. (The
    # failed ARP lookups above are forgotten first, or the kernel waits to retry them.)
    await policy.destroy()
    sh("ip", "-n", t.netns("a"), "neigh", "flush", "all")
    try:
        assert await probe(t.netns("a"), t.ip("b"), 8080) == f"b {t.ip('a')}"
    finally:
        await policy.ensure()


async def test_sandboxes_cannot_reach_each_other_through_the_gateway(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a"))
    await policy.apply(t.sandbox("b"))
    sh("ip", "-n", t.netns("a"), "route", "add", f"{t.ip('b')}/32", "via", t.gateway)
    try:
        assert await denied(t.netns("a"), t.ip("b"), 8080)
    finally:
        sh("ip", "-n", t.netns("a"), "route", "del", f"{t.ip('b')}/32")


async def test_a_spoofed_source_address_never_leaves_the_host(policy, topology, nursery):
    t = topology
    received: list[str] = []
    await nursery.start(serve_udp, t.inet, t.internet(1), 9999, "sink", received)
    await policy.apply(t.sandbox("a"))
    await policy.apply(t.sandbox("b"))
    # An unused address of the subnet, and b's own (whose policy allows the internet):
    # datagrams need no answer, so only the filter can stop them.
    spoofs = (f"10.231.{t.n}.77", t.ip("b"))
    for spoofed in spoofs:
        sh("ip", "-n", t.netns("a"), "addr", "add", f"{spoofed}/32", "dev", "eth0")
    try:
        for spoofed in spoofs:
            await send_udp(t.netns("a"), t.internet(1), 9999, f"from {spoofed}", spoofed)
        await send_udp(t.netns("a"), t.internet(1), 9999, "from a", t.ip("a"))
        with trio.fail_after(3):
            while "from a" not in received:
                await trio.sleep(0.01)
        await trio.sleep(DENIED_TIMEOUT)
        assert received == ["from a"]
    finally:
        for spoofed in spoofs:
            sh("ip", "-n", t.netns("a"), "addr", "del", f"{spoofed}/32", "dev", "eth0")


# ------------------------------------------------------------------------ runtime update


async def test_runtime_update_takes_effect(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a"))
    assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")
    await policy.update("sbxa", EgressPolicy(deny_out=(t.internet(1),)))
    assert await denied(t.netns("a"), t.internet(1), 80)
    await policy.update("sbxa", EgressPolicy())
    assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")


async def test_runtime_update_cuts_a_live_connection(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a"))
    talk = await Conversation.open(t.netns("a"), t.internet(1), 80)
    try:
        assert await talk.echo("hello", timeout=3) == "hello"
        await policy.update("sbxa", EgressPolicy(allow_internet=False))
        assert await talk.echo("still there?") is None
    finally:
        talk.close()


async def test_update_of_an_unknown_sandbox_raises_and_changes_nothing(policy, topology):
    with pytest.raises(NftError, match="nosuch"):
        await policy.update("nosuch", EgressPolicy())
    assert await policy.leftovers(()) == []


# ------------------------------------------------------------------------- port mapping


async def test_port_map_reaches_the_sandbox_from_host_loopback(policy, world, topology):
    port = free_port()
    await policy.apply(topology.sandbox("a", ports=(PortMap(port, 8080),)))
    assert await probe(None, "127.0.0.1", port) == f"a {topology.gateway}"


async def test_port_map_on_a_host_address_serves_outside_clients_past_the_policy(
    policy, world, topology
):
    t = topology
    port = free_port()
    mapping = PortMap(port, 8080, host_addr=t.uplink_ip)
    await policy.apply(t.sandbox("a", EgressPolicy(allow_internet=False), ports=(mapping,)))
    assert await probe(t.inet, t.uplink_ip, port) == f"a {t.internet(1)}"


async def test_udp_port_map(policy, topology, nursery):
    port = free_port()
    await nursery.start(serve_udp, topology.netns("a"), "0.0.0.0", 5353, "udp-a")
    await policy.apply(topology.sandbox("a", ports=(PortMap(port, 5353, "udp"),)))
    assert (await probe_udp(None, "127.0.0.1", port)).startswith("udp-a")


async def test_port_maps_follow_a_second_apply(policy, world, topology):
    first, second = free_port(), free_port()
    await policy.apply(topology.sandbox("a", ports=(PortMap(first, 8080),)))
    await policy.apply(topology.sandbox("a", ports=(PortMap(second, 8080),)))
    assert await probe(None, "127.0.0.1", first) == "ECONNREFUSED"
    assert (await probe(None, "127.0.0.1", second)).startswith("a ")


async def test_a_host_port_held_by_another_sandbox_is_refused_atomically(policy, topology):
    port = free_port()
    await policy.apply(topology.sandbox("a", ports=(PortMap(port, 8080),)))
    with pytest.raises(NftError):
        await policy.apply(topology.sandbox("b", ports=(PortMap(port, 8080),)))
    assert await policy.leftovers({"sbxa"}) == []  # nothing of b was half-applied


async def test_port_map_is_removed_with_the_sandbox(policy, world, topology):
    port = free_port()
    await policy.apply(topology.sandbox("a", ports=(PortMap(port, 8080),)))
    await policy.remove("sbxa")
    assert await probe(None, "127.0.0.1", port) == "ECONNREFUSED"


# ----------------------------------------------------------------- lifecycle and leaks


async def test_removal_leaves_no_leftovers(policy, topology):
    port = free_port()
    await policy.apply(topology.sandbox("a", ports=(PortMap(port, 8080),)))
    await policy.apply(topology.sandbox("b", EgressPolicy(deny_out=("203.0.113.0/24",))))
    assert await policy.leftovers({"sbxa", "sbxb"}) == []
    assert any(line.startswith("sbxb: chain") for line in await policy.leftovers({"sbxa"}))
    await policy.remove("sbxb")
    assert await policy.leftovers({"sbxa"}) == []
    await policy.remove("sbxa")
    assert await policy.leftovers(()) == []
    await policy.remove("sbxa")  # a second removal is a no-op


async def test_remove_after_a_restart_reads_the_kernel_once(policy, world, topology):
    port = free_port()
    await policy.apply(topology.sandbox("a", ports=(PortMap(port, 8080),)))
    restarted = NftPolicy(topology.config())
    try:
        await restarted.ensure()
        before = restarted.batches
        await restarted.remove("sbxa")
        assert restarted.batches == before + 1
        assert await restarted.leftovers(()) == []
        assert await probe(None, "127.0.0.1", port) == "ECONNREFUSED"
    finally:
        restarted.close()


async def test_purge_removes_every_sandbox_not_kept(policy, topology):
    await policy.apply(topology.sandbox("a", ports=(PortMap(free_port(), 8080),)))
    await policy.apply(topology.sandbox("b"))
    assert await policy.purge({"sbxa"}) == ["sbxb"]
    assert await policy.sandbox_ids() == {"sbxa"}
    assert await policy.leftovers({"sbxa"}) == []


async def test_ensure_again_keeps_sandboxes_and_their_policy(policy, world, topology):
    t = topology
    await policy.apply(t.sandbox("a", EgressPolicy(deny_out=(t.internet(2),))))
    await policy.ensure()
    assert await policy.sandbox_ids() == {"sbxa"}
    assert await denied(t.netns("a"), t.internet(2), 80)
    assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")


async def test_destroy_removes_both_tables(policy, topology):
    await policy.apply(topology.sandbox("a"))
    await policy.destroy()
    tables = sh("nft", "list", "tables").stdout
    assert f"cube-{topology.tag}" not in tables
    assert await policy.leftovers(()) == []
    await policy.destroy()  # a second destroy is a no-op


async def test_the_nft_command_runner_enforces_the_same_policy(world, topology):
    t = topology
    driver = NftPolicy(t.config(), runner_kind="process")
    assert driver.runner.name == "process"
    await driver.ensure()
    try:
        await driver.apply(t.sandbox("a", EgressPolicy(deny_out=(t.internet(2),))))
        assert await denied(t.netns("a"), t.internet(2), 80)
        assert (await probe(t.netns("a"), t.internet(1), 80)).startswith("net1")
        await driver.remove("sbxa")
        assert await driver.leftovers(()) == []
    finally:
        await driver.destroy()
        driver.close()


async def test_each_sandbox_operation_is_one_batch(policy, topology):
    t = topology
    for operation in (
        lambda: policy.apply(t.sandbox("a", ports=(PortMap(free_port(), 8080),))),
        lambda: policy.update("sbxa", EgressPolicy(allow_internet=False)),
        lambda: policy.remove("sbxa"),
    ):
        before = policy.batches
        await operation()
        assert policy.batches == before + 1


async def test_concurrent_operations_leave_exactly_the_live_sandboxes(policy, topology):
    def fake(i: int) -> SandboxNet:
        return SandboxNet(
            f"load{i}", f"10.231.{topology.n}.{100 + i}", f"cbtload{i}",
            EgressPolicy(deny_out=(f"203.0.113.{i}",)), (PortMap(40000 + i, 80),),
        )  # fmt: skip

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(policy.apply, fake(i))
    async with trio.open_nursery() as nursery:
        for i in range(0, 30, 2):
            nursery.start_soon(policy.remove, f"load{i}")
            nursery.start_soon(policy.update, f"load{i + 1}", EgressPolicy(allow_internet=False))
    assert await policy.sandbox_ids() == {f"load{i}" for i in range(1, 30, 2)}
    await policy.purge(())
    assert await policy.leftovers(()) == []
