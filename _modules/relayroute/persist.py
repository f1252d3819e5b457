"""
What relayroute applied, kept on disk so the host restores it at boot without
Salt, and what it must remember to undo exactly (values of kernel parameters
before relayroute set them).

For each role, in the persist directory (``/etc/relayroute`` by default):

- ``<role>.restore``: a POSIX shell script, generated from the plan, that puts
  the role's routes, rules, kernel parameters and chains back in place. It is
  idempotent; the ``relayroute-<role>.service`` systemd unit runs it at boot.
- ``<role>.json``: the kernel parameters' values before relayroute changed them.

``restore_script`` is pure; ``load``/``save`` touch only those files.
"""

import json
import os
import tempfile

HEADER = """\
#!/bin/sh
# relayroute: restores the {role} role's routing at boot, without Salt.
# Generated from the last successful apply; the next apply rewrites it.
set -eu
"""


def paths(directory, role):
    return os.path.join(directory, f"{role}.restore"), os.path.join(directory, f"{role}.json")


def restore_script(plan, filter_backend):
    """The boot-time restore script for ``plan`` (None when the plan is empty)."""
    if not (plan.routes or plan.rules or plan.chains or plan.sysctls):
        return None
    lines = [HEADER.format(role=plan.owner.role)]
    lines.append("# Kernel parameters")
    lines += [f"sysctl -qw {item.key}={item.value}" for item in plan.sysctls]
    lines.append("# Policy tables first, then the rules that use them")
    lines += [f"ip -4 route replace {route.line()}" for route in plan.routes]
    for rule in plan.rules:
        spec = (
            f"priority {rule.priority} fwmark {rule.fwmark:#x}/{rule.fwmask:#x} "
            f"lookup {rule.table} proto {rule.proto}"
        )
        lines.append(f"ip -4 rule del {spec} 2>/dev/null || true")
        lines.append(f"ip -4 rule add {spec}")
    lines.append("# The packet filter last: marking starts once routes and rules exist")
    lines += filter_backend.restore_commands(plan)
    return "\n".join(lines) + "\n"


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


def read_script(directory, role):
    script, _state = paths(directory, role)
    try:
        with open(script) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


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


def save(directory, role, script, memory):
    """Write (or, for None/empty, remove) the restore script and the memory file."""
    script_path, state_path = paths(directory, role)
    remembered = json.dumps(memory, indent=1, sort_keys=True) + "\n" if memory else None
    for path, content, mode in ((script_path, script, 0o755), (state_path, remembered, 0o600)):
        if content is None:
            if os.path.exists(path):
                os.unlink(path)
        else:
            _write(path, content, mode)
