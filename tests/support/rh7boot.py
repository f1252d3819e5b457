"""
What a CentOS/RHEL 7 host runs at boot from its own files, for hosts whose
relayroute persistence uses the ``network-scripts`` mechanism. No CentOS 7
userland runs here, so each step is the documented behaviour of the unit that
does it, run with this machine's ``iptables-restore``, ``sysctl`` and ``ip``:

1. ``iptables.service`` (iptables-services, ``iptables.init start``):
   ``iptables-restore /etc/sysconfig/iptables``, which replaces every table the
   file names.
2. ``systemd-sysctl.service``: ``sysctl -p`` of each ``/etc/sysctl.d/*.conf``.
3. ``network.service``: ``ifup`` of lo, then of each interface; ``ifup-post``
   runs ``ifup-routes DEV``, which passes every line of ``route-DEV`` that is
   neither blank nor a comment to ``ip -4 route add`` (unless the file uses the
   ADDRESSn= format) and every such line of ``rule-DEV`` to ``ip -4 rule add``.
   NetworkManager's ifcfg-rh dispatcher (NetworkManager-dispatcher-routing-rules)
   does the same for interfaces it manages.
"""

import re
from pathlib import Path

# ifup-routes' test for lines it skips: MATCH='^[[:space:]]*(\#.*)?$'
SKIPPED = re.compile(r"^\s*(#.*)?$")


def ifup_routes_commands(network_scripts, dev):
    """The ``ip`` commands ifup-routes runs for ``dev``."""
    commands = []
    for kind in ("route", "rule"):
        path = Path(network_scripts) / f"{kind}-{dev}"
        if not path.exists():
            continue
        text = path.read_text()
        if kind == "route" and re.search(r"^\s*ADDRESS[0-9]+=", text, re.M):
            continue  # the other format; relayroute refuses to write into it
        for line in text.splitlines():
            if not SKIPPED.match(line):
                commands.append(["ip", "-4", kind, "add", *line.split()])
    return commands


def boot(ns, settings, interfaces):
    """
    Run in ``ns`` what the boot runs, from the files ``settings`` (the
    ``persist`` settings) point at. Returns the commands, for reports.
    """
    commands = []
    iptables_file = Path(settings["iptables_file"])
    if iptables_file.exists():
        commands.append((["iptables-restore"], iptables_file.read_text()))
    for conf in sorted(Path(settings["sysctl_dir"]).glob("*.conf")):
        commands.append((["sysctl", "-q", "-p", str(conf)], None))
    for dev in ["lo", *interfaces]:
        commands += [(command, None) for command in ifup_routes_commands(
            settings["network_scripts_dir"], dev)]  # fmt: skip
    for command, stdin in commands:
        ns.exec(command, input=stdin)
    return [" ".join(command) for command, _stdin in commands]
