"""Sandbox network policy on Linux: two nftables tables per node, a chain per sandbox.

Every sandbox sits behind the host bridge (``NftConfig.bridge``, ``cubebr0`` by default) with
one IPv4 address of ``NftConfig.subnet``, on a veth or tap port of that bridge. ``NftPolicy``
owns two nftables tables named ``cube-<tag>`` (the tag keeps two nodes on one host apart):

* ``inet cube-<tag>``: NAT out (masquerade), the egress policy (a verdict map from the
  sandbox's address to its own chain ``sbx_<id>``, which holds its allow and deny rules),
  the host guard (nothing from the bridge reaches the host itself unless
  ``NftConfig.host_services`` lists it), and port mapping (one DNAT map ``ports4`` from
  host address, protocol and port to sandbox address and port).
* ``bridge cube-<tag>``: bridge-local isolation, without br_netfilter: frames entering from
  a sandbox port must carry that sandbox's own address (IPv4 or ARP; anything else is
  dropped), frames leaving to a sandbox port must be addressed to it, and nothing is
  forwarded from one sandbox port to another.

E2B semantics, evaluated in this order for each packet a sandbox sends:
``NftConfig.dns_servers`` on port 53 → accept; ``NftConfig.blocked_out`` (the private,
loopback and link-local ranges by default) → reject, which no sandbox rule can reopen;
``allowOut`` → accept (allow beats deny); ``denyOut`` → reject; then accept when
``allow_internet_access`` (the default), else reject. Policies are checked on every packet
a sandbox sends, not only on new connections, so a runtime update also cuts flows that
the new policy denies.

Each operation is one nft batch, committed as one kernel transaction (``netpolicy_nft``);
the layout, rule order and measured times are in docs/network.md.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from .netpolicy_nft import (
    NetPolicyError,
    NftError,
    NftRunner,
    RunnerKind,
    decode_json_documents,
    open_runner,
)

__all__ = [
    "DEFAULT_BLOCKED_OUT",
    "INLINE_RULES",
    "MAX_RULES",
    "EgressPolicy",
    "Footprint",
    "NetPolicyDriver",
    "NetPolicyError",
    "NftConfig",
    "NftError",
    "NftPolicy",
    "NoNetPolicy",
    "PortMap",
    "SandboxNet",
    "TableState",
    "parse_cidr",
    "parse_table_state",
    "render_apply",
    "render_destroy",
    "render_ensure",
    "render_remove",
    "render_update",
    "resolv_conf_nameservers",
]

DEFAULT_BLOCKED_OUT: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
"""Destinations no sandbox may reach, whatever its own rules say (E2B's list)."""

MAX_RULES = 4096  # per list: bounds the size of one batch and of a sandbox's chain
INLINE_RULES = 16  # longer lists become one rule with an anonymous set (see _match_rules)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Proto = Literal["tcp", "udp"]

_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_TAG = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_SERVICE = re.compile(r"(tcp|udp)/(\d{1,5})")
_REJECT = "reject with icmpx admin-prohibited"
# The per-sandbox chain is named sbx_<sandbox id>; leftovers() parses the id back.
_SANDBOX_CHAIN = "sbx_"


# ---------------------------------------------------------------------------- validation


def parse_cidr(entry: object) -> Network:
    """An IPv4 or IPv6 address or CIDR as a network (host bits cleared).

    Raises ``ValueError`` for anything else, naming the entry: domain names and
    ``host:port`` rules are not supported by this driver.
    """
    if not isinstance(entry, str) or not entry.strip() or "%" in entry:
        raise ValueError(f"{entry!r} is not an IP address or CIDR")
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{entry!r} is not an IP address or CIDR (domain names and host:port rules"
            " are not supported by the nft network policy)"
        ) from None


def _ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IPv4 address") from None


def _check_name(value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match {pattern.pattern}")


def _check_port(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{what} {value!r} must be an integer in 1..65535")


def _check_rules(entries: Sequence[str], what: str) -> None:
    if len(entries) > MAX_RULES:
        raise ValueError(f"{what} has {len(entries)} entries; at most {MAX_RULES}")
    for entry in entries:
        parse_cidr(entry)


# ---------------------------------------------------------------------------------- data


class PortMap(msgspec.Struct, frozen=True):
    """One exposed port: connections to ``host_addr:host_port`` reach ``sandbox_port``.

    ``host_addr`` None means ``NftConfig.port_address`` (127.0.0.1 by default).
    """

    host_port: int
    sandbox_port: int
    proto: Proto = "tcp"
    host_addr: str | None = None

    def __post_init__(self) -> None:
        _check_port(self.host_port, "host_port")
        _check_port(self.sandbox_port, "sandbox_port")
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"proto {self.proto!r} must be 'tcp' or 'udp'")
        if self.host_addr is not None:
            _ipv4(self.host_addr, "host_addr")


class EgressPolicy(msgspec.Struct, frozen=True):
    """What one sandbox may send to: E2B's ``allow_internet_access`` and ``network``.

    ``allow_out`` beats ``deny_out``; without ``allow_internet`` everything not in
    ``allow_out`` is denied. Entries are IPv4/IPv6 addresses or CIDRs; anything else
    raises ``ValueError`` at construction.
    """

    allow_internet: bool = True
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_rules(self.allow_out, "allow_out")
        _check_rules(self.deny_out, "deny_out")

    @classmethod
    def from_e2b(
        cls,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
    ) -> EgressPolicy:
        """The policy an E2B create or ``PUT /sandboxes/{id}/network`` body asks for.

        ``network`` is the request's ``network`` object (camelCase ``allowOut`` /
        ``denyOut``; snake_case is accepted too). Its ingress and proxy keys
        (``allowPublicTraffic``, ``maskRequestHost``, ``egressProxy``, ...) are not egress
        rules and are ignored here. Raises ``ValueError`` for malformed entries.
        """
        network = network or {}
        allow = _string_list(network, "allowOut", "allow_out")
        deny = _string_list(network, "denyOut", "deny_out")
        internet = True if allow_internet_access is None else allow_internet_access
        if not isinstance(internet, bool):
            raise ValueError(f"allow_internet_access {internet!r} must be a boolean")
        return cls(allow_internet=internet, allow_out=allow, deny_out=deny)


def _string_list(network: Mapping[str, Any], *keys: str) -> tuple[str, ...]:
    for key in keys:
        value = network.get(key)
        if value is None:
            continue
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"network.{key} must be a list of strings, not {value!r}")
        return tuple(value)
    return ()


class SandboxNet(msgspec.Struct, frozen=True):
    """Everything the policy needs to know about one sandbox's network attachment."""

    sandbox_id: str
    ip: str  # its IPv4 address on the bridge
    host_if: str  # the host side of its veth (or its tap), a port of the bridge
    policy: EgressPolicy = msgspec.field(default_factory=EgressPolicy)
    ports: tuple[PortMap, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.sandbox_id, _ID, "sandbox_id")
        _check_name(self.host_if, _IFNAME, "host_if")
        _ipv4(self.ip, "ip")
        if len(self.ports) > MAX_RULES:
            raise ValueError(f"{len(self.ports)} port maps; at most {MAX_RULES}")


class NftConfig(msgspec.Struct, frozen=True):
    """The node-wide settings of the nft policy; every sandbox shares them."""

    tag: str = "main"  # tables are named cube-<tag>
    bridge: str = "cubebr0"
    subnet: str = "10.99.0.0/16"  # the sandboxes' addresses; NAT'd when leaving the host
    blocked_out: tuple[str, ...] = DEFAULT_BLOCKED_OUT  # no sandbox rule reopens these
    dns_servers: tuple[str, ...] = ()  # IPv4 addresses reachable on port 53 whatever the policy
    host_services: tuple[str, ...] = ()  # "udp/53" ...: host ports sandboxes may reach
    port_address: str = "127.0.0.1"  # default host address of port maps
    manage_sysctls: bool = True  # ensure() turns on ip_forward (and route_localnet)

    def __post_init__(self) -> None:
        _check_name(self.tag, _TAG, "tag")
        _check_name(self.bridge, _IFNAME, "bridge")
        if not isinstance(parse_cidr(self.subnet), ipaddress.IPv4Network):
            raise ValueError(f"subnet {self.subnet!r} must be an IPv4 network")
        _check_rules(self.blocked_out, "blocked_out")
        if len(set(self.dns_servers)) != len(self.dns_servers):
            raise ValueError(f"dns_servers {self.dns_servers!r} has duplicates")
        for server in self.dns_servers:
            _ipv4(server, "dns server")
        for service in self.host_services:
            match = _SERVICE.fullmatch(service) if isinstance(service, str) else None
            if match is None:
                raise ValueError(f"host service {service!r} must look like 'tcp/53'")
            _check_port(int(match.group(2)), "host service port")
        _ipv4(self.port_address, "port_address")

    @property
    def table(self) -> str:
        return f"cube-{self.tag}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        net = ipaddress.ip_network(self.subnet, strict=False)
        assert isinstance(net, ipaddress.IPv4Network)
        return net


# ---------------------------------------------------------------------- nft text helpers


def _q(name: str) -> str:
    """An interface name or comment as an nft string (names are validated: no quotes)."""
    return f'"{name}"'


def _elements(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _split(entries: Iterable[str]) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 entries as nft interval elements, overlaps merged."""
    nets = [parse_cidr(e) for e in entries]
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return [str(n) for n in v4], [str(n) for n in v6]


def _fill_set(lines: list[str], family: str, table: str, name: str, items: Sequence[str]) -> None:
    lines.append(f"flush set {family} {table} {name}")
    if items:
        lines.append(f"add element {family} {table} {name} {_elements(items)}")


PortKey = tuple[str, str, int]  # host address, protocol, host port
PortTarget = tuple[str, int]  # sandbox address, sandbox port


@dataclass
class Footprint:
    """The elements one sandbox owns in the node's shared maps and sets.

    The sandbox's own chain is found by name; these elements are found by key, so
    removing a sandbox needs them: from the record of what was applied, or read back
    from the kernel (their comments name the sandbox).
    """

    egress: set[str] = field(default_factory=set)  # inet egress4 keys: sandbox addresses
    ports: dict[PortKey, PortTarget] = field(default_factory=dict)  # inet ports4
    bridge_ports: set[str] = field(default_factory=set)  # bridge ports: host_if
    bridge_addrs: set[tuple[str, str]] = field(default_factory=set)  # bridge port_ip4

    @classmethod
    def of(cls, sbx: SandboxNet, config: NftConfig) -> Footprint:
        ports: dict[PortKey, PortTarget] = {
            (p.host_addr or config.port_address, p.proto, p.host_port): (sbx.ip, p.sandbox_port)
            for p in sbx.ports
        }
        return cls({sbx.ip}, ports, {sbx.host_if}, {(sbx.host_if, sbx.ip)})


# -------------------------------------------------------------------------- the batches


def render_ensure(config: NftConfig) -> str:
    """The batch that creates (or resets) the node's static tables, sets and base chains.

    It leaves every sandbox's chain and elements in place, so it may run again at any
    time, e.g. after a configuration change. It fails if the tables were made by a
    version of this module with other set types: ``destroy()`` first, then.
    """
    t, br, net = config.table, _q(config.bridge), config.network
    blocked4, blocked6 = _split(config.blocked_out)
    dns4 = [f"{server} . {proto} . 53" for server in config.dns_servers for proto in ("udp", "tcp")]
    services = [s.replace("/", " . ") for s in config.host_services]
    ports_map = "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;"
    dnat = "dnat ip to ip daddr . meta l4proto . th dport map @ports4"
    lines = [
        f"add table inet {t}",
        f"add set inet {t} blocked4 {{ type ipv4_addr; flags interval; }}",
        f"add set inet {t} blocked6 {{ type ipv6_addr; flags interval; }}",
        f"add set inet {t} dns4 {{ type ipv4_addr . inet_proto . inet_service; }}",
        f"add set inet {t} host_services {{ type inet_proto . inet_service; }}",
        f"add map inet {t} egress4 {{ type ipv4_addr : verdict; }}",
        f"add map inet {t} ports4 {{ {ports_map} }}",
    ]
    _fill_set(lines, "inet", t, "blocked4", blocked4)
    _fill_set(lines, "inet", t, "blocked6", blocked6)
    _fill_set(lines, "inet", t, "dns4", dns4)
    _fill_set(lines, "inet", t, "host_services", services)
    chains: list[tuple[str, str, list[str]]] = [
        # Anything a sandbox addresses to the host itself: the gateway, 127.0.0.0/8 (which
        # route_localnet lets in from the bridge), the host's other addresses.
        ("input", "type filter hook input priority filter; policy accept;",
         [f"iifname {br} jump sandbox_to_host"]),
        ("sandbox_to_host", "",
         ["ct state established,related accept",
          "meta l4proto . th dport @host_services accept",
          "counter drop"]),
        ("forward", "type filter hook forward priority filter; policy accept;",
         [f"iifname {br} oifname {br} counter drop",
          f"iifname {br} jump from_sandboxes",
          f"oifname {br} jump to_sandboxes"]),
        # Replies of port-mapped connections first: they must pass whatever the sandbox's
        # egress policy says. Sandbox-initiated traffic is judged on every packet.
        ("from_sandboxes", "",
         ["ct status dnat accept",
          "ip saddr vmap @egress4",
          f"counter {_REJECT}"]),
        ("to_sandboxes", "",
         ["ct state established,related accept",
          "ct status dnat accept",
          "counter drop"]),
        # A sandbox must not reach another one through a port map: the saddr test keeps
        # the DNAT to traffic from outside the subnet (iifname would be the veth, not the
        # bridge, when br_netfilter is on).
        ("nat_prerouting", "type nat hook prerouting priority dstnat; policy accept;",
         [f"ip saddr != {net} meta l4proto {{ tcp, udp }} {dnat}"]),
        ("nat_output", "type nat hook output priority -100; policy accept;",
         [f"meta l4proto {{ tcp, udp }} {dnat}"]),
        ("nat_postrouting", "type nat hook postrouting priority srcnat; policy accept;",
         [f"ip saddr {net} oifname != {br} masquerade",
          # Port maps on 127.0.0.1: the sandbox must see an address it can answer.
          f"oifname {br} ip saddr 127.0.0.0/8 masquerade"]),
    ]
    lines += _chain_lines("inet", t, chains)
    lines += [
        f"add table bridge {t}",
        f"add set bridge {t} ports {{ type ifname; }}",
        f"add set bridge {t} port_ip4 {{ type ifname . ipv4_addr; }}",
    ]
    bridge_chains: list[tuple[str, str, list[str]]] = [
        ("prerouting", "type filter hook prerouting priority -200; policy accept;",
         ["iifname @ports jump from_port"]),
        ("from_port", "",
         ["iifname . ip saddr @port_ip4 accept",
          "iifname . arp saddr ip @port_ip4 accept",
          "counter drop"]),
        ("forward", "type filter hook forward priority -200; policy accept;",
         ["iifname @ports counter drop", "oifname @ports counter drop"]),
        ("postrouting", "type filter hook postrouting priority -200; policy accept;",
         ["oifname @ports jump to_port"]),
        ("to_port", "",
         ["oifname . ip daddr @port_ip4 accept",
          "oifname . arp daddr ip @port_ip4 accept",
          "counter drop"]),
    ]
    lines += _chain_lines("bridge", t, bridge_chains)
    return "\n".join(lines) + "\n"


def _chain_lines(family: str, table: str, chains: list[tuple[str, str, list[str]]]) -> list[str]:
    lines: list[str] = []
    for name, base, _ in chains:
        spec = f" {{ {base} }}" if base else ""
        lines += [f"add chain {family} {table} {name}{spec}", f"flush chain {family} {table} {name}"]
    for name, _, rules in chains:
        lines += [f"add rule {family} {table} {name} {rule}" for rule in rules]
    return lines


def _policy_lines(config: NftConfig, sandbox_id: str, policy: EgressPolicy) -> list[str]:
    """(Re)write the sandbox's chain, creating it if missing.

    The chain holds plain rules, not sets: every set in the table makes each later batch
    slower (with nft 1.0.6 and this kernel, per-sandbox sets, named or anonymous like
    ``{ tcp, udp }``, put one apply at 30-60 ms with 200 sandboxes; plain rules keep it
    near a millisecond; docs/network.md).
    """
    t, chain = config.table, f"sbx_{sandbox_id}"
    allow4, allow6 = _split(policy.allow_out)
    deny4, deny6 = _split(policy.deny_out)
    rules = [
        # A named set, not "meta l4proto { tcp, udp }": every anonymous set in the table
        # makes each later batch slower (see the docstring).
        "ip daddr . meta l4proto . th dport @dns4 accept",
        f"ip daddr @blocked4 counter {_REJECT}",
        f"ip6 daddr @blocked6 counter {_REJECT}",
        *_match_rules("ip", allow4, "accept"),
        *_match_rules("ip6", allow6, "accept"),
        *_match_rules("ip", deny4, f"counter {_REJECT}"),
        *_match_rules("ip6", deny6, f"counter {_REJECT}"),
        "accept" if policy.allow_internet else f"counter {_REJECT}",
    ]
    lines = [f"add chain inet {t} {chain}", f"flush chain inet {t} {chain}"]
    return lines + [f"add rule inet {t} {chain} {rule}" for rule in rules]


def _match_rules(family: str, networks: Sequence[str], verdict: str) -> list[str]:
    """One rule per network, or one rule with an anonymous set for long lists.

    Per packet, a short run of rules costs less than a set lookup; an anonymous set is
    bound to its rule and goes away with it, so ``flush chain`` still clears everything.
    """
    if len(networks) > INLINE_RULES:
        return [f"{family} daddr {_elements(networks)} {verdict}"]
    return [f"{family} daddr {network} {verdict}" for network in networks]


def _element_lines(verb: str, config: NftConfig, sandbox_id: str, fp: Footprint) -> list[str]:
    """Add (with values and owner comments) or delete (keys only) a footprint's elements."""
    t, add = config.table, verb == "add"
    tag = f" comment {_q(sandbox_id)}" if add else ""
    lines: list[str] = []

    def emit(family: str, name: str, items: list[str]) -> None:
        if items:
            lines.append(f"{verb} element {family} {t} {name} {_elements(items)}")

    emit("inet", "egress4", [
        f"{ip}{tag} : jump sbx_{sandbox_id}" if add else ip for ip in sorted(fp.egress)
    ])
    emit("inet", "ports4", [
        f"{a} . {p} . {n}{tag} : {ip} . {port}" if add else f"{a} . {p} . {n}"
        for (a, p, n), (ip, port) in sorted(fp.ports.items())
    ])
    emit("bridge", "ports", [f"{_q(name)}{tag}" for name in sorted(fp.bridge_ports)])
    emit("bridge", "port_ip4", [f"{_q(name)} . {ip}{tag}" for name, ip in sorted(fp.bridge_addrs)])
    return lines


def _drop_sandbox_lines(config: NftConfig, sandbox_id: str) -> list[str]:
    """Delete the sandbox's chain whether or not it exists (nft 1.0.6 has no ``destroy``,
    so it is added first: adding an existing chain is a no-op)."""
    chain = f"inet {config.table} sbx_{sandbox_id}"
    return [f"add chain {chain}", f"flush chain {chain}", f"delete chain {chain}"]


def _stale(old: Footprint, new: Footprint) -> Footprint:
    """What ``old`` holds that ``new`` does not (a port whose target moved counts)."""
    return Footprint(
        old.egress - new.egress,
        {k: v for k, v in old.ports.items() if new.ports.get(k) != v},
        old.bridge_ports - new.bridge_ports,
        old.bridge_addrs - new.bridge_addrs,
    )


def render_apply(config: NftConfig, sbx: SandboxNet, previous: Footprint | None = None) -> str:
    """The batch that gives ``sbx`` exactly its policy and port maps.

    ``previous`` is what the sandbox held before (None: nothing); elements it held that
    ``sbx`` does not are deleted in the same batch.
    """
    new = Footprint.of(sbx, config)
    lines: list[str] = []
    if previous is not None:
        lines += _element_lines("delete", config, sbx.sandbox_id, _stale(previous, new))
    lines += _policy_lines(config, sbx.sandbox_id, sbx.policy)
    # Every element is added again: adding an identical one is a no-op, and this restores
    # any that went missing behind our back.
    lines += _element_lines("add", config, sbx.sandbox_id, new)
    return "\n".join(lines) + "\n"


def render_update(config: NftConfig, sandbox_id: str, policy: EgressPolicy) -> str:
    """The batch that replaces a sandbox's egress policy and nothing else.

    It fails (changing nothing) if the sandbox has no chain, i.e. was never applied.
    """
    t = config.table
    # flush fails on a missing chain, so an unknown sandbox is an error, not a new chain.
    head = [f"flush chain inet {t} sbx_{sandbox_id}"]
    return "\n".join(head + _policy_lines(config, sandbox_id, policy)) + "\n"


def render_remove(config: NftConfig, sandbox_id: str, previous: Footprint) -> str:
    """The batch that deletes every object of one sandbox."""
    lines = _element_lines("delete", config, sandbox_id, previous)
    lines += _drop_sandbox_lines(config, sandbox_id)
    return "\n".join(lines) + "\n"


def render_destroy(config: NftConfig) -> str:
    """The batch that deletes both tables (and so everything in them), if they exist."""
    t = config.table
    return (
        f"add table inet {t}\ndelete table inet {t}\n"
        f"add table bridge {t}\ndelete table bridge {t}\n"
    )


# --------------------------------------------------------------------- reading back


@dataclass
class TableState:
    """What the kernel holds of the node's tables, by owning sandbox."""

    footprints: dict[str, Footprint] = field(default_factory=dict)
    objects: dict[str, list[str]] = field(default_factory=dict)  # owner -> "chain sbx_x", ...

    def owners(self) -> set[str]:
        return set(self.footprints) | set(self.objects)

    def describe(self, owner: str) -> list[str]:
        """One line per nft object or element the owner holds, for leak reports."""
        out = list(self.objects.get(owner, ()))
        fp = self.footprints.get(owner, Footprint())
        out += [f"element egress4 {ip}" for ip in sorted(fp.egress)]
        out += [f"element ports4 {a} . {p} . {n}" for a, p, n in sorted(fp.ports)]
        out += [f"element bridge ports {n}" for n in sorted(fp.bridge_ports)]
        out += [f"element bridge port_ip4 {n} . {ip}" for n, ip in sorted(fp.bridge_addrs)]
        return out


def _owner_of(name: str) -> str | None:
    return name[len(_SANDBOX_CHAIN) :] if name.startswith(_SANDBOX_CHAIN) else None


def _elem_parts(elem: Any) -> tuple[Any, str]:
    """The value and owner comment of one element as nft's JSON prints it."""
    if isinstance(elem, dict) and "elem" in elem:
        inner = elem["elem"]
        return inner.get("val"), str(inner.get("comment", ""))
    return elem, ""


def _concat(value: Any) -> list[Any]:
    if isinstance(value, dict) and "concat" in value:
        return list(value["concat"])
    return [value]


_PROTO_NAMES = {6: "tcp", 17: "udp"}


def parse_table_state(docs: Iterable[Mapping[str, Any]]) -> TableState:
    """The per-sandbox objects in ``nft -j list table`` output (both families)."""
    state = TableState()

    def fp(owner: str) -> Footprint:
        return state.footprints.setdefault(owner or "?", Footprint())

    for doc in docs:
        for item in doc.get("nftables", ()):
            kind = next(iter(item), "")
            body = item.get(kind)
            if not isinstance(body, dict):
                continue
            if kind == "chain" and body.get("family") == "inet":
                owner = _owner_of(str(body.get("name", "")))
                if owner is not None:
                    state.objects.setdefault(owner, []).append(f"chain {body['name']}")
            elif kind in ("set", "map"):
                _parse_elements(body, fp)
    return state


def _parse_elements(body: Mapping[str, Any], fp: Callable[[str], Footprint]) -> None:
    name, family = body.get("name"), body.get("family")
    for entry in body.get("elem", ()):
        if name in ("egress4", "ports4"):
            key, value = entry if isinstance(entry, list) else (entry, None)
        else:
            key, value = entry, None
        val, owner = _elem_parts(key)
        parts = _concat(val)
        if family == "inet" and name == "egress4":
            fp(owner).egress.add(str(parts[0]))
        elif family == "inet" and name == "ports4":
            addr, proto, port = parts
            proto = _PROTO_NAMES.get(proto, proto) if isinstance(proto, int) else str(proto)
            ip, sport = _concat(value)
            fp(owner).ports[(str(addr), proto, int(port))] = (str(ip), int(sport))
        elif family == "bridge" and name == "ports":
            fp(owner).bridge_ports.add(str(parts[0]))
        elif family == "bridge" and name == "port_ip4":
            fp(owner).bridge_addrs.add((str(parts[0]), str(parts[1])))


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """The IPv4 nameservers of a resolv.conf that a sandbox could use, for ``dns_servers``.

    Loopback resolvers (systemd-resolved's 127.0.0.53) are left out: a sandbox cannot
    reach the host's loopback. Often the rest are private addresses, which
    ``blocked_out`` would deny without this exception. A missing file gives ().
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return ()
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.IPv4Address(fields[1])
            except ValueError:
                continue  # IPv6 or malformed: sandboxes resolve over IPv4 only
            if not address.is_loopback and str(address) not in found:
                found.append(str(address))
    return tuple(found)


# ----------------------------------------------------------------------------- sysctls


def _set_sysctl(path: str, value: str) -> None:
    """Write a /proc/sys value if it differs (a write to /proc does not block)."""
    file = Path(path)
    try:
        if file.read_text().strip() != value:
            file.write_text(value + "\n")
    except OSError as exc:
        raise NetPolicyError(f"cannot set {path} to {value}: {exc}") from exc


# ------------------------------------------------------------------------------ drivers


class NetPolicyDriver(Protocol):
    """What a NetPolicy actor drives: one implementation per platform (nft, pf, none)."""

    name: str

    async def ensure(self) -> None: ...
    async def apply(self, sbx: SandboxNet) -> None: ...
    async def update(self, sandbox_id: str, policy: EgressPolicy) -> None: ...
    async def remove(self, sandbox_id: str) -> None: ...
    async def leftovers(self, keep: Collection[str]) -> list[str]: ...
    async def purge(self, keep: Collection[str]) -> list[str]: ...
    async def destroy(self) -> None: ...


class NoNetPolicy:
    """The ``none`` policy: sandboxes without a network of their own (the process driver)."""

    name = "none"

    async def ensure(self) -> None:
        pass

    async def apply(self, sbx: SandboxNet) -> None:
        pass

    async def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        pass

    async def remove(self, sandbox_id: str) -> None:
        pass

    async def leftovers(self, keep: Collection[str]) -> list[str]:
        return []

    async def purge(self, keep: Collection[str]) -> list[str]:
        return []

    async def destroy(self) -> None:
        pass


class NftPolicy:
    """The Linux network policy of one node, in nftables (see the module docstring).

    Every operation on a sandbox is one nft batch, atomic in the kernel: on ``NftError``
    nothing of it applied. To delete a sandbox's elements of the shared maps the driver
    must know their keys: it reads them from the kernel once (in ``ensure``, or at first
    use) and then keeps them up to date itself, so ``apply``, ``update`` and ``remove``
    never read the kernel first. One ``NftPolicy`` owns one config's tables: two objects
    editing the same tables would each miss the other's changes.
    """

    name = "nft"

    def __init__(
        self,
        config: NftConfig | None = None,
        runner: NftRunner | None = None,
        runner_kind: RunnerKind = "auto",
    ) -> None:
        self.config = config or NftConfig()
        self._runner = runner
        self._runner_kind: RunnerKind = runner_kind
        self._footprints: dict[str, Footprint] | None = None  # None: not read yet
        self.batches = 0  # nft invocations (batches and listings), for tests and metrics
        self.batch_seconds = 0.0  # wall time spent in them

    @property
    def runner(self) -> NftRunner:
        """The nft runner, opened on first use (``NftError`` if nft is missing)."""
        if self._runner is None:
            self._runner = open_runner(self._runner_kind)
        return self._runner

    async def ensure(self) -> None:
        """Create the node's tables, or reset their static part; sandboxes are kept.

        Also turns on IPv4 forwarding, which NAT out needs (``manage_sysctls``), and
        reads which sandboxes the tables already hold (after a restart).
        """
        if self.config.manage_sysctls:
            _set_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
            self._allow_loopback_ports(self.config.port_address)
        await self._run(render_ensure(self.config))
        await self._reload()

    async def apply(self, sbx: SandboxNet) -> None:
        """Give the sandbox exactly this policy and these port maps, in one batch.

        Creates its chain, sets and elements, or replaces them (so a second apply with
        another policy or other ports is an update). Raises ``ValueError`` if the address
        is outside the node's subnet, ``NftError`` if nft refuses, for example a host
        port that another sandbox holds; then nothing changed.
        """
        self._check(sbx)
        if self.config.manage_sysctls:
            for port in sbx.ports:
                self._allow_loopback_ports(port.host_addr or self.config.port_address)
        previous = (await self._known()).get(sbx.sandbox_id)
        try:
            await self._run(render_apply(self.config, sbx, previous))
        except NftError:
            # Our picture may be stale (the table changed behind our back): retry once
            # against what the kernel really holds.
            previous = (await self._reload()).get(sbx.sandbox_id)
            await self._run(render_apply(self.config, sbx, previous))
        self._remember(sbx.sandbox_id, Footprint.of(sbx, self.config))

    async def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Replace a sandbox's egress policy (E2B ``update_network``) in one batch.

        Flows the new policy denies stop at their next packet. Raises ``NftError`` if
        the sandbox was never applied.
        """
        _check_name(sandbox_id, _ID, "sandbox_id")
        try:
            await self._run(render_update(self.config, sandbox_id, policy))
        except NftError as exc:
            raise NftError(f"sandbox {sandbox_id}: cannot update: {exc.message}", exc.script) from exc

    async def remove(self, sandbox_id: str) -> None:
        """Delete every object of the sandbox in one batch; a no-op if it has none."""
        _check_name(sandbox_id, _ID, "sandbox_id")
        previous = (await self._known()).get(sandbox_id, Footprint())
        try:
            await self._run(render_remove(self.config, sandbox_id, previous))
        except NftError:
            previous = (await self._reload()).get(sandbox_id, Footprint())
            await self._run(render_remove(self.config, sandbox_id, previous))
        self._remember(sandbox_id, None)

    async def sandbox_ids(self) -> set[str]:
        """Every sandbox that owns something in the node's tables (read from the kernel)."""
        return (await self._table_state()).owners()

    async def leftovers(self, keep: Collection[str]) -> list[str]:
        """Each nft object or element of a sandbox not in ``keep``, read from the kernel:
        leaks, for tests and for the clean-up after a restart. Empty without tables."""
        state = await self._table_state()
        return [
            f"{owner}: {line}"
            for owner in sorted(state.owners() - set(keep))
            for line in state.describe(owner)
        ]

    async def purge(self, keep: Collection[str]) -> list[str]:
        """Remove every sandbox not in ``keep`` (after a restart); return their ids.

        Reads the tables, then deletes all of it in one batch.
        """
        state = await self._table_state()
        gone = sorted(state.owners() - set(keep))
        if not gone:
            return []
        lines: list[str] = []
        for owner in gone:
            lines += _element_lines("delete", self.config, owner, state.footprints.get(owner, Footprint()))
        for owner in gone:
            if _ID.fullmatch(owner):  # "?" stands for elements without an owner comment
                lines += _drop_sandbox_lines(self.config, owner)
        await self._run("\n".join(lines) + "\n")
        for owner in gone:
            self._remember(owner, None)
        return gone

    async def destroy(self) -> None:
        """Delete the node's tables and everything in them; a no-op if they are gone."""
        await self._run(render_destroy(self.config))
        self._footprints = {}

    def close(self) -> None:
        """Release the nft runner; the object is not used afterwards."""
        if self._runner is not None:
            self._runner.close()

    # ------------------------------------------------------------------------ internals

    async def _run(self, script: str, *, json_output: bool = False) -> str:
        started = time.perf_counter()
        try:
            return await self.runner.run(script, json_output=json_output)
        finally:
            self.batches += 1
            self.batch_seconds += time.perf_counter() - started

    def _check(self, sbx: SandboxNet) -> None:
        ip, net = ipaddress.IPv4Address(sbx.ip), self.config.network
        if ip not in net or ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"sandbox address {sbx.ip} is not a host of {net}")
        keys = [(p.host_addr or self.config.port_address, p.proto, p.host_port) for p in sbx.ports]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{sbx.sandbox_id}: the same host port is mapped twice")

    def _allow_loopback_ports(self, address: str) -> None:
        # A DNAT of 127.0.0.1 to a sandbox leaves through the bridge with a loopback
        # source; the kernel drops such packets unless route_localnet is on for that
        # device. The input chain keeps the bridge from using it to reach the host.
        if ipaddress.IPv4Address(address).is_loopback:
            path = f"/proc/sys/net/ipv4/conf/{self.config.bridge}/route_localnet"
            if Path(path).exists():
                _set_sysctl(path, "1")

    def _remember(self, sandbox_id: str, footprint: Footprint | None) -> None:
        # Always the current dict: a concurrent _reload may have replaced it meanwhile.
        if self._footprints is not None:
            if footprint is None:
                self._footprints.pop(sandbox_id, None)
            else:
                self._footprints[sandbox_id] = footprint

    async def _known(self) -> dict[str, Footprint]:
        """Each sandbox's elements of the shared maps, read from the kernel the first time."""
        if self._footprints is None:
            return await self._reload()
        return self._footprints

    async def _reload(self) -> dict[str, Footprint]:
        t = self.config.table
        state = await self._list(
            f"list map inet {t} egress4",
            f"list map inet {t} ports4",
            f"list set bridge {t} ports",
            f"list set bridge {t} port_ip4",
        )
        self._footprints = state.footprints
        return self._footprints

    async def _list(self, *commands: str) -> TableState:
        # One command per call: nft 1.0.6 fills its cache for the last list command of a
        # batch only, so the others would fail with ENOENT.
        texts = [await self._run(command + "\n", json_output=True) for command in commands]
        return parse_table_state(doc for text in texts for doc in decode_json_documents(text))

    async def _table_state(self) -> TableState:
        t = self.config.table
        tables = await self._run("list tables\n", json_output=True)
        present = {
            (item["table"]["family"], item["table"]["name"])
            for doc in decode_json_documents(tables)
            for item in doc.get("nftables", ())
            if "table" in item
        }
        return await self._list(
            *(f"list table {family} {t}" for family in ("inet", "bridge") if (family, t) in present)
        )
