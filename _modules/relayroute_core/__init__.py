"""
relayroute: reply routing for SMTP relays behind a transparent HAProxy.

A relay answers every connection through the gateway it came in by: connections
whose first packet arrives from a master-relay's MAC get that proxy's mark,
kept in the connmark, and their replies take a routing table whose default
route is the proxy. The HAProxy box itself gets the kernel's TPROXY divert.

This module is a package: Salt's loader loads ``_modules/relayroute_core/`` as the
``relayroute`` execution module and ``saltutil.sync_modules`` carries its
sub-modules along (the loader imports a directory with ``__init__.py`` and the
sync copies the whole tree). Each sub-module has one job:

- ``model``: validation of inputs (pure)
- ``planner``: the routes, rules and chains inputs produce (pure)
- ``iptables``, ``nftables``: the packet-filter backends (one read, one transaction)
- ``netlink``: rules, routes, neighbours and conntrack through pyroute2
- ``engine``: read, diff, apply, verify, roll back
- ``check``: the monitoring check's verdict and node_exporter metrics
- ``follow``: which discovered proxies' MACs the rules no longer mark (beacon)
- ``persist``, ``bootfiles``: what the host restores at boot without Salt

:depends: pyroute2 >= 0.9, iptables (nf_tables or legacy) with the mac,
    mark, CONNMARK and socket matches
"""

import contextlib
import dataclasses
import importlib
import logging
import os
import platform
import sys
import types

import salt.utils.path
from salt.exceptions import CommandExecutionError, SaltInvocationError

# Salt's loader puts this package into sys.modules only after this file has
# run, and its parent namespace is no package, so the relative imports below
# would fail. A placeholder carrying __path__ lets Python find the sub-modules;
# the loader then replaces it with this module.
# On a reload the loader re-runs each sub-module in place (importlib.reload),
# so code compares plain data and catches errors by base class, never by
# class identity across loads.
if __name__ not in sys.modules:
    _placeholder = types.ModuleType(__name__)
    _placeholder.__path__ = __path__
    sys.modules[__name__] = _placeholder

from . import lazy  # noqa: E402

# The loader re-runs each sub-module on each of its loads: one whose file did
# not change since it ran in this process is kept as it is (lazy.py).
lazy.keep_unchanged_submodules(__name__)

from . import engine, follow, mine, model, netlink, planner, topology  # noqa: E402
from . import family as families  # noqa: E402
from . import persist as persistence  # noqa: E402

# The sub-module ``check`` by its full name: the package's attribute ``check``
# is the Salt function below (on a reload, ``from . import check`` gives that).
checking = importlib.import_module(f"{__name__}.check")
# And ``status`` likewise (the Salt function ``status`` below).
status_view = importlib.import_module(f"{__name__}.status")

log = logging.getLogger(__name__)

__virtualname__ = "relayroute"

REQUIRED_BINARIES = ("iptables-save", "iptables-restore")


def __virtual__():
    if platform.system() != "Linux":
        return (False, "relayroute: policy routing and netfilter need a Linux kernel")
    if not netlink.HAS_PYROUTE2:
        return (False, "relayroute: the Python library pyroute2 (>= 0.9) is not installed")
    # A packet-filter backend: iptables' tools, or libnftables (a host with nft alone).
    missing = [name for name in REQUIRED_BINARIES if not salt.utils.path.which(name)]
    if missing:
        try:
            engine.backend("nftables").library()
        except (RuntimeError, ValueError) as err:
            return (
                False,
                f"relayroute: no packet-filter backend: missing {', '.join(missing)} "
                f"(install the iptables package), and {err}",
            )
    return __virtualname__


def _fail(err):
    """Turn an engine error into Salt's exceptions, keeping the cause."""
    # By base class: Salt may reload sub-modules, and classes of two loads differ.
    if isinstance(err, ValueError):
        return SaltInvocationError(str(err))
    return CommandExecutionError(str(err))


def _relay_spec(lan_networks, mark_mask, proxies, prefix):
    try:
        return model.relay_spec(lan_networks, mark_mask, proxies, prefix=prefix)
    except ValueError as err:
        raise _fail(err) from err


def _proxy_spec(divert_mark, divert_table, divert_priority, mark_mask, prefix, families=(4,)):
    try:
        return model.proxy_spec(
            divert_mark, divert_table, divert_priority, mark_mask, prefix, families
        )
    except ValueError as err:
        raise _fail(err) from err


def _resolve_proxies(spec, kernel, prefix, resolve=True):
    """
    Check each proxy address is a neighbour on a connected network of its
    family, then fill in MACs not given, from the neighbour table of each
    address's family (resolving them when needed: ARP, IPv6's neighbour
    solicitation); a proxy with an address in each family gets the MACs
    found for either, each once, IPv4's first. Returns the spec with MACs and
    the interfaces proxies are reached on that are not the main default
    route's of that family (reverse-path filtering must see marks there).
    """
    errors = []
    proxies = []
    interfaces = set()
    base = f"{prefix}:proxies" if prefix else "proxies"
    for proxy in spec.proxies:
        bad = False
        for index, (fam, address) in enumerate(proxy.gateways()):
            path = f"{base}:{proxy.name}:address" + (
                f":{index}" if len(proxy.addresses) > 1 else ""
            )
            ip = fam.address(address)
            if any(fam.address(own) == ip for own in kernel.addresses if _of(own) is fam):
                errors.append(
                    f"{path}: is an address of this host, not of a proxy (got {address!r})"
                )
                bad = True
                continue
            connected = sorted({net for net in kernel.networks if _of(net) is fam})
            if not any(ip in fam.network(net) for net in connected):
                errors.append(
                    f"{path}: is not on a connected network of this host "
                    f"({fam.name}: {connected}) (got {address!r})"
                )
                bad = True
                continue
            default = kernel.default_interface_of(fam.version) or kernel.default_interface
            for net, ifname in kernel.network_interfaces:
                if _of(net) is fam and ip in fam.network(net) and ifname != default:
                    interfaces.add(ifname)
        if bad:
            continue
        macs = proxy.macs
        if not macs:
            macs = netlink.lookup_macs(proxy.addresses, resolve=resolve)
            if not macs and resolve:
                errors.append(
                    f"{base}:{proxy.name}:mac: not given, and "
                    f"{' and '.join(proxy.addresses)} did not answer ARP or neighbour "
                    "solicitation; give the MAC or check the proxy is up (got None)"
                )
                continue
            if not macs:
                macs = (f"<mac of {proxy.address}>",)
        proxies.append(dataclasses.replace(proxy, mac=macs[0], macs=tuple(macs)))
    if errors:
        raise SaltInvocationError("; ".join(errors))
    if not kernel.default_interface:
        interfaces = set()
    return dataclasses.replace(spec, proxies=tuple(proxies)), sorted(interfaces)


def _of(text):
    """The family of an address or network the kernel reported."""
    return families.of(text)


def _host_relay_plan(spec, kernel, prefix):
    """The relay plan for this host: proxies checked and their MACs resolved."""
    spec, interfaces = _resolve_proxies(spec, kernel, prefix)
    return planner.relay_plan(spec, mark_aware_interfaces=interfaces)


def _persist_target(persist, persist_dir, prefix, watch=None):
    """
    The :class:`persist.Target` from ``persist`` settings (None: not kept).
    With ``watch`` (the watcher's settings, which the formula's states always
    pass) the role's systemd units are the target's too (``units``).
    """
    settings = dict(persist or {})
    if persist_dir:
        settings.setdefault("dir", persist_dir)
    errors = model._Errors(prefix)
    topology.persist(settings, errors, "persist")
    if watch is not None:
        topology.watch(watch, errors, "watch")
    if errors.items:
        raise SaltInvocationError("; ".join(errors.items))
    if not settings.get("dir") or settings.get("enabled") is False:
        return None
    fields = {f.name for f in dataclasses.fields(persistence.Target)}
    if watch is not None:
        settings["units"] = True
        for key in ("enabled", "debounce", "shell"):
            if key in watch:
                settings["watch" if key == "enabled" else f"watch_{key}"] = watch[key]
    return persistence.Target(**{k: v for k, v in settings.items() if k in fields})


def _converge(plan_, filter_backend, test, prefix="", scope=None, target=None, kernel=None):
    # A real apply holds the host's relayroute lock from its read to its last
    # write: it never interleaves with a restore (boot, or a repair) or another apply.
    try:
        with contextlib.nullcontext(False) if test else engine.locked() as waited:
            if waited:
                kernel = None  # read again: a restore or apply ran while we waited
            return engine.converge(
                plan_,
                filter_backend,
                test=test,
                prefix=prefix,
                scope=scope,
                persist_target=target,
                kernel=kernel,
            )
    except (ValueError, RuntimeError, OSError) as err:
        raise _fail(err) from err


def _kernel():
    try:
        return netlink.read()
    except RuntimeError as err:
        raise _fail(err) from err


def _backend(name):
    try:
        return engine.backend(name)
    except ValueError as err:
        raise _fail(err) from err


def _read(filter_backend):
    try:
        return engine.read(filter_backend)
    except RuntimeError as err:
        raise _fail(err) from err


def validate_topology(config, minion_id=None, records=None):
    """
    Validate the whole ``relayroute`` pillar (the topology of every proxy and
    relay) and return ``{"errors": [...], "relay": {...}, "proxy": {...},
    "mine": [...]}``: the errors, each naming the pillar key path and value,
    or the arguments of the relay states and of this minion's proxy states.
    The formula's ``map.jinja`` calls it before any state runs.

    With ``mine:enabled`` or ``relays_from_mine`` in the pillar, what the
    pillar omits (proxies' MACs, relays' addresses, the relays themselves)
    comes from the Salt mine's relayroute records (one ``mine.get`` of the
    master; see the README, "The fleet from the mine"); ``mine`` lists what
    was taken and what was ignored as stale. This minion's own record is
    made here (one netlink dump), so a new relay's first highstate counts
    itself. Without those keys nothing is read from the host or the master.
    ``records``: ``{minion id: record}`` to use instead of the mine's.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.validate_topology \\
            "$(salt-call --out=json pillar.get relayroute)" minion_id=relay1
    """
    notes, unset = [], []
    if mine.wanted(config):
        # Where mine.update finds them: the minion's configuration and its pillar.
        functions = {
            **(__opts__.get("mine_functions") or {}),  # noqa: F821 - Salt's loader
            **(__pillar__.get("mine_functions") or {}),  # noqa: F821
        }
        if mine.ALIAS not in functions:
            unset.append(mine.unpublished())
        if records is None:
            records = __salt__["mine.get"]("*", mine.ALIAS)  # noqa: F821 - Salt's loader
        records = dict(records or {})
        roles = __grains__.get("roles") or []  # noqa: F821 - Salt's loader
        if minion_id is not None and {"relay", "proxy"} & set(_as_list(roles)):
            records[str(minion_id)] = mine_record()
        config, notes = mine.merge(config, records)
        for note in notes:
            (log.info if mine.taken(note) else log.warning)("relayroute: %s", note)
    result = topology.topology(config, minion_id)
    if unset:
        result = {**result, "errors": [*unset, *result["errors"]], "relay": None, "proxy": None}
    warnings = [note for note in notes if not mine.taken(note)]
    return {**result, "mine": notes, "mine_warnings": warnings, "mine_used": mine.wanted(config)}


def _as_list(value):
    return [value] if isinstance(value, str) else list(value or ())


def mine_record():
    """
    What this minion publishes to the Salt mine for relayroute: its roles
    (grain ``roles``), the time, and each global unicast address with its
    interface and MAC (see the README, "The fleet from the mine"). Meant for
    the mine, through the pillar:

    .. code-block:: yaml

        mine_functions:
          relayroute:
            mine_function: relayroute.mine_record

    CLI Example:

    .. code-block:: bash

        salt '*' relayroute.mine_record
        salt-run mine.get '*' relayroute
    """
    try:
        addresses = netlink.host_addresses()
    except RuntimeError as err:
        raise _fail(err) from err
    roles = __grains__.get("roles") or []  # noqa: F821 - Salt's loader
    return mine.record(addresses, _as_list(roles))


def plan(lan_networks, mark_mask, proxies, backend="iptables"):
    """
    Show the exact routes, ip rules and packet-filter rules a relay's inputs
    produce, without touching or even reading the kernel (no root needed).
    A proxy without ``mac`` shows a placeholder for the MAC looked up at apply.

    lan_networks
        The relay's own networks, never marked (list of CIDR networks).
    mark_mask
        relayroute's bits of the packet mark, e.g. ``0xff``.
    proxies
        Mapping of proxy name to ``address``, ``mark``, ``table``, ``priority``
        and optional ``mac`` and ``macs`` (an HA pair: every node's MAC,
        all marked with the proxy's mark).

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.plan '[192.0.2.0/24]' 0xff \\
            '{master-relay: {address: 192.0.2.2, mac: "02:00:c0:00:02:02", \\
              mark: 254, table: 1000254, priority: 1000}}'
    """
    spec = _relay_spec(lan_networks, mark_mask, proxies, "")
    spec = dataclasses.replace(
        spec,
        proxies=tuple(
            dataclasses.replace(p, mac=p.mac or f"<mac of {p.address}>") for p in spec.proxies
        ),
    )
    relay = planner.relay_plan(spec)
    filter_backend = _backend(backend)
    return {**relay.lines(), filter_backend.NAME: filter_backend.desired_lines(relay)}


def relay_apply(
    lan_networks,
    mark_mask,
    proxies,
    test=False,
    backend="iptables",
    prefix="",
    persist_dir=None,
    persist=None,
    watcher=None,
):
    """
    Put a relay's reply routing in place: per proxy a table whose default
    route is the proxy and ``ip rule fwmark MARK/MASK lookup TABLE``, and the
    mangle chains that restore, set and save the mark. Routes, rules and
    chains relayroute owns but the inputs no longer ask for are removed.
    Returns ``{"changes": {...}}``, empty when the kernel already matches.

    Bad input or a conflict with another tool's rules or tables raises before
    anything changes; a failure while applying is rolled back.

    When a proxy is reached on another interface than the main default
    route's, that interface gets ``src_valid_mark = 1`` so strict reverse-path
    filtering checks proxied packets against the proxy's table.

    test
        Only report what would change.
    prefix
        Key path prepended to input errors (``relayroute`` for pillar).
    persist_dir
        Keep the boot-time restore script (``relay.restore``) and the values
        of kernel parameters before relayroute changed them here, e.g.
        ``/etc/relayroute``; the ``relayroute-relay`` systemd unit runs it.
    persist
        The pillar's ``persist`` settings, e.g. ``{dir: /etc/relayroute,
        mechanism: network-scripts}``: with ``network-scripts`` (CentOS 7) the
        routes and rules go to ``route-<dev>``/``rule-<dev>`` blocks, the chains
        to ``/etc/sysconfig/iptables`` and kernel parameters to a sysctl.d
        drop-in instead of the restore script. A host that would not restore
        them at boot (no iptables.service, firewalld enabled) is refused
        before anything changes.
    watcher
        The watcher's settings (pillar ``relayroute:watch``: ``enabled``,
        ``debounce``, ``shell``), e.g. ``{enabled: true}``. Given (the
        formula's states always give them), with mechanism ``unit`` the
        role's systemd units are kept too, as boot files: the boot unit
        ``relayroute-relay.service``, the watcher ``<dir>/relay.watch`` and
        its unit ``relayroute-relay-watch.service`` (not with ``enabled:
        false``), each enabled by a symlink in
        ``<systemd_dir>/<wanted_by>.wants``; removed with another mechanism.
        On a systemd host a changed unit is followed by ``systemctl
        daemon-reload`` and a changed watcher is (re)started; a no-op runs
        nothing. Without it, units are left as they are.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.relay_apply '[192.0.2.0/24]' 0xff \\
            '{master-relay: {address: 192.0.2.2, mark: 254, table: 1000254, priority: 1000}}'
    """
    spec = _relay_spec(lan_networks, mark_mask, proxies, prefix)
    filter_backend = _backend(backend)
    kernel = _kernel()
    target = _persist_target(persist, persist_dir, prefix, watcher)
    relay = _host_relay_plan(spec, kernel, prefix)
    return _converge(relay, filter_backend, test, prefix, target=target, kernel=kernel)


def relay_remove(test=False, backend="iptables", persist_dir=None, persist=None, watcher=None):
    """
    Remove everything relayroute added for the relay role: its mangle chains
    and jumps, its ip rules and its table routes; with ``persist_dir`` (or
    ``persist``), its boot files and blocks (the systemd units it wrote, the
    watcher stopped first on a systemd host; with ``watcher``, as the formula's
    ``clean`` passes it, the role's units wherever they came from), and
    kernel parameters get their earlier values back. Nothing else is touched.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.relay_remove
    """
    filter_backend = _backend(backend)
    # Removal cleans the boot files even where persistence is now switched off.
    target = _persist_target({**(persist or {}), "enabled": True}, persist_dir, "", watcher)
    empty = planner.empty_plan(planner.RELAY)
    return _converge(empty, filter_backend, test, target=target)


def proxy_apply(
    divert_mark=None,
    divert_table=100,
    divert_priority=100,
    mark_mask=0xFF,
    test=False,
    backend="iptables",
    prefix="",
    persist_dir=None,
    persist=None,
    families=(4,),
    watcher=None,
):
    """
    Put the transparent proxy's divert routing in place: packets of local
    transparent sockets (``-m socket --transparent``) get ``divert_mark``,
    ``ip rule fwmark MARK/MASK lookup divert_table``, and
    ``local 0.0.0.0/0 dev lo`` in that table. ``persist_dir``/``persist`` as
    for :func:`relay_apply` (with ``network-scripts``: ``route-lo``/``rule-lo``),
    and ``watcher`` too (``relayroute-proxy.service``, ``relayroute-proxy-watch.service``).
    ``divert_mark`` defaults to the lowest bit of ``mark_mask`` (1 for 0xff,
    0x10 for 0xf0). ``families``: the address families of the proxy's VIPs
    (``[4, 6]`` for a dual-stack proxy: ``local ::/0 dev lo`` and the IPv6 rule too).

    CLI Example:

    .. code-block:: bash

        salt master-relay relayroute.proxy_apply divert_mark=1 divert_table=100
        salt master-relay relayroute.proxy_apply families='[4, 6]'
    """
    spec = _proxy_spec(divert_mark, divert_table, divert_priority, mark_mask, prefix, families)
    filter_backend = _backend(backend)
    target = _persist_target(persist, persist_dir, prefix, watcher)
    return _converge(planner.proxy_plan(spec), filter_backend, test, prefix, target=target)


def proxy_remove(test=False, backend="iptables", persist_dir=None, persist=None, watcher=None):
    """
    Remove everything relayroute added for the proxy role (``watcher`` as for
    :func:`relay_remove`).

    CLI Example:

    .. code-block:: bash

        salt master-relay relayroute.proxy_remove
    """
    filter_backend = _backend(backend)
    # Removal cleans the boot files even where persistence is now switched off.
    target = _persist_target({**(persist or {}), "enabled": True}, persist_dir, "", watcher)
    empty = planner.empty_plan(planner.PROXY)
    return _converge(empty, filter_backend, test, target=target)


def _policy_route_plan(table, gateway, fwmark, priority, fwmask):
    try:
        spec = model.policy_route_spec(table, gateway, fwmark, fwmask, priority)
    except ValueError as err:
        raise _fail(err) from err
    return planner.policy_route_plan(spec)


def policy_route_apply(table, gateway, fwmark, priority, fwmask=0xFFFFFFFF, test=False):
    """
    Keep one policy route on its own: ``default via GATEWAY table TABLE`` and
    ``ip rule priority PRIORITY fwmark FWMARK/FWMASK lookup TABLE``. Other
    policy routes, and the relay and proxy roles, are not touched.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.policy_route_apply 1000254 192.0.2.2 254 1000 fwmask=0xff
    """
    wanted = _policy_route_plan(table, gateway, fwmark, priority, fwmask)
    return _converge(wanted, _backend("iptables"), test, scope=planner.plan_scope(wanted))


def policy_route_remove(table, gateway, fwmark, priority, fwmask=0xFFFFFFFF, test=False):
    """
    Remove one policy route kept by :func:`policy_route_apply` (its table's
    default route and its rule), and nothing else.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.policy_route_remove 1000254 192.0.2.2 254 1000 fwmask=0xff
    """
    scope = planner.plan_scope(_policy_route_plan(table, gateway, fwmark, priority, fwmask))
    empty = planner.empty_plan(planner.POLICY)
    return _converge(empty, _backend("iptables"), test, scope=scope)


def show(role=None, backend="iptables"):
    """
    Show what relayroute owns in the kernel now, per role: ip rules, table
    routes and packet-filter lines.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.show
        salt master-relay relayroute.show role=proxy
    """
    filter_backend = _backend(backend)
    current = _read(filter_backend)
    roles = [role] if role else sorted(planner.OWNERS)
    shown = {}
    for name in roles:
        owner = planner.OWNERS.get(name)
        if owner is None:
            raise SaltInvocationError(
                f"role: must be one of {sorted(planner.OWNERS)} (got {name!r})"
            )
        rules = sorted(
            engine.owned_rules(current.kernel, owner), key=lambda r: (r.family, r.priority)
        )
        shown[name] = {
            "rules": [rule.line() for rule in rules],
            "routes": [route.line() for route in engine.owned_routes(current.kernel, owner)],
            filter_backend.NAME: filter_backend.owned_lines(current.ruleset, owner.chain_prefix),
        }
    return shown


def lookup_mac(address, resolve=True):
    """
    The MAC address of a neighbour (an IPv4 or IPv6 address), from the
    kernel's neighbour table of its family. With ``resolve`` (default), an
    address not in the table is resolved first (ARP, or IPv6's neighbour
    solicitation). Returns None when it cannot be found.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.lookup_mac 192.0.2.2
        salt relay1 relayroute.lookup_mac 2001:db8:2::2
    """
    errors = model._Errors()
    norm = model.to_address(address, errors, "address")
    if norm is None:
        raise SaltInvocationError("; ".join(errors.items))
    try:
        return netlink.lookup_mac(norm, resolve=resolve)
    except RuntimeError as err:
        raise _fail(err) from err


def _pillar_backend(role):
    """
    The backend of this minion's role: the pillar's ``relayroute:backend``;
    without one, the backend of the role's last successful apply, as its
    memory (``<persist:dir>/<role>.json``) records it (the formula's default
    comes from ``parameters/`` through map.jinja, which a module does not
    render); ``iptables`` when neither says.
    """
    config = __pillar__.get("relayroute")  # noqa: F821 - injected by Salt's loader
    config = config if isinstance(config, dict) else {}
    if config.get("backend"):
        return config["backend"]
    persist = config.get("persist") if isinstance(config.get("persist"), dict) else {}
    memory = persistence.load(persist.get("dir", persistence.DEFAULT_DIR), role)
    return memory.get("backend") or "iptables"


def discovered_proxies():
    """
    The proxies of this minion's relay topology (pillar ``relayroute``) whose
    MAC relayroute discovers (no ``mac``/``macs``), each with its address
    (``addresses``: one per family), its mark and the MACs their neighbour
    entries carry now (``neighbours``, each once, IPv4's first; ``neighbour``
    the first, None when none has one). One netlink dump per family, no
    process, no ARP or neighbour solicitation: what the
    ``relayroute`` beacon looks at every interval. Empty on a minion without
    the ``relay`` role (``roles`` grain); a pillar that does not validate
    raises with its errors.

    CLI Example:

    .. code-block:: bash

        salt -G roles:relay relayroute.discovered_proxies
    """
    roles = __grains__.get("roles") or []  # noqa: F821 - injected by Salt's loader
    if "relay" not in ([roles] if isinstance(roles, str) else roles):
        return {}
    config = __pillar__.get("relayroute")  # noqa: F821 - injected by Salt's loader
    result = topology.topology(config, __grains__.get("id"))  # noqa: F821
    if result["errors"]:
        raise SaltInvocationError("; ".join(result["errors"]))
    proxies = follow.discovered(result["relay"])
    try:
        macs = netlink.neighbour_macs(
            [address for proxy in proxies.values() for address in proxy["addresses"]]
        )
    except RuntimeError as err:
        raise _fail(err) from err
    return {
        name: {**proxy, **follow.neighbours(proxy["addresses"], macs)}
        for name, proxy in proxies.items()
    }


def marked_macs(backend=None):
    """
    ``{mark: [mac, ...]}``: the source MACs the relay role's rules mark now,
    and with which mark, read from the kernel's packet filter (one ruleset
    read). ``backend`` defaults to the pillar's ``relayroute:backend``
    (``iptables``).

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.marked_macs
    """
    if backend is None:
        backend = _pillar_backend("relay")
    filter_backend = _backend(backend)
    try:
        ruleset = filter_backend.read()
    except RuntimeError as err:
        raise _fail(err) from err
    return filter_backend.marked_macs(ruleset, planner.RELAY.chain_prefix)


def flows(mark_mask=0xFFFFFFFF, port=None):
    """
    Conntrack's view of the host's connections with their connmark, what the
    seed checks with ``conntrack -L``: mark 0 for connections that came by the
    default gateway, the proxy's mark for those that came through it.

    mark_mask
        Show only these bits of the connmark (relayroute's ``mark_mask``).
    port
        Only flows to or from this port, e.g. 25.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.flows mark_mask=0xff port=25
    """
    errors = model._Errors()
    mask = model.to_mask(mark_mask, errors, "mark_mask")
    if port is not None:
        port = model.to_int(port, errors, "port", minimum=1, maximum=65535, what="a port")
    if errors.items:
        raise SaltInvocationError("; ".join(errors.items))
    try:
        return [flow.line() for flow in netlink.flows(mask, port)]
    except RuntimeError as err:
        raise _fail(err) from err


def check(
    lan_networks,
    mark_mask,
    proxies,
    backend="iptables",
    prefix="",
    textfile=None,
    retcode=True,
    summary_only=False,
):
    """
    Check a relay against its plan, for monitoring: read the kernel (nothing
    is changed), compare relayroute's rules, table routes, chains and kernel
    parameters with the plan for these inputs (the arguments of
    :func:`relay_apply`), make the kernel's own route lookups (each proxy's
    mark must leave via the proxy, from its table, also from the relay's own
    address; no mark via the main table), and check each proxy's neighbour
    entry carries a MAC relayroute marks. Returns ``{"ok": bool, "summary":
    "one line", "differences": [...]}``, each difference naming the key path
    and what the kernel has.

    When not ok, the call's return code is 2 (Salt's ``retcode``, which
    ``salt-call --retcode-passthrough`` exits with): a Nagios CRITICAL.

    A proxy without ``mac``/``macs`` is looked up in the neighbour table,
    resolved through ARP when absent (which fills only the neighbour cache).

    textfile
        Also write node_exporter metrics to this path, atomically:
        ``relayroute_drift`` (0/1), ``relayroute_proxy_lookup_ok{proxy=...}``
        and ``relayroute_flows{mark=...}`` (conntrack flows by connmark).
    retcode
        Set the return code 2 on drift (default); ``False`` to only return.
    summary_only
        Return only the one-line summary (what a Nagios-style check prints).

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.check '[192.0.2.0/24]' 0xff \\
            '{master-relay: {address: 192.0.2.2, mark: 254, table: 1000254, priority: 1000}}'
    """
    spec = _relay_spec(lan_networks, mark_mask, proxies, prefix)
    filter_backend = _backend(backend)
    kernel = _kernel()
    relay = _host_relay_plan(spec, kernel, prefix)
    try:
        result = checking.run(relay, filter_backend, kernel, prefix, textfile)
    except (RuntimeError, OSError) as err:
        raise _fail(err) from err
    if retcode and not result["ok"]:
        __context__["retcode"] = 2  # noqa: F821 - injected by Salt's loader
    return result["summary"] if summary_only else result


def _pillar_topology():
    """
    ``(config, topology)``: this minion's ``relayroute`` pillar and its
    topology as the formula's states see it (:func:`validate_topology`, the
    mine's records included when the pillar reads the mine), for the
    read-only views that compare the kernel with it.
    """
    config = __pillar__.get("relayroute")  # noqa: F821 - injected by Salt's loader
    return config, validate_topology(config, __grains__.get("id"))  # noqa: F821


def status():
    """
    This relay's status, one row per proxy of the pillar's topology (and a
    last ``(direct)`` row): the proxy's rule and table route in each family
    (ok or MISSING), the MACs relayroute marks with its mark, the packets
    those marking rules marked, the connections carrying its mark now, when
    relayroute last applied (its memory file), and the drift check's verdict
    (:func:`check_topology`). Reads only; one row list per relay, so the
    ``table`` outputter prints the fleet relay by relay, and ``salt-run
    relayroute.status`` as one table.

    CLI Example:

    .. code-block:: bash

        salt -G roles:relay relayroute.status --out=table
    """
    config, result = _pillar_topology()
    if result["errors"]:
        raise CommandExecutionError(
            "relayroute: the pillar does not validate: " + "; ".join(result["errors"])
        )
    args = result["relay"]
    prefix = "relayroute"
    spec = _relay_spec(args["lan_networks"], args["mark_mask"], args["proxies"], prefix)
    filter_backend = _backend(_pillar_backend("relay"))
    kernel = _kernel()
    spec, interfaces = _resolve_proxies(spec, kernel, prefix, resolve=False)
    plan_ = planner.relay_plan(spec, mark_aware_interfaces=interfaces)
    persist = config.get("persist") if isinstance(config.get("persist"), dict) else {}
    directory = persist.get("dir", persistence.DEFAULT_DIR)
    try:
        memory = persistence.load(directory, "relay")
        current = engine.read(filter_backend, kernel, [s.key for s in plan_.sysctls], memory)
        verdict, _answers = checking.evaluate(plan_, current, filter_backend, prefix)
        marked = filter_backend.marked_macs(current.ruleset, planner.RELAY.chain_prefix)
        packets = filter_backend.marked_packets(planner.RELAY.chain_prefix)
        flows_ = status_view.flows_by_mark(netlink.flows(spec.mark_mask))
    except (RuntimeError, OSError) as err:
        raise _fail(err) from err
    try:
        last_apply = os.path.getmtime(persistence.paths(directory, "relay")[1])
    except OSError:
        last_apply = None
    return status_view.rows(plan_, spec, kernel, marked, packets, flows_, verdict, last_apply)


def check_topology(textfile=None, retcode=True, summary_only=False):
    """
    :func:`check` with the relay arguments of this minion's pillar
    (``relayroute``, validated as the formula does): what a monitoring
    system runs on every relay. A pillar that does not validate is a failed
    check whose differences are the pillar's errors.

    Exit code 2 on drift, for Nagios-style checks outside Salt:

    .. code-block:: bash

        salt-call --local --retcode-passthrough --out=txt \\
            relayroute.check_topology summary_only=True   # 0 OK, 2 CRITICAL

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.check_topology
        salt relay1 relayroute.check_topology \\
            textfile=/var/lib/prometheus/node-exporter/relayroute.prom
    """
    _config, result = _pillar_topology()
    if result["errors"]:
        verdict = {
            "ok": False,
            "summary": f"relayroute CRITICAL: the pillar does not validate: {result['errors'][0]}",
            "differences": result["errors"],
        }
        if retcode:
            __context__["retcode"] = 2  # noqa: F821
        return verdict["summary"] if summary_only else verdict
    backend = _pillar_backend("relay")
    return check(
        backend=backend,
        prefix="relayroute",
        textfile=textfile,
        retcode=retcode,
        summary_only=summary_only,
        **result["relay"],
    )


def _probe():
    """The probe's sub-module by its full name (the package has Salt functions named probe_*)."""
    return importlib.import_module(f"{__name__}.probe")


def probe_smtp(sessions, timeout=10, message=None, source=None, towards=None):
    """
    The probe minion's part of ``salt-run relayroute.probe``: open SMTP
    sessions and say where each came from. Each of ``sessions``
    (``{id, address, port, group}``) connects, reads the banner, says EHLO
    (and sends ``message`` when given), then QUIT; sessions of one ``group``
    are opened one after another and held open until all have their banner
    (so HAProxy's leastconn gives each relay one), groups run side by side.
    Every operation is bounded by ``timeout`` seconds.

    Returns ``{"sessions": [{id, address, port, local, local_port, banner_ok,
    banner, ehlo_ok, sent, error}, ...], "sources": {address: local address}}``,
    ``sources`` being the address this host sends to each of ``towards`` from
    (by its routing; nothing is sent).

    message
        ``{from: ..., to: ...}``: a whole message to this sink in each session.
    source
        The address(es) to send from, one per family.

    CLI Example:

    .. code-block:: bash

        salt probe1 relayroute.probe_smtp '[{id: s1, address: 192.0.2.11, port: 25}]'
        salt probe1 relayroute.probe_smtp '[]' towards='[198.51.100.25]'
    """
    probing = _probe()
    errors = model._Errors()
    source = model.to_addresses(source, errors, "source") if source else ()
    if not isinstance(sessions, list) or not all(
        isinstance(s, dict) and {"id", "address", "port"} <= set(s) for s in sessions
    ):
        errors.add("sessions", sessions, "must be a list of {id, address, port[, group]}")
    else:
        for index, session in enumerate(sessions):
            model.to_address(session["address"], errors, f"sessions:{index}:address")
            model.to_int(session["port"], errors, f"sessions:{index}:port", 1, 65535, "a port")
    for index, address in enumerate(towards or []):
        model.to_address(address, errors, f"towards:{index}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        errors.add("timeout", timeout, "must be a positive number of seconds")
    if message is not None and not (isinstance(message, dict) and {"from", "to"} <= set(message)):
        errors.add("message", message, "must be a mapping with 'from' and 'to'")
    if errors.items:
        raise SaltInvocationError("; ".join(errors.items))
    sessions = [{**s, "port": int(s["port"])} for s in sessions]
    return {
        "sessions": probing.run_sessions(sessions, timeout, message, source),
        "sources": probing.sources_towards(towards or [], source),
    }


def probe_flows(sources, ports, mark_mask=0xFFFFFFFF):
    """
    A relay's part of ``salt-run relayroute.probe``: the conntrack entries
    of TCP connections from the probe's ``sources`` (addresses) to ``ports``,
    each ``{src, sport, dst, dport, mark, state}`` with the connmark under
    ``mark_mask``: 0 for a connection that came directly, the proxy's mark for
    one HAProxy opened.

    CLI Example:

    .. code-block:: bash

        salt relay1 relayroute.probe_flows '[203.0.113.10]' '[25, 587]' mark_mask=0xff
    """
    errors = model._Errors()
    mask = model.to_mask(mark_mask, errors, "mark_mask")
    if not isinstance(sources, list):
        errors.add("sources", sources, "must be a list of addresses")
        sources = []
    for index, address in enumerate(sources):
        model.to_address(address, errors, f"sources:{index}")
    if not isinstance(ports, list) or not ports:
        errors.add("ports", ports, "must be a non-empty list of ports")
        ports = []
    ports = [model.to_int(p, errors, f"ports:{i}", 1, 65535, "a port") for i, p in enumerate(ports)]
    if errors.items:
        raise SaltInvocationError("; ".join(errors.items))
    try:
        return _probe().select_flows(netlink.flows(mask), sources, ports)
    except RuntimeError as err:
        raise _fail(err) from err


def _privileges():
    """The sub-module judging HAProxy's processes (pure), by its full name."""
    return importlib.import_module(f"{__name__}.privileges")


def _read_status(pid):
    """``/proc/PID/status`` decoded (privileges.parse_status), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as fh:
            return _privileges().parse_status(fh.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(pid):
    """The statuses of ``pid``'s live children, from one pass over /proc (no process spawned)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            status = _read_status(entry)
            if status is not None:
                found.append(status)
    return sorted(found, key=lambda status: status["pid"])


def haproxy_privileges(pidfile=None, pid=None, user=None):
    """
    Whether the running HAProxy holds what transparent proxying needs:
    CAP_NET_BIND_SERVICE, and CAP_NET_ADMIN or CAP_NET_RAW (IP_TRANSPARENT),
    in the effective set of its master and of every worker, and, with
    ``user``, runs as that user. Reads ``/proc/PID/status`` only: no process
    is spawned.

    pidfile
        The master's pid file, e.g. ``/run/haproxy/haproxy.pid`` (the unit's
        ``PIDFILE``, which relayroute's drop-in sets).
    pid
        The master's pid instead.
    user
        The user HAProxy must run as (``relayroute:proxy:haproxy:user``).

    Returns ``{"running": bool, "master": {...} or None, "workers": [...],
    "problems": [...], "comment": "..."}``, each process with ``pid``,
    ``uid``, ``CapEff``, ``CapPrm``, ``CapAmb`` and ``CapBnd`` (names).

    CLI Example:

    .. code-block:: bash

        salt master-relay relayroute.haproxy_privileges pidfile=/run/haproxy/haproxy.pid
        salt master-relay relayroute.haproxy_privileges pid=1234 user=haproxy
    """
    if (pidfile is None) == (pid is None):
        raise SaltInvocationError("haproxy_privileges: give exactly one of pidfile and pid")
    where = f"pid {pid}"
    if pidfile is not None:
        where = f"pid file {pidfile}"
        try:
            with open(pidfile, encoding="utf-8") as fh:
                text = fh.read().strip()
        except FileNotFoundError:
            return {
                "running": False,
                "master": None,
                "workers": [],
                "problems": [],
                "comment": f"HAProxy is not running: no {where}",
            }
        except OSError as err:
            raise CommandExecutionError(f"cannot read HAProxy's {where}: {err}") from err
        if not text.split() or not text.split()[0].isdigit():
            raise CommandExecutionError(f"HAProxy's {where} holds no pid (got {text[:40]!r})")
        pid = int(text.split()[0])
    master = _read_status(int(pid))
    if master is None:
        return {
            "running": False,
            "master": None,
            "workers": [],
            "problems": [],
            "comment": f"HAProxy is not running: no process {pid} ({where})",
        }
    if master["name"] != "haproxy":
        raise CommandExecutionError(
            f"{where} names process {pid}, which is {master['name']!r}, not haproxy"
        )
    uid = None
    if user is not None:
        import pwd

        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError as err:
            raise CommandExecutionError(f"HAProxy's user {user!r} does not exist") from err
    workers = _children(master["pid"])
    judge = _privileges()
    found = judge.problems(master, workers, uid=uid, user=user)
    processes = "; ".join(judge.summary(status) for status in [master, *workers])
    return {
        "running": True,
        "master": master,
        "workers": workers,
        "problems": found,
        "comment": f"HAProxy ({where}): {processes}",
    }
