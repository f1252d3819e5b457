"""
The plan: the exact routes, ip rules and packet-filter chains that validated
inputs produce. Pure functions over plain data; no kernel, no Salt.

The packet-filter part is backend-neutral: chains hold abstract rules (tuples
such as ``("restore_mark", 0xff)``) that a backend (iptables today, nftables
later) renders in its own syntax.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

from . import family as families
from .family import IPV4, IPV6

DEFAULT_DST = IPV4.any
# The outside address the data-path lookups ask the kernel about: TEST-NET-3
# (RFC 5737), on no real network, so only default routes can answer for it.
LOOKUP_DST = IPV4.lookup_dst
MAIN_TABLE = 254


@dataclass(frozen=True)
class Owner:
    """
    Who owns a piece of kernel state. Routes and rules carry ``proto``; chains
    carry ``chain_prefix``. Two roles never touch each other's state.
    """

    role: str
    proto: int
    chain_prefix: str


# Routing protocol ids tag relayroute's routes and rules (``proto 210`` in ip).
RELAY = Owner("relay", 210, "RELAYROUTE-RELAY-")
PROXY = Owner("proxy", 211, "RELAYROUTE-PROXY-")
# Single policy routes managed on their own (the policy_route states).
POLICY = Owner("policy", 212, "RELAYROUTE-POLICY-")
OWNERS = {owner.role: owner for owner in (RELAY, PROXY, POLICY)}


@dataclass(frozen=True)
class Route:
    """
    A route in a policy table: unicast default via a gateway, or local on lo.
    ``family`` is 4 or 6; ``dst`` defaults to the family's default destination.
    """

    table: int
    proto: int
    dst: Optional[str] = None
    gateway: Optional[str] = None
    kind: str = "unicast"
    dev: Optional[str] = None
    # Where the route comes from in the inputs, for error messages; not compared.
    origin: str = field(default="", compare=False)
    family: int = 4

    def __post_init__(self):
        if self.dst is None:
            object.__setattr__(self, "dst", families.BY_VERSION[self.family].any)

    @property
    def key(self):
        return (self.table, self.dst, self.kind)

    @property
    def ident(self):
        """Everything that makes two routes the same (plain data: safe across module reloads)."""
        return (self.table, self.proto, self.dst, self.gateway, self.kind, self.dev)

    def line(self):
        default = self.dst in families.DEFAULT_DSTS and self.kind == "unicast"
        dst = "default" if default else self.dst
        words = [] if self.kind == "unicast" else [self.kind]
        words.append(dst)
        if self.gateway:
            words += ["via", self.gateway]
        if self.dev:
            words += ["dev", self.dev]
        words += ["table", str(self.table), "proto", str(self.proto)]
        return " ".join(words)


@dataclass(frozen=True)
class Rule:
    """
    ``ip [-6] rule priority P fwmark MARK/MASK lookup TABLE proto PROTO``: one
    per family (the kernel keeps IPv4 and IPv6 rules apart).
    """

    priority: int
    fwmark: int
    fwmask: int
    table: int
    proto: int
    origin: str = field(default="", compare=False)
    family: int = 4

    @property
    def ident(self):
        """Everything that makes two rules the same (plain data: safe across module reloads)."""
        return (self.family, self.priority, self.fwmark, self.fwmask, self.table, self.proto)

    def line(self):
        # 'ip -6 rule' prints what 'ip rule' does: the family is said once, up front.
        flag = "" if self.family == 4 else "ipv6 "
        return (
            f"{flag}{self.priority}: from all fwmark {self.fwmark:#x}/{self.fwmask:#x} "
            f"lookup {self.table} proto {self.proto}"
        )


@dataclass(frozen=True)
class Chain:
    """A packet-filter chain of relayroute's own in the mangle table."""

    name: str  # without the owner's prefix, e.g. "PRE"
    hook: Optional[str]  # "prerouting", "output" or None (reached by a jump)
    rules: Tuple[tuple, ...]


@dataclass(frozen=True)
class Sysctl:
    """A kernel parameter the plan needs, e.g. ``net.ipv4.conf.eth1.src_valid_mark = 1``."""

    key: str
    value: str
    origin: str = field(default="", compare=False)

    def line(self):
        return f"{self.key} = {self.value}"


@dataclass(frozen=True)
class Lookup:
    """
    A route lookup the kernel must answer as planned once the plan is in place:
    ``ip route get DST mark MARK`` (and ``from`` the host's own address on the
    gateway's network when ``from_own``) must come from ``table``, via
    ``gateway`` when one is given. ``mark`` 0 is an unmarked lookup; with
    ``if_main_default`` it is only made when the main table has a default route.
    """

    name: str  # what it proves, e.g. the proxy's name, or "unmarked"
    dst: str
    mark: int
    table: int
    gateway: Optional[str] = None
    from_own: bool = False
    if_main_default: bool = False
    priority: Optional[int] = None  # the planned rule that should answer it
    origin: str = field(default="", compare=False)
    family: int = 4

    def line(self, src=None):
        words = ["ip route get", self.dst]
        if src:
            words += ["from", src]
        if self.mark:
            words += ["mark", f"{self.mark:#x}"]
        return " ".join(words)

    def wanted(self):
        via = f"via {self.gateway} " if self.gateway else ""
        return f"{via}table {self.table}"


@dataclass(frozen=True)
class Plan:
    """Everything an owner wants in the kernel: routes, rules, chains, parameters."""

    owner: Owner
    routes: Tuple[Route, ...]
    rules: Tuple[Rule, ...]
    chains: Tuple[Chain, ...]
    sysctls: Tuple[Sysctl, ...] = ()
    # Data-path proofs made after every apply (the relay role's; others have none).
    lookups: Tuple[Lookup, ...] = ()
    # The address families the chains must see packets of: a backend with a
    # tool per family (iptables/ip6tables) renders the chains in each of these
    # only; one that holds both families in one table (nftables' inet) ignores it.
    families: Tuple[int, ...] = (4,)

    def lines(self):
        """Routes and rules as an operator reads them (the filter side is backend-specific)."""
        return {
            "routes": [route.line() for route in self.routes],
            "rules": [rule.line() for rule in self.rules],
        }


def relay_plan(spec, owner=RELAY, mark_aware_interfaces=()):
    """
    The relay's reply routing, as in the seed's answer, for a validated
    :class:`~model.RelaySpec` whose proxies all have a MAC (``macs``).

    PRE (from PREROUTING): restore the connmark into relayroute's bits; return
    when already marked; return for the relays' own networks (never marked);
    per proxy and per MAC of it (``macs``: an HA pair's two nodes), mark
    packets whose source MAC is that one with the proxy's mark; save the mark into
    the connmark. OUT (from OUTPUT): restore the connmark, so locally generated
    replies take the proxy's table.

    ``mark_aware_interfaces``: interfaces a proxy is reached on that are not
    the main default route's. Strict reverse-path filtering there would drop
    the proxied traffic (the client's address routes out the other way);
    ``src_valid_mark = 1`` makes that check use the packet's mark, so it looks
    the client up in the proxy's table and passes, while the filter stays
    strict for everything else.
    """
    mask = spec.mark_mask
    missing = [proxy.name for proxy in spec.proxies if not proxy.macs]
    if missing:
        raise ValueError(f"proxies without a MAC cannot be planned: {missing}")
    # One table and one rule per proxy and per family it has a LAN address in.
    routes = tuple(
        Route(
            table=proxy.table,
            proto=owner.proto,
            gateway=address,
            origin=f"proxies:{proxy.name}:table",
            family=fam.version,
        )
        for proxy in spec.proxies
        for fam, address in proxy.gateways()
    )
    rules = tuple(
        Rule(
            proxy.priority,
            proxy.mark,
            mask,
            proxy.table,
            owner.proto,
            origin=f"proxies:{proxy.name}:priority",
            family=fam.version,
        )
        for proxy in spec.proxies
        for fam, _address in proxy.gateways()
    )
    versions = plan_families(spec)
    pre = [("restore_mark", mask), ("return_if_marked", mask)]
    pre += [("return_if_source", net) for net in spec.lan_networks]
    # Never mark what is no connection of a client's: neighbour discovery and
    # link-local traffic (IPv6's own; a backend renders each in its family).
    pre += [("return_if_source", IPV6.link_local), ("return_if_neighbour_discovery",)]
    # One rule per MAC, all with the proxy's one mark (an HA pair: both nodes' NICs).
    pre += [
        ("mark_from_mac", mac, proxy.mark, mask) for proxy in spec.proxies for mac in proxy.macs
    ]
    pre.append(("save_mark", mask))
    chains = (
        Chain("PRE", "prerouting", tuple(pre)),
        Chain("OUT", "output", (("restore_mark", mask),)),
    )
    # rp_filter is IPv4's only (IPv6 has no sysctl for it: a firewall's rpfilter does that job).
    sysctls = tuple(
        Sysctl(f"net.ipv4.conf.{name}.src_valid_mark", "1", origin=f"interface {name}")
        for name in sorted(set(mark_aware_interfaces))
    )
    return Plan(owner, routes, rules, chains, sysctls, relay_lookups(spec), versions)


def plan_families(spec):
    """The families a relay's plan works in: those of its proxies' LAN addresses (IPv4 at least)."""
    found = {fam.version for proxy in spec.proxies for fam, _address in proxy.gateways()}
    return tuple(sorted(found | {4}))


def relay_lookups(spec):
    """
    The data path a relay must have, as route lookups the kernel answers
    itself: an outside address with each proxy's mark leaves via the proxy from
    its table (also from the relay's own address, as its replies are), and
    without a mark via the main table (when it has a default route). This
    catches what comparing rules cannot: another tool's rule at a smaller
    priority number that shadows relayroute's, a missing route, a wrong table.
    """
    lookups = [
        Lookup(
            proxy.name,
            fam.lookup_dst,
            proxy.mark,
            proxy.table,
            gateway=address,
            from_own=True,
            priority=proxy.priority,
            origin=f"proxies:{proxy.name}",
            family=fam.version,
        )
        for proxy in spec.proxies
        for fam, address in proxy.gateways()
    ]
    lookups += [
        Lookup(
            "unmarked",
            families.BY_VERSION[version].lookup_dst,
            0,
            MAIN_TABLE,
            if_main_default=True,
            origin="unmarked",
            family=version,
        )
        for version in plan_families(spec)
    ]
    return tuple(lookups)


def lookup_problems(answers, rules, prefix=""):
    """
    Pure: compare the kernel's answers to the plan's lookups. ``answers`` are
    ``(lookup, src, table, gateway, error)`` (``error`` the kernel's refusal,
    or None); ``rules`` the ip rules now, of both families (objects with
    ``family``, ``priority``, ``fwmark``, ``fwmask``, ``table``, ``selectors``
    and ``line()``), used to name a rule of the lookup's family that shadows
    relayroute's. Returns one message per wrong
    answer, naming the key path, the lookup and what the kernel answered.
    """
    problems = []
    for lookup, src, table, gateway, error in answers:
        path = f"{prefix}:{lookup.origin}" if prefix else lookup.origin
        asked = lookup.line(src)
        if error:
            problems.append(
                f"{path}: '{asked}' failed ({error}), expected {lookup.wanted()} (got {error!r})"
            )
            continue
        if table == lookup.table and (lookup.gateway is None or gateway == lookup.gateway):
            continue
        got = f"via {gateway} table {table}" if gateway else f"table {table}"
        problems.append(
            f"{path}: '{asked}' answered {got}, expected {lookup.wanted()}: "
            f"{_why(lookup, table, rules)} (got {got!r})"
        )
    return problems


def _why(lookup, table, rules):
    """What made a lookup answer from the wrong place, in an operator's words."""
    if table != lookup.table:
        # The kernel keeps each family's rules apart: only one of the lookup's
        # own family can have taken its mark.
        shadows = [
            rule
            for rule in rules
            if rule.family == lookup.family
            and rule.table == table
            and table != MAIN_TABLE
            and _rule_takes_mark(rule, lookup.mark)
            and (lookup.priority is None or rule.priority < lookup.priority)
        ]
        if shadows:
            rule = min(shadows, key=lambda r: r.priority)
            whose = f"relayroute's at priority {lookup.priority}" if lookup.priority else "the plan"
            return f"a rule at priority {rule.priority} ('{rule.line()}') shadows {whose}"
        if table == MAIN_TABLE and lookup.mark:
            return (
                f"no rule sends mark {lookup.mark:#x} to table {lookup.table}, or the table "
                "has no route: the lookup fell through to the main table"
            )
        return f"table {table} answered instead of table {lookup.table}"
    return f"table {table}'s route does not go via {lookup.gateway}"


def _rule_takes_mark(rule, mark):
    """Whether an ip rule's fwmark selector (none: every mark) matches ``mark``."""
    if not rule.fwmark and not rule.fwmask:
        return True
    mask = rule.fwmask or 0xFFFFFFFF
    return mark & mask == rule.fwmark


def proxy_plan(spec, owner=PROXY):
    """
    The transparent proxy's divert routing, the kernel's TPROXY recipe: packets
    that belong to a local transparent socket get the divert mark and are routed
    to the local stack through ``local 0.0.0.0/0 dev lo`` (``local ::/0`` for
    IPv6) in the divert table, in each family of the proxy's VIPs.

    ``-m socket --transparent`` narrows the match to sockets with IP_TRANSPARENT
    (HAProxy's ``usesrc clientip`` connections and transparent listeners), so the
    proxy's ordinary local traffic (ssh, health checks, Salt) is never marked.
    """
    mask = spec.mark_mask
    versions = tuple(spec.families)
    routes = tuple(
        Route(
            table=spec.divert_table,
            proto=owner.proto,
            kind="local",
            dev="lo",
            origin="divert_table",
            family=version,
        )
        for version in versions
    )
    rules = tuple(
        Rule(
            spec.divert_priority,
            spec.divert_mark,
            mask,
            spec.divert_table,
            owner.proto,
            origin="divert_priority",
            family=version,
        )
        for version in versions
    )
    chains = (
        Chain("PRE", "prerouting", (("jump_transparent_socket", "DIVERT"),)),
        Chain("DIVERT", None, (("set_mark", spec.divert_mark, mask), ("accept",))),
    )
    return Plan(owner, routes, rules, chains, families=versions)


def policy_route_plan(spec, owner=POLICY):
    """One policy route on its own: a table's default route and the fwmark rule to it."""
    version = families.of(spec.gateway).version
    route = Route(
        table=spec.table,
        proto=owner.proto,
        gateway=spec.gateway,
        origin="table",
        family=version,
    )
    rule = Rule(
        spec.priority,
        spec.fwmark,
        spec.fwmask,
        spec.table,
        owner.proto,
        origin="priority",
        family=version,
    )
    return Plan(owner, (route,), (rule,), (), families=(version,))


def plan_scope(plan):
    """The keys a single policy route's plan covers: ``(route keys, (family, rule priority))``."""
    return (
        {route.key for route in plan.routes},
        {(rule.family, rule.priority) for rule in plan.rules},
    )


def empty_plan(owner):
    """What ``absent`` asks for: nothing of this owner's."""
    return Plan(owner, (), (), ())
