"""
What relayroute applied, kept on disk so the host restores it at boot without
Salt, and what it must remember to undo exactly (values of kernel parameters
before relayroute set them, rules added on kernels without rule protocols,
the boot files it wrote).

Two mechanisms (``persist:mechanism``):

- ``unit`` (Debian, RHEL/Alma 8-9): ``<dir>/<role>.restore``, a POSIX shell
  script generated from the plan that puts the role's kernel parameters,
  routes, rules and chains back in place; the ``relayroute-<role>.service``
  systemd unit runs it at boot, and the watcher's unit when the kernel loses
  part of it. With ``Target.units`` (the formula's states) the units, their
  ``.wants`` symlinks and the watcher script are boot files too (:mod:`units`).
- ``network-scripts`` (CentOS/RHEL 7): the distribution's own files, see
  :mod:`bootfiles`: route-/rule-<dev> blocks (route6-/rule6-<dev> for
  IPv6), the mangle part of ``/etc/sysconfig/iptables`` (and of
  ``/etc/sysconfig/ip6tables`` when the chains work in IPv6 too) and a
  sysctl.d drop-in.

Either way ``<dir>/<role>.json`` holds the memory. Files of the mechanism not
in use are cleaned, so switching mechanisms leaves nothing behind.
``restore_script``, ``boot_files`` and ``merged`` are pure.
"""

import glob
import json
import os
import tempfile
from dataclasses import dataclass

from . import bootfiles, planner, units
from . import family as families

UNIT = "unit"
NETWORK_SCRIPTS = "network-scripts"
MECHANISMS = (UNIT, NETWORK_SCRIPTS)
# How a boot file is written: whole (relayroute's own file), a marked block in
# a shared file, or relayroute's chains in a saved ruleset.
WHOLE, BLOCK, RULESET = "whole", "block", "ruleset"
# The saved ruleset of each family: iptables.service's file, ip6tables.service's.
RULESET6 = "ruleset6"
RULESETS = {RULESET: families.IPV4.version, RULESET6: families.IPV6.version}
# Files relayroute writes whole: its own, the units and the watcher, and the
# units' symlinks (whose "text" is where they point).
WHOLE_KINDS = (WHOLE, units.UNIT, units.SCRIPT, units.LINK)


@dataclass(frozen=True)
class Target:
    """Where and how a role's state is kept for boot (``persist`` settings)."""

    dir: str
    mechanism: str = UNIT
    network_scripts_dir: str = "/etc/sysconfig/network-scripts"
    iptables_file: str = "/etc/sysconfig/iptables"
    sysctl_dir: str = "/etc/sysctl.d"
    systemd_dir: str = "/etc/systemd/system"
    # ip6tables.service's file; by default ``ip6tables`` beside ``iptables_file``.
    ip6tables_file: str = ""
    wanted_by: str = "multi-user.target"
    # Whether the role's systemd units are relayroute's to keep (the states
    # pass the watcher's settings): written with the unit mechanism, removed
    # otherwise. Without it units are left as they are, but those relayroute
    # wrote go with the role (an empty plan).
    units: bool = False
    # The watcher (relayroute:watch): whether it runs, its debounce and shell.
    watch: bool = True
    watch_debounce: float = 0.2
    watch_shell: str = "/bin/bash"

    def saved_file(self, kind):
        """The saved ruleset file of a ruleset kind (its family's)."""
        if kind != RULESET6:
            return self.iptables_file
        return self.ip6tables_file or os.path.join(os.path.dirname(self.iptables_file), "ip6tables")


# Where the formula keeps each role's boot files and memory (parameters/defaults.yaml).
DEFAULT_DIR = "/etc/relayroute"
# relayroute's host lock: engine.LOCK_PATH, which every apply holds (flock(2))
# from its read to its last write; RELAYROUTE_LOCK overrides it for both.
DEFAULT_LOCK = "/run/relayroute/lock"
# How long a restore waits for an apply in progress (the engine's own wait).
LOCK_WAIT = 120

HEADER = """\
#!/bin/sh
# relayroute: restores the {role} role's routing at boot, without Salt.
# Generated from the last successful apply; the next apply rewrites it.
# Run by relayroute-{role}.service at boot and by relayroute-{role}-watch.service
# when the kernel lost part of it; idempotent: what is in place stays untouched.
set -eu
# Under relayroute's host lock, the one every apply holds: never halfway through
# an apply. Once the lock is held the script is read again from its path, so a
# restore that waited for an apply runs what that apply wrote (or nothing, when
# it removed the role).
if [ "${{RELAYROUTE_LOCKED:-}}" != "$0" ]; then
    lock=${{RELAYROUTE_LOCK:-{lock}}}
    mkdir -p "${{lock%/*}}"
    RELAYROUTE_LOCKED=$0 exec flock -w {wait} "$lock" \\
        /bin/sh -c 'if [ -e "$0" ]; then exec /bin/sh "$0"; fi' "$0"
fi
"""


def paths(directory, role):
    """The restore script's and the memory file's paths."""
    return os.path.join(directory, f"{role}.restore"), os.path.join(directory, f"{role}.json")


def restore_script(plan, filter_backend):
    """The boot-time restore script for ``plan`` (None when the plan is empty)."""
    if not (plan.routes or plan.rules or plan.chains or plan.sysctls):
        return None
    lines = [HEADER.format(role=plan.owner.role, lock=DEFAULT_LOCK, wait=LOCK_WAIT)]
    lines.append("# Kernel parameters")
    lines += [f"sysctl -qw {item.key}={item.value}" for item in plan.sysctls]
    lines.append("# Policy tables first, then the rules that use them (each in its family)")
    lines += [f"ip {_flag(route)} route replace {route.line()}" for route in plan.routes]
    # A rule in place is left alone (a repair on a live host must not take away,
    # even for an instant, the rule its replies use); a missing one is added.
    for rule in plan.rules:
        spec = bootfiles.rule_line(rule, with_protocol=True)
        flag = _flag(rule)
        lines.append(f"ip {flag} rule show {spec} | grep -q . || ip {flag} rule add {spec}")
    lines.append("# The packet filter last: marking starts once routes and rules exist")
    lines += filter_backend.restore_commands(plan)
    return "\n".join(lines) + "\n"


def _flag(item):
    """ip(8)'s family switch for a route or rule: ``-4`` or ``-6``."""
    return families.BY_VERSION[item.family].ip_flag


def load(directory, role):
    """The remembered previous values: ``{"sysctls_before": {key: value}}``."""
    if not directory:
        return {}
    _script, state = paths(directory, role)
    try:
        with open(state) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


def _write(path, text, mode):
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".relayroute-")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def boot_files(plan, target, kernel, filter_backend):
    """
    ``{path: (kind, ours)}``: what ``target``'s mechanism keeps for ``plan``;
    ``ours`` is the whole text, the block's lines or the plan, and None where
    relayroute's part must go (the other mechanism's files, an empty plan).
    """
    role = plan.owner.role
    script_path, _memory = paths(target.dir, role)
    sysctl_path = bootfiles.sysctl_file(target.sysctl_dir, role)
    if target.mechanism == UNIT:
        script = restore_script(plan, filter_backend)
        files = {script_path: (WHOLE, script)}
        if target.units:
            files.update(units.files(role, script_path, script is not None, target, _watcher))
        return files
    files = {
        script_path: (WHOLE, None),
        sysctl_path: (WHOLE, bootfiles.sysctl_text(plan)),
    }
    # Each family's saved ruleset: IPv6's only when the chains work in IPv6.
    for kind, version in RULESETS.items():
        wanted = plan.chains and version in plan.families
        files[target.saved_file(kind)] = (kind, plan if wanted else None)
    for name, lines in bootfiles.network_script_lines(plan, kernel).items():
        files[os.path.join(target.network_scripts_dir, name)] = (BLOCK, lines)
    if target.units:
        files.update(units.files(role, script_path, False, target, _watcher))
    return files


def _watcher():
    # Imported on first use: a no-op whose watcher is in place compares its text once.
    from . import watcher

    return watcher.SCRIPT


def merged(kind, text, ours, plan, filter_backend):
    """The new content of a boot file (None: no file) from its ``text`` now."""
    if kind in WHOLE_KINDS:
        return ours
    if kind == BLOCK:
        return bootfiles.merge_block(text, plan.owner.role, ours)
    if kind in RULESETS:
        return filter_backend.merge_saved(
            text,
            plan if ours is not None else planner.empty_plan(plan.owner),
            version=RULESETS[kind],
        )
    raise ValueError(f"unknown boot file kind {kind!r}")


def read_text(path, kind=WHOLE):
    """A boot file's text now (a symlink's: where it points); None when absent."""
    try:
        if kind == units.LINK:
            return os.readlink(path)
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError:
        if kind == units.LINK and os.path.lexists(path):
            return ""  # not a symlink: replaced by one
        raise


def _enabled(systemd_dir, unit):
    return bool(glob.glob(os.path.join(glob.escape(systemd_dir), "*.wants", unit)))


def check_host(plan, target, files, key):
    """
    Problems that would keep the boot from restoring ``plan`` with the
    network-scripts mechanism, each naming ``key`` (the pillar's mechanism key).
    ``files``: every boot file as ``{path: (kind, old text, new text)}``.
    """
    if target.mechanism != NETWORK_SCRIPTS or not (plan.routes or plan.rules or plan.chains):
        return []
    problems = []
    for path, (kind, old, new) in files.items():
        route_file = kind == BLOCK and os.path.basename(path).startswith("route-")
        if route_file and old and new != old and bootfiles.uses_address_format(old):
            problems.append(
                f"{key}: {path} is in the ADDRESSn= format, in which ifup-routes ignores "
                "'ip route' lines; convert it to 'ip route' lines, or use mechanism "
                f"'unit' (got {NETWORK_SCRIPTS!r})"
            )
    if plan.chains:
        if files[target.iptables_file][1] is None:
            problems.append(
                f"{key}: {target.iptables_file} does not exist, so nothing restores the "
                "packet filter at boot; install iptables-services, run 'service iptables "
                "save' and enable iptables.service, or use mechanism 'unit' "
                f"(got {NETWORK_SCRIPTS!r})"
            )
        elif not _enabled(target.systemd_dir, "iptables.service"):
            problems.append(
                f"{key}: iptables.service is not enabled in {target.systemd_dir}, so "
                f"{target.iptables_file} is not restored at boot; enable it, or use "
                f"mechanism 'unit' (got {NETWORK_SCRIPTS!r})"
            )
        # Only the iptables backend's chains get here (the nftables backend
        # refuses this mechanism in merge_saved). firewalld 1.3, whatever its
        # FirewallBackend, flushes iptables' tables (-F -X -Z) on every start
        # and reload; relayroute's nftables table it never touches, so with
        # firewalld the way is nftables and the unit (tests/functional/test_firewalld.py).
        if _enabled(target.systemd_dir, "firewalld.service"):
            problems.append(
                f"{key}: firewalld.service is enabled; it flushes iptables' tables, the "
                "mangle table and relayroute's chains in it, on every start and reload; "
                "use iptables-services instead (where relayroute's nftables backend runs, "
                "RHEL 8+: backend 'nftables' with mechanism 'unit', whose table firewalld "
                f"leaves alone) (got {NETWORK_SCRIPTS!r})"
            )
    if plan.chains and families.IPV6.version in plan.families:
        problems += _ip6tables_problems(target, files, key)
    return problems


def check_backend(plan, target, backend, key):
    """
    Problems of the packet-filter backend with what the host runs at boot,
    each naming ``key`` (the pillar's backend key). With the unit mechanism
    (network-scripts has its own check above): firewalld flushes iptables'
    tables on every start and reload, relayroute's chains with them, so the
    proxied path would break at the first ``firewall-cmd --reload``.
    """
    if target.mechanism == NETWORK_SCRIPTS or not plan.chains or backend != "iptables":
        return []
    if not _enabled(target.systemd_dir, "firewalld.service"):
        return []
    return [
        f"{key}: firewalld.service is enabled; it flushes iptables' tables, relayroute's "
        "chains in the mangle table with them, on every start and reload, and the proxied "
        "path breaks until the next apply; use backend 'nftables', whose table firewalld "
        "leaves alone (got 'iptables')"
    ]


def _ip6tables_problems(target, files, key):
    """The IPv6 chains' boot path: ip6tables.service restoring its saved file."""
    path = target.saved_file(RULESET6)
    if files[path][1] is None:
        return [
            f"{key}: {path} does not exist, so nothing restores the IPv6 packet filter at "
            "boot; install iptables-services, run 'service ip6tables save' and enable "
            f"ip6tables.service, or use mechanism 'unit' (got {NETWORK_SCRIPTS!r})"
        ]
    if not _enabled(target.systemd_dir, "ip6tables.service"):
        return [
            f"{key}: ip6tables.service is not enabled in {target.systemd_dir}, so {path} "
            f"is not restored at boot; enable it, or use mechanism 'unit' "
            f"(got {NETWORK_SCRIPTS!r})"
        ]
    return []


def write_files(contents, kinds=None):
    """
    Write each ``{path: text}`` atomically; None removes the file. ``kinds``
    (``{path: kind}``) names the symlinks (``units.LINK``: the text is where
    the link points) and the watcher script (mode 0755, as the restore script).
    """
    kinds = kinds or {}
    for path, text in sorted(contents.items()):
        kind = kinds.get(path, WHOLE)
        if text is None:
            if os.path.lexists(path):
                os.unlink(path)
        elif kind == units.LINK:
            _link(path, text)
        else:
            executable = path.endswith(".restore") or kind == units.SCRIPT
            mode = 0o755 if executable else 0o644
            if os.path.exists(path):
                mode = os.stat(path).st_mode & 0o7777
            _write(path, text, mode)


def _link(path, target):
    """``path`` a symlink to ``target``, atomically (as ``systemctl enable`` makes one)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".relayroute-{os.getpid()}-{os.path.basename(path)}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_memory(directory, role, memory):
    """Write (or, when empty, remove) the role's memory file."""
    _script, state_path = paths(directory, role)
    if memory:
        _write(state_path, json.dumps(memory, indent=1, sort_keys=True) + "\n", 0o600)
    elif os.path.exists(state_path):
        os.unlink(state_path)
