"""
Boot persistence through the distribution's own files, the way CentOS/RHEL 7
brings networking up (``persist:mechanism: network-scripts``):

- ``route-<dev>`` and ``rule-<dev>`` in ``/etc/sysconfig/network-scripts``
  (``route6-<dev>`` and ``rule6-<dev>`` for IPv6): when ``<dev>`` comes up,
  ``ifup-routes`` (network.service, or NetworkManager's dispatcher from
  ``NetworkManager-dispatcher-routing-rules``) runs ``ip -4 route add LINE``
  and ``ip -4 rule add LINE`` (``ip -6`` for the ``6`` files) for every line
  that is neither blank nor a comment. relayroute keeps its lines in one
  marked block per role; the administrator's lines stay byte for byte.
- ``/etc/sysconfig/iptables``: ``iptables.service`` (iptables-services)
  restores it at boot. relayroute keeps its chains and jumps in the file's
  ``*mangle`` table (see ``iptables.merge_saved``); every other line stays.
- ``/etc/sysctl.d/90-relayroute-<role>.conf``: systemd-sysctl applies it at
  boot, and its udev rule again for each interface that appears later.

Pure functions over text; the caller reads and writes the files.
"""

import dataclasses
import os

from . import family as families

BEGIN = "# BEGIN relayroute {role}: managed by Salt, edits here are overwritten"
END = "# END relayroute {role}"
# ifup-routes reads a route file in the ADDRESSn=/NETMASKn=/GATEWAYn= format
# when any line looks like this, and then ignores 'ip route' lines.
ADDRESS_FORMAT = "ADDRESS"
# What follows 'route'/'rule' in the name of a family's files: ifup-routes
# reads route-/rule-<dev> with 'ip -4' and route6-/rule6-<dev> with 'ip -6'.
FILE_SUFFIX = {families.IPV4.version: "", families.IPV6.version: "6"}


def route_name(dev, version=families.IPV4.version):
    """The route file's name for ``dev`` in a family: ``route-eth0``, ``route6-eth0``."""
    return f"route{FILE_SUFFIX[version]}-{dev}"


def rule_name(dev, version=families.IPV4.version):
    """The rule file's name for ``dev`` in a family: ``rule-eth0``, ``rule6-eth0``."""
    return f"rule{FILE_SUFFIX[version]}-{dev}"


def route_file(directory, dev, version=families.IPV4.version):
    return os.path.join(directory, route_name(dev, version))


def rule_file(directory, dev, version=families.IPV4.version):
    return os.path.join(directory, rule_name(dev, version))


def sysctl_file(directory, role):
    return os.path.join(directory, f"90-relayroute-{role}.conf")


def device_of(route, kernel):
    """
    The interface a table route leaves by: its ``dev``, or the one on its
    gateway's network (a network of the gateway's family).
    """
    if route.dev:
        return route.dev
    for net, ifname in kernel.network_interfaces:
        if families.contains(net, route.gateway):
            return ifname
    raise ValueError(
        f"no interface of this host is on the network of gateway {route.gateway} "
        f"(table {route.table}); its route cannot be kept in a route-<interface> file"
    )


def route_line(route, dev):
    """A route as ``ip -4/-6 route add`` takes it from a route file (``dev`` named)."""
    return dataclasses.replace(route, dev=dev).line()


def rule_line(rule, with_protocol):
    """
    A rule as ``ip -4/-6 rule add`` takes it from a rule file. CentOS 7
    (kernel 3.10, iproute 4.11) knows no rule protocol: the line has none there,
    and relayroute knows the rule as its own by its memory (engine.adopt_rules).
    """
    line = f"priority {rule.priority} fwmark {rule.fwmark:#x}/{rule.fwmask:#x} lookup {rule.table}"
    return f"{line} proto {rule.proto}" if with_protocol else line


def network_script_lines(plan, kernel):
    """
    ``{path suffix: [lines]}`` for ``plan``: each table route in the route file
    of its family and the interface it leaves by, each rule in the rule file
    of its family and the interface its table's route (of that family) leaves
    by (ifup adds them when that interface comes up). Keys are file names:
    ``route-<dev>``/``rule-<dev>``, ``route6-<dev>``/``rule6-<dev>``.
    """
    files = {}
    devices = {}
    for route in plan.routes:
        dev = device_of(route, kernel)
        devices.setdefault((route.family, route.table), dev)
        files.setdefault(route_name(dev, route.family), []).append(route_line(route, dev))
    for rule in plan.rules:
        dev = devices.get((rule.family, rule.table))
        if dev is None:
            raise ValueError(f"rule {rule.line()} looks up table {rule.table}, which has no route")
        files.setdefault(rule_name(dev, rule.family), []).append(
            rule_line(rule, kernel.rule_protocol)
        )
    return files


def uses_address_format(text):
    return any(
        line.strip().startswith(ADDRESS_FORMAT) and "=" in line for line in text.splitlines()
    )


def merge_block(text, role, lines):
    """
    ``text`` (None: no file) with the role's block replaced by ``lines`` (none:
    the block goes). Everything outside the block stays byte for byte; a file
    left with nothing but blank lines is removed (None).
    """
    begin, end = BEGIN.format(role=role), END.format(role=role)
    kept = []
    inside = False
    for raw in (text or "").splitlines(keepends=True):
        stripped = raw.rstrip("\n")
        if stripped == begin:
            inside = True
            continue
        if inside:
            inside = stripped != end
            continue
        kept.append(raw)
    out = "".join(kept)
    if lines:
        if out and not out.endswith("\n"):
            out += "\n"
        out += "\n".join([begin, *lines, end]) + "\n"
    if not out.strip():
        return None
    return out


def sysctl_text(plan):
    """The sysctl.d drop-in for the plan's kernel parameters (None: none)."""
    if not plan.sysctls:
        return None
    lines = [f"# relayroute {plan.owner.role}: managed by Salt, edits here are overwritten"]
    lines += [item.line() for item in plan.sysctls]
    return "\n".join(lines) + "\n"
