"""
iptables backend: renders a plan's chains as iptables rules, reads the mangle
table once with ``iptables-save``, and writes relayroute's chains in one
``iptables-restore --noflush`` transaction.

Only chains whose names start with the owner's prefix, and jumps to them from
the built-in chains, are ever written; every other line of the ruleset stays
as it is. Declaring a chain in a ``--noflush`` transaction flushes that chain
alone, so a changed chain is rewritten whole, atomically.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List

from . import family

NAME = "iptables"
TABLE = "mangle"
HOOKS = {"prerouting": "PREROUTING", "output": "OUTPUT"}
BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
SAVE = ("iptables-save", "-t", TABLE)
RESTORE = ("iptables-restore", "--noflush")
# iptables-legacy serialises its users (fail2ban, Docker, firewalld's direct
# rules, ...) with the xtables lock: without --wait a transaction fails at once
# while another holds it. Wait, bounded. iptables-nft accepts and ignores it;
# an iptables-restore too old to know it (before 1.6.2) is run without it.
XTABLES_WAIT = 30
WAIT = ("--wait", str(XTABLES_WAIT))


class BackendError(RuntimeError):
    """A packet-filter command failed; the message carries the command and its stderr."""


def _in_family(rule, version):
    """Whether an abstract rule belongs in ``version``'s table (iptables: 4, ip6tables: 6)."""
    kind = rule[0]
    if kind == "return_if_source":
        return family.of(rule[1]).version == version
    if kind == "return_if_neighbour_discovery":
        return version == 6
    return True


def render_rule(rule, chain_name):
    """One abstract rule as the rule specification iptables-save prints for it."""
    kind, args = rule[0], rule[1:]
    if kind == "restore_mark":
        (mask,) = args
        return f"-j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}"
    if kind == "save_mark":
        (mask,) = args
        return f"-j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}"
    if kind == "return_if_marked":
        (mask,) = args
        return f"-m mark ! --mark 0x0/{mask:#x} -j RETURN"
    if kind == "return_if_source":
        (net,) = args
        return f"-s {net} -j RETURN"
    if kind == "mark_from_mac":
        mac, mark, mask = args
        return f"-m mac --mac-source {mac} -j MARK --set-xmark {mark:#x}/{mask:#x}"
    if kind == "set_mark":
        mark, mask = args
        return f"-j MARK --set-xmark {mark:#x}/{mask:#x}"
    if kind == "accept":
        return "-j ACCEPT"
    if kind == "jump_transparent_socket":
        (target,) = args
        return f"-p tcp -m socket --transparent -j {chain_name(target)}"
    raise ValueError(f"iptables backend cannot render rule {rule!r}")


@dataclass
class Ruleset:
    """The mangle table as iptables-save shows it: every chain's rule specs, in order."""

    chains: Dict[str, List[str]] = field(default_factory=dict)

    def owned(self, prefix):
        return {name: rules for name, rules in self.chains.items() if name.startswith(prefix)}

    def jumps(self, prefix):
        """``(builtin chain, rule spec)`` of every built-in rule that jumps to an owned chain."""
        found = []
        for builtin in BUILTIN:
            for spec in self.chains.get(builtin, []):
                target = _target(spec)
                if target and target.startswith(prefix):
                    found.append((builtin, spec))
        return found


def _target(spec):
    words = spec.split()
    for flag in ("-j", "-g"):
        if flag in words:
            index = words.index(flag)
            if index + 1 < len(words):
                return words[index + 1]
    return None


def parse_save(text):
    """Parse ``iptables-save -t mangle`` output into a :class:`Ruleset`."""
    ruleset = Ruleset()
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_table = line[1:] == TABLE
            continue
        if not in_table or not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            ruleset.chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            ruleset.chains.setdefault(chain, []).append(spec)
    return ruleset


def marked_macs(ruleset, prefix):
    """
    ``{mark: [mac, ...]}``: the source MACs the owner's chains mark, and with
    which mark (relayroute's bits), as the kernel has them now.
    """
    found = {}
    for rules in ruleset.owned(prefix).values():
        for spec in rules:
            words = spec.split()
            if "--mac-source" not in words or "--set-xmark" not in words:
                continue
            mac = words[words.index("--mac-source") + 1].lower()
            mark = int(words[words.index("--set-xmark") + 1].split("/")[0], 16)
            found.setdefault(mark, set()).add(mac)
    return {mark: sorted(macs) for mark, macs in found.items()}


def desired(plan):
    """
    The owned chains and jumps a plan asks for:
    ``({chain name: [rule specs]}, [(builtin, jump spec)])``.
    """
    prefix = plan.owner.chain_prefix

    def chain_name(short):
        return prefix + short

    chains = {}
    jumps = []
    for chain in plan.chains:
        name = chain_name(chain.name)
        chains[name] = [
            render_rule(rule, chain_name) for rule in chain.rules if _in_family(rule, 4)
        ]
        if chain.hook:
            jumps.append((HOOKS[chain.hook], f"-j {name}"))
    return chains, jumps


def owned_lines(ruleset, prefix):
    """An owner's part of the ruleset as ``-A`` lines, jumps first, for diffs and reports."""
    lines = [f"-A {builtin} {spec}" for builtin, spec in ruleset.jumps(prefix)]
    for name in sorted(ruleset.owned(prefix)):
        lines.append(f"-N {name}")
        lines += [f"-A {name} {spec}" for spec in ruleset.chains[name]]
    return lines


def desired_lines(plan):
    chains, jumps = desired(plan)
    lines = [f"-A {builtin} {spec}" for builtin, spec in jumps]
    for name in sorted(chains):
        lines.append(f"-N {name}")
        lines += [f"-A {name} {spec}" for spec in chains[name]]
    return lines


def transaction(plan, ruleset):
    """
    The ``iptables-restore --noflush`` input that turns the owner's part of
    ``ruleset`` into what ``plan`` asks for, or None when they already match.
    Foreign chains and rules are never named in it.
    """
    want_chains, want_jumps = desired(plan)
    return transaction_to(want_chains, want_jumps, ruleset, plan.owner.chain_prefix)


def snapshot(ruleset, prefix):
    """The owner's chains and jumps in ``ruleset``, in the form :func:`transaction_to` takes."""
    return dict(ruleset.owned(prefix)), list(ruleset.jumps(prefix))


def transaction_to(want_chains, want_jumps, ruleset, prefix):
    """The transaction from the owner's part of ``ruleset`` to the wanted chains and jumps."""
    have_chains = ruleset.owned(prefix)
    have_jumps = ruleset.jumps(prefix)

    body = []
    # Changed or new chains: declaring flushes them; then their rules, whole.
    for name in sorted(want_chains):
        if have_chains.get(name) != want_chains[name]:
            body.append(f":{name} - [0:0]")
            body += [f"-A {name} {spec}" for spec in want_chains[name]]
    # Jumps: exactly one of each wanted jump, at the top of its built-in chain
    # when missing; any other jump to an owned chain goes.
    seen = set()
    for builtin, spec in have_jumps:
        if (builtin, spec) in want_jumps and (builtin, spec) not in seen:
            seen.add((builtin, spec))
            continue
        body.append(f"-D {builtin} {spec}")
    for builtin, spec in want_jumps:
        if (builtin, spec) not in seen:
            body.append(f"-I {builtin} 1 {spec}")
    # Stale chains: flush, then delete (their jumps went above).
    stale = sorted(set(have_chains) - set(want_chains))
    for name in stale:
        body.append(f":{name} - [0:0]")
    for name in stale:
        body.append(f"-X {name}")
    if not body:
        return None
    return "\n".join([f"*{TABLE}", *body, "COMMIT", ""])


def restore_commands(plan):
    """
    Shell lines that put the plan's chains in place at boot: one transaction
    for the chains, then each jump unless it is already there.
    """
    chains, jumps = desired(plan)
    if not chains:
        return []
    lines = [
        # The xtables lock (iptables-legacy), waited for where the tools know --wait.
        f"w=; iptables-restore --help 2>&1 | grep -q -- --wait && w='--wait {XTABLES_WAIT}'",
        "iptables-restore --noflush $w <<'RULES'",
        f"*{TABLE}",
    ]
    for name in sorted(chains):
        lines.append(f":{name} - [0:0]")
        lines += [f"-A {name} {spec}" for spec in chains[name]]
    lines += ["COMMIT", "RULES"]
    for builtin, spec in jumps:
        lines.append(
            f"iptables $w -t {TABLE} -C {builtin} {spec} 2>/dev/null || "
            f"iptables $w -t {TABLE} -I {builtin} 1 {spec}"
        )
    return lines


BUILTIN_POLICIES = [f":{name} ACCEPT [0:0]" for name in BUILTIN]
SAVED_FILE_NOTE = "# relayroute {role}: the {prefix}* chains and jumps to them are managed by Salt"


def _owned_saved_line(line, prefix, note):
    """Whether a line of a saved ruleset's mangle table is the owner's."""
    words = line.split()
    if words and words[0].startswith("[") and words[0].endswith("]"):
        words = words[1:]  # iptables-save -c counters
    if not words:
        return False
    if line.strip() == note:
        return True
    if words[0].startswith(":"):
        return words[0][1:].startswith(prefix)
    if words[0] == "-A" and len(words) > 1:
        if words[1].startswith(prefix):
            return True
        target = _target(" ".join(words[2:]))
        return bool(target and target.startswith(prefix))
    return False


def merge_saved(text, plan):
    """
    A saved ruleset file (``/etc/sysconfig/iptables``, which iptables.service
    restores whole at boot) with the owner's chains and jumps replaced by the
    plan's. Every other line stays byte for byte; the owner's lines go right
    after the mangle table's chain declarations, so its jumps come first in
    their built-in chains, as ``-I ... 1`` puts them at runtime. A file without
    a mangle table gets one. ``text`` None (no file) stays None.
    """
    if text is None:
        return None
    prefix = plan.owner.chain_prefix
    note = SAVED_FILE_NOTE.format(role=plan.owner.role, prefix=prefix)
    chains, jumps = desired(plan)
    ours = []
    if chains:
        ours.append(note)
        ours += [f":{name} - [0:0]" for name in sorted(chains)]
        ours += [f"-A {builtin} {spec}" for builtin, spec in jumps]
        for name in sorted(chains):
            ours += [f"-A {name} {spec}" for spec in chains[name]]
    lines = text.splitlines(keepends=True)
    out = []
    in_table = found = False
    insert_at = None
    for raw in lines:
        line = raw.strip()
        if line.startswith("*"):
            in_table = line[1:] == TABLE
            found = found or in_table
            out.append(raw)
            if in_table:
                insert_at = len(out)
            continue
        if in_table:
            if line == "COMMIT":
                in_table = False
            elif _owned_saved_line(line, prefix, note):
                continue
            elif line.startswith(":"):
                insert_at = len(out) + 1
        out.append(raw)
    if ours:
        block = [line + "\n" for line in ours]
        if found:
            out[insert_at:insert_at] = block
        else:
            if out and not out[-1].endswith("\n"):
                out[-1] += "\n"
            out += [f"*{TABLE}\n", *[p + "\n" for p in BUILTIN_POLICIES], *block, "COMMIT\n"]
    return "".join(out)


def _env():
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def available():
    """Whether this host has iptables' tools (a host with nft alone has none)."""
    return all(shutil.which(tool) for tool in (SAVE[0], RESTORE[0]))


def read():
    """Read the mangle table once (one ``iptables-save`` process)."""
    try:
        proc = subprocess.run(
            SAVE, capture_output=True, text=True, check=False, env=_env(), timeout=60
        )
    except OSError as err:
        raise BackendError(f"{' '.join(SAVE)}: {err}") from err
    if proc.returncode != 0:
        raise BackendError(f"{' '.join(SAVE)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_save(proc.stdout)


def _restore(argv, payload):
    try:
        return subprocess.run(
            argv,
            input=payload,
            capture_output=True,
            text=True,
            check=False,
            env=_env(),
            timeout=XTABLES_WAIT + 60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"{' '.join(argv)}: {err}") from err


def apply(payload):
    """
    Write one transaction (one ``iptables-restore --noflush --wait`` process);
    all or nothing. Waits up to XTABLES_WAIT seconds for the xtables lock.
    """
    argv = (*RESTORE, *WAIT)
    proc = _restore(argv, payload)
    if proc.returncode != 0 and _no_wait_option(proc.stderr):
        argv = RESTORE
        proc = _restore(argv, payload)
    if proc.returncode != 0:
        raise BackendError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
            f"transaction was:\n{payload}"
        )


def _no_wait_option(stderr):
    """Whether iptables-restore refused --wait itself (an iptables before 1.6.2)."""
    text = stderr.lower()
    return "wait" in text and any(
        word in text for word in ("unrecognized option", "invalid option", "unknown option")
    )
