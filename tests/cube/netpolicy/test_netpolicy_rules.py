"""Validation, E2B mapping and the nft batches themselves; no root, no kernel."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest

from cube.netpolicy import (
    INLINE_RULES,
    EgressPolicy,
    Footprint,
    NftConfig,
    NftPolicy,
    PortMap,
    SandboxNet,
    parse_cidr,
    parse_table_state,
    render_apply,
    render_ensure,
    render_remove,
    render_update,
    resolv_conf_nameservers,
)
from cube.netpolicy_nft import NftError, decode_json_documents

CONFIG = NftConfig(tag="t1", bridge="tbr0", subnet="10.99.0.0/16", manage_sysctls=False)


def sandbox(**overrides: object) -> SandboxNet:
    fields: dict[str, object] = {"sandbox_id": "abc", "ip": "10.99.0.2", "host_if": "vh-abc"}
    fields.update(overrides)
    return SandboxNet(**fields)  # type: ignore[arg-type]


class FakeRunner:
    """Records every script; answers listings with empty maps, as fresh tables do."""

    name = "fake"

    def __init__(self) -> None:
        self.scripts: list[str] = []

    async def run(self, script: str, *, json_output: bool = False) -> str:
        self.scripts.append(script)
        return '{"nftables": []}' if json_output else ""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("entry", "network"),
    [
        ("1.2.3.4", "1.2.3.4/32"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        (" 198.51.100.0/24 ", "198.51.100.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("fc00::/7", "fc00::/7"),
    ],
)
def test_parse_cidr_accepts_addresses_and_networks(entry, network):
    assert parse_cidr(entry) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    "entry",
    ["example.com", "*.pypi.org", "1.2.3.4:53", "10.0.0.0/33", "", "fe80::1%eth0", 42, None],
)
def test_parse_cidr_rejects_anything_else_with_a_clear_value_error(entry):
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        parse_cidr(entry)


def test_a_domain_in_allow_out_is_rejected_naming_it():
    with pytest.raises(ValueError, match=r"'pypi\.org'.*domain names"):
        EgressPolicy(allow_out=("1.1.1.1", "pypi.org"))


def test_too_many_rules_are_rejected():
    with pytest.raises(ValueError, match="at most"):
        EgressPolicy(deny_out=tuple(f"10.0.{i // 256}.{i % 256}" for i in range(5000)))


# ----------------------------------------------------------------------- E2B mapping


def test_e2b_defaults_allow_the_internet():
    assert EgressPolicy.from_e2b() == EgressPolicy(allow_internet=True)


def test_e2b_allow_internet_access_false_denies_the_internet():
    assert EgressPolicy.from_e2b(False).allow_internet is False


def test_e2b_network_lists_are_read_in_camel_and_snake_case():
    camel = EgressPolicy.from_e2b(None, {"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"]})
    snake = EgressPolicy.from_e2b(None, {"allow_out": ["1.1.1.1"], "deny_out": ["0.0.0.0/0"]})
    assert camel == snake == EgressPolicy(allow_out=("1.1.1.1",), deny_out=("0.0.0.0/0",))


def test_e2b_ingress_keys_are_ignored():
    network = {"allowPublicTraffic": False, "maskRequestHost": "x", "allowOut": []}
    assert EgressPolicy.from_e2b(True, network) == EgressPolicy()


@pytest.mark.parametrize("network", [{"allowOut": "1.1.1.1"}, {"denyOut": [1]}])
def test_e2b_malformed_lists_are_rejected(network):
    with pytest.raises(ValueError, match="list of strings"):
        EgressPolicy.from_e2b(None, network)


def test_a_policy_decodes_from_json_with_validation():
    with pytest.raises(msgspec.ValidationError, match="not an IP address"):
        msgspec.json.decode(b'{"allow_out": ["nope"]}', type=EgressPolicy)


# ------------------------------------------------------------------ other validation


@pytest.mark.parametrize(
    "fields",
    [
        {"host_port": 0, "sandbox_port": 80},
        {"host_port": 80, "sandbox_port": 70000},
        {"host_port": 80, "sandbox_port": 80, "proto": "sctp"},
        {"host_port": 80, "sandbox_port": 80, "host_addr": "::1"},
        {"host_port": True, "sandbox_port": 80},
    ],
)
def test_bad_port_maps_are_rejected(fields):
    with pytest.raises(ValueError):
        PortMap(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"sandbox_id": "Bad Id"},
        {"sandbox_id": 'x"; flush ruleset; "'},
        {"host_if": "a-very-long-ifname"},
        {"host_if": 'vh"x'},
        {"ip": "10.99.0.300"},
        {"ip": "2001:db8::2"},
    ],
)
def test_bad_sandboxes_are_rejected(fields):
    with pytest.raises(ValueError):
        sandbox(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"tag": "UPPER"},
        {"subnet": "fd00::/64"},
        {"host_services": ("53",)},
        {"host_services": ("tcp/99999",)},
        {"dns_servers": ("dns.google",)},
        {"dns_servers": ("10.0.0.0/8",)},
        {"port_address": "localhost"},
    ],
)
def test_bad_configs_are_rejected(fields):
    with pytest.raises(ValueError):
        NftConfig(**fields)


async def test_an_address_outside_the_subnet_is_rejected_before_any_batch():
    runner = FakeRunner()
    driver = NftPolicy(CONFIG, runner=runner)
    with pytest.raises(ValueError, match="not a host of"):
        await driver.apply(sandbox(ip="10.100.0.2"))
    with pytest.raises(ValueError, match="not a host of"):
        await driver.apply(sandbox(ip="10.99.0.0"))
    assert runner.scripts == []


async def test_the_same_host_port_twice_is_rejected():
    driver = NftPolicy(CONFIG, runner=FakeRunner())
    with pytest.raises(ValueError, match="mapped twice"):
        await driver.apply(sandbox(ports=(PortMap(8000, 80), PortMap(8000, 81))))


# --------------------------------------------------------------------------- batches


def _rules(script: str, chain: str) -> list[str]:
    prefix = f"add rule inet cube-t1 {chain} "
    return [line[len(prefix) :] for line in script.splitlines() if line.startswith(prefix)]


def test_sandbox_chain_checks_dns_blocked_allow_deny_then_the_internet_flag():
    rules = EgressPolicy(allow_internet=False, allow_out=("1.1.1.1",), deny_out=("2001:db8::/32",))
    script = render_apply(CONFIG, sandbox(policy=rules))
    assert _rules(script, "sbx_abc") == [
        "ip daddr . meta l4proto . th dport @dns4 accept",
        "ip daddr @blocked4 counter reject with icmpx admin-prohibited",
        "ip6 daddr @blocked6 counter reject with icmpx admin-prohibited",
        "ip daddr 1.1.1.1/32 accept",
        "ip6 daddr 2001:db8::/32 counter reject with icmpx admin-prohibited",
        "counter reject with icmpx admin-prohibited",
    ]
    assert _rules(render_apply(CONFIG, sandbox()), "sbx_abc")[-1] == "accept"


def test_short_policies_add_no_anonymous_set_to_the_table():
    # Each set in the table slows every later batch (nft 1.0.6 reads them all first).
    rules = EgressPolicy(allow_out=("1.1.1.1", "8.8.8.0/24"), deny_out=("0.0.0.0/0",))
    chain = _rules(render_apply(CONFIG, sandbox(policy=rules)), "sbx_abc")
    assert not any("{" in rule for rule in chain)


def test_dns_servers_are_one_named_set_of_address_protocol_and_port():
    script = render_ensure(NftConfig(dns_servers=("10.255.255.53",)))
    assert "add element inet cube-main dns4 { 10.255.255.53 . udp . 53, 10.255.255.53 . tcp . 53 }" in script


def test_rules_are_merged_and_split_by_family():
    rules = EgressPolicy(allow_out=("1.2.3.4", "1.2.3.0/24", "2001:db8::/32"))
    chain = _rules(render_apply(CONFIG, sandbox(policy=rules)), "sbx_abc")
    assert "ip daddr 1.2.3.0/24 accept" in chain
    assert "ip6 daddr 2001:db8::/32 accept" in chain
    assert not any("1.2.3.4" in rule for rule in chain)


def test_a_long_list_becomes_one_rule_with_an_anonymous_set():
    many = tuple(f"198.51.100.{2 * i}" for i in range(INLINE_RULES + 1))
    chain = _rules(render_apply(CONFIG, sandbox(policy=EgressPolicy(deny_out=many))), "sbx_abc")
    denies = [rule for rule in chain if "198.51.100." in rule]
    assert len(denies) == 1 and denies[0].startswith("ip daddr { 198.51.100.0/32, ")


def test_apply_tags_every_shared_element_with_the_sandbox_id():
    script = render_apply(CONFIG, sandbox(ports=(PortMap(18080, 8080),)))
    assert 'egress4 { 10.99.0.2 comment "abc" : jump sbx_abc }' in script
    assert 'ports4 { 127.0.0.1 . tcp . 18080 comment "abc" : 10.99.0.2 . 8080 }' in script
    assert 'ports { "vh-abc" comment "abc" }' in script
    assert 'port_ip4 { "vh-abc" . 10.99.0.2 comment "abc" }' in script


def test_a_second_apply_deletes_only_what_changed():
    before = Footprint.of(sandbox(ports=(PortMap(1000, 80), PortMap(2000, 80))), CONFIG)
    script = render_apply(CONFIG, sandbox(ports=(PortMap(2000, 80),)), before)
    assert "delete element inet cube-t1 ports4 { 127.0.0.1 . tcp . 1000 }" in script
    assert "2000 }" not in script.split("add chain")[0]  # kept ports are not deleted


def test_update_fails_on_an_unknown_sandbox_instead_of_creating_it():
    script = render_update(CONFIG, "abc", EgressPolicy())
    assert script.splitlines()[0] == "flush chain inet cube-t1 sbx_abc"


def test_remove_deletes_elements_before_the_chain_they_jump_to():
    fp = Footprint.of(sandbox(), CONFIG)
    lines = render_remove(CONFIG, "abc", fp).splitlines()
    element = lines.index("delete element inet cube-t1 egress4 { 10.99.0.2 }")
    assert element < lines.index("delete chain inet cube-t1 sbx_abc")


def test_ensure_names_the_bridge_subnet_and_blocked_ranges():
    script = render_ensure(CONFIG)
    assert 'add rule inet cube-t1 input iifname "tbr0" jump sandbox_to_host' in script
    assert 'ip saddr 10.99.0.0/16 oifname != "tbr0" masquerade' in script
    assert "192.168.0.0/16" in script and "fe80::/10" in script
    assert "add table bridge cube-t1" in script


async def test_one_batch_per_sandbox_operation_once_the_tables_are_read():
    runner = FakeRunner()
    driver = NftPolicy(CONFIG, runner=runner)
    await driver.ensure()
    for operation in (
        lambda: driver.apply(sandbox(ports=(PortMap(18080, 8080),))),
        lambda: driver.update("abc", EgressPolicy(allow_internet=False)),
        lambda: driver.remove("abc"),
    ):
        before = len(runner.scripts)
        await operation()
        assert len(runner.scripts) == before + 1


async def test_a_refused_update_names_the_sandbox():
    class Refusing(FakeRunner):
        async def run(self, script: str, *, json_output: bool = False) -> str:
            raise NftError("Error: No such file or directory", script)

    with pytest.raises(NftError, match="sandbox ghost: cannot update"):
        await NftPolicy(CONFIG, runner=Refusing()).update("ghost", EgressPolicy())


# ----------------------------------------------------------------------- reading back

# Captured from nft 1.0.6 (`nft -j list map ...`), one document per list command.
LISTING = """
{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "inet", "name":
"egress4", "table": "cube-t1", "type": "ipv4_addr", "handle": 2, "map": "verdict", "elem":
[[{"elem": {"val": "10.99.0.2", "comment": "abc"}}, {"jump": {"target": "sbx_abc"}}]]}}]}
{"nftables": [{"map": {"family": "inet", "name": "ports4", "table": "cube-t1", "type":
["ipv4_addr", "inet_proto", "inet_service"], "handle": 3, "map": "ipv4_addr . inet_service",
"elem": [[{"elem": {"val": {"concat": ["127.0.0.1", "tcp", 18080]}, "comment": "abc"}},
{"concat": ["10.99.0.2", 8080]}]]}}]}
{"nftables": [{"set": {"family": "bridge", "name": "port_ip4", "table": "cube-t1", "type":
["ifname", "ipv4_addr"], "handle": 2, "elem": [{"elem": {"val": {"concat": ["vh-abc",
"10.99.0.2"]}, "comment": "abc"}}]}}, {"chain": {"family": "inet", "table": "cube-t1",
"name": "sbx_abc", "handle": 9}}, {"chain": {"family": "inet", "table": "cube-t1", "name":
"from_sandboxes", "handle": 4}}]}
"""


def test_listings_are_read_back_into_footprints_and_objects():
    state = parse_table_state(decode_json_documents(LISTING))
    assert state.footprints["abc"] == Footprint(
        {"10.99.0.2"}, {("127.0.0.1", "tcp", 18080): ("10.99.0.2", 8080)}, set(),
        {("vh-abc", "10.99.0.2")},
    )  # fmt: skip
    assert state.objects["abc"] == ["chain sbx_abc"]
    assert state.owners() == {"abc"}


def test_elements_without_an_owner_comment_are_reported_as_unowned():
    doc = {"nftables": [{"map": {"family": "inet", "name": "egress4", "elem": [
        ["10.99.0.9", {"jump": {"target": "sbx_x"}}]]}}]}  # fmt: skip
    assert parse_table_state([doc]).footprints["?"].egress == {"10.99.0.9"}


def test_resolv_conf_nameservers_keeps_ipv4_resolvers_a_sandbox_can_reach(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n"
        "nameserver fd00::53\nsearch example\nnameserver 10.255.255.53\nnameserver 8.8.8.8\n"
    )
    assert resolv_conf_nameservers(str(conf)) == ("10.255.255.53", "8.8.8.8")
    assert resolv_conf_nameservers(str(tmp_path / "missing")) == ()
