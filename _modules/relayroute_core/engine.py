"""
The engine: read the kernel, diff it against a plan, apply the difference,
verify, and roll back when anything fails.

    plan (pure) -> read (one ruleset read + netlink dumps) -> diff (pure)
        -> apply (netlink calls + one packet-filter transaction) -> verify

Order of application keeps traffic safe at every step: table routes first,
then ip rules, then the packet-filter transaction that starts marking, and only
then the removal of rules and routes nothing marks for any more. Removal runs
the other way round.
"""

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

from . import family as families
from . import iptables, netlink, nftables, persist, planner, sysctl, units
from .model import InputError

log = logging.getLogger(__name__)

# Packet-filter backends: modules with the same small interface, so a native
# nftables backend is one more module here and nothing else changes.
#   NAME                          name used in changes and by the ``backend`` option
#   read()                        the ruleset now (one process at most)
#   apply(payload)                write one transaction, all or nothing
#   transaction(plan, ruleset)    payload turning the owner's part into the plan, or None
#   snapshot(ruleset, prefix) / transaction_to(chains, jumps, ruleset, prefix)
#                                 the owner's part now, and the payload back to it (rollback)
#   owned_lines(ruleset, prefix) / desired_lines(plan)   what operators read in changes
#   restore_commands(plan)        shell lines for the boot-time restore script
#   available()                   whether this host has what the backend runs (tools, library)
BACKENDS = {iptables.NAME: iptables, nftables.NAME: nftables}


# One lock for everything that changes relayroute's kernel state on a host: an
# apply (Salt), and the boot/repair restore (its script takes the same lock).
# flock(2): released by the kernel when the holder dies, never left stale.
LOCK_PATH = os.environ.get("RELAYROUTE_LOCK", "/run/relayroute/lock")


@contextlib.contextmanager
def locked(path=None, timeout=120.0):
    """
    Hold relayroute's host lock (``path``, default :data:`LOCK_PATH`) while
    the body runs; wait up to ``timeout`` seconds for another holder. Yields
    whether it had to wait (another holder may have changed the kernel).
    """
    path = path or LOCK_PATH
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    deadline = time.monotonic() + timeout
    waited = False
    with open(path, "a", encoding="utf-8") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"another relayroute apply or restore has held {path} for "
                        f"{timeout:.0f} s; nothing was changed"
                    ) from err
                waited = True
                time.sleep(0.05)
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ApplyError(RuntimeError):
    """Applying failed; the host was rolled back to how it was (``rolled_back``)."""

    def __init__(self, message, rolled_back=True):
        self.rolled_back = rolled_back
        super().__init__(message)


@dataclass
class Current:
    """What a converge starts from: kernel, backend ruleset, kernel parameters, memory."""

    kernel: netlink.KernelState
    ruleset: object  # the backend's ruleset
    sysctls: dict = field(default_factory=dict)  # values of the keys that matter now
    memory: dict = field(default_factory=dict)  # persisted: values before relayroute


@dataclass
class Diff:
    """What has to change, split in the order it is applied."""

    before: List[tuple] = field(default_factory=list)  # route_replace, rule_add
    after: List[tuple] = field(default_factory=list)  # rule_del, route_del
    transaction: Optional[str] = None
    changes: dict = field(default_factory=dict)

    def __bool__(self):
        return bool(self.before or self.after or self.transaction)


def backend(name=iptables.NAME):
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError([f"backend: unknown packet-filter backend (got {name!r})"]) from None


def read(filter_backend, kernel=None, sysctl_keys=(), memory=None, part=None):
    """
    The kernel now: one ruleset read, netlink dumps (reused when given), the
    kernel parameters that matter (the plan's and those relayroute set before,
    read from /proc/sys), and what relayroute remembered on disk.
    ``part``: an owner's chain prefix: the packet filter's read may hold that
    owner's part alone (``read_part``: what a verification compares, at a
    cost that does not grow with other tools' rules).
    """
    memory = memory or {}
    keys = set(sysctl_keys) | set(memory.get("sysctls_before", {}))
    ruleset = filter_backend.read_part(part) if part else filter_backend.read()
    return Current(kernel or netlink.read(), ruleset, sysctl.read(keys), memory)


def _rule_key(rule):
    return (rule.family, rule.priority, rule.fwmark, rule.fwmask, rule.table)


def _remembered_key(key):
    """A rule key from the memory: ``(family, priority, mark, mask, table)``; older
    memories (IPv4 only) have no family."""
    key = tuple(key)
    return key if len(key) == 5 else (families.IPV4.version, *key)


def adopt_rules(kernel, plan, memory):
    """
    On kernels that keep no protocol on ip rules (before 4.17, CentOS 7), a
    rule cannot say it is relayroute's. There the rules relayroute remembers
    adding (``memory["rules"]``, kept with the restore script) and rules
    exactly as the plan asks are taken as the owner's; everything else stays
    another tool's. Elsewhere the kernel's own record is used as it is.
    """
    if kernel.rule_protocol:
        return kernel
    known = {_remembered_key(key) for key in memory.get("rules", [])}
    known |= {_rule_key(rule) for rule in plan.rules}
    rules = tuple(
        dataclasses.replace(rule, proto=plan.owner.proto)
        if rule.proto == 0 and not rule.selectors and _rule_key(rule) in known
        else rule
        for rule in kernel.rules
    )
    return dataclasses.replace(kernel, rules=rules)


def owned_rules(kernel, owner):
    return [rule for rule in kernel.rules if rule.proto == owner.proto]


def owned_routes(kernel, owner):
    return [route for route in kernel.routes if route.proto == owner.proto]


def _route_matches(planned, current):
    return (
        planned.key == current.key
        and planned.gateway == current.gateway
        and (planned.dev is None or planned.dev == current.dev)
    )


def conflicts(plan, kernel, prefix=""):
    """
    Host-dependent checks of a plan: a priority taken by another tool's rule of
    the same family (the kernel keeps each family's rules apart), a table
    holding another tool's routes. Messages name the input key and value.
    """
    errors = []
    owner = plan.owner

    def path(origin):
        return f"{prefix}:{origin}" if prefix else origin

    for rule in plan.rules:
        for other in kernel.rules:
            same = (other.family, other.priority) == (rule.family, rule.priority)
            if same and other.proto != owner.proto:
                errors.append(
                    f"{path(rule.origin)}: priority {rule.priority} is already used by "
                    f"another tool's rule '{other.line()}' (got {rule.priority!r})"
                )
                break
    for route in plan.routes:
        foreign = [r for r in kernel.routes if r.table == route.table and r.proto != owner.proto]
        if foreign:
            errors.append(
                f"{path(route.origin)}: table {route.table} already holds another tool's "
                f"route '{foreign[0].line()}' (got {route.table!r})"
            )
    return errors


def diff(plan, current, filter_backend, scope=None):
    """
    Pure: the operations and transaction that turn ``current`` into ``plan``.

    Without ``scope`` everything the owner has is compared (stale items are
    removed). With ``scope = (route keys, {(family, rule priority)})`` only
    owned items with those keys are considered and the packet filter is left alone: that
    is how a single policy route is managed beside others of its kind.
    """
    owner = plan.owner
    result = Diff()
    have_routes = owned_routes(current.kernel, owner)
    have_rules = owned_rules(current.kernel, owner)
    if scope is not None:
        route_keys, priorities = scope
        have_routes = [route for route in have_routes if route.key in route_keys]
        have_rules = [rule for rule in have_rules if (rule.family, rule.priority) in priorities]

    for route in plan.routes:
        if not any(_route_matches(route, have) for have in have_routes):
            result.before.append(("route_replace", route))
    planned_keys = {route.key for route in plan.routes}
    stale_routes = [have for have in have_routes if have.key not in planned_keys]

    have_plain = {rule.as_rule().ident for rule in have_rules if not rule.selectors}
    planned_rules = {rule.ident for rule in plan.rules}
    for rule in plan.rules:
        if rule.ident not in have_plain:
            result.before.append(("rule_add", rule))
    # Removal runs the other way round: a stale rule goes before the routes of
    # its table, so no packet is ever looked up in a table being emptied.
    for have in have_rules:
        if have.selectors or have.as_rule().ident not in planned_rules:
            result.after.append(("rule_del", have.as_rule()))
    result.after += [("route_del", have) for have in stale_routes]

    _sysctl_diff(plan, current, result)

    if scope is None:
        result.transaction = filter_backend.transaction(plan, current.ruleset)
        moves = connmark_moves(plan, have_routes, have_rules)
        result.after[:0] = [("connmark_move", move) for move in moves]
        if moves:
            result.changes["connmarks"] = [
                f"{old:#x}/{old_mask:#x} -> {new:#x}/{new_mask:#x}"
                for old, old_mask, new, new_mask in moves
            ]

    old_routes = sorted(route.line() for route in have_routes)
    new_routes = sorted(route.line() for route in plan.routes)
    if [op for op in result.before + result.after if op[0].startswith("route")]:
        result.changes["routes"] = {"old": old_routes, "new": new_routes}
    if [op for op in result.before + result.after if op[0].startswith("rule")]:
        result.changes["rules"] = {
            "old": [rule.line() for rule in sorted(have_rules, key=_rule_order)],
            "new": [rule.line() for rule in plan.rules],
        }
    if result.transaction:
        result.changes[filter_backend.NAME] = {
            "old": filter_backend.owned_lines(current.ruleset, owner.chain_prefix),
            "new": filter_backend.desired_lines(plan),
        }
    return result


def _rule_order(rule):
    return (rule.family, rule.priority)


def _sysctl_diff(plan, current, result):
    """
    Kernel parameters: set the plan's (before anything else: routes and rules
    rely on them); put back the earlier value of those relayroute set before
    and the plan no longer needs (after everything else).
    """
    before = current.memory.get("sysctls_before", {})
    wanted = {item.key: item.value for item in plan.sysctls}
    old_lines, new_lines = [], []
    for key, value in wanted.items():
        now = current.sysctls.get(key)
        if now is None:
            raise InputError([f"{key}: this kernel has no such parameter (got {value!r})"])
        if now != value:
            result.before.insert(0, ("sysctl_set", (key, value, now)))
            old_lines.append(f"{key} = {now}")
            new_lines.append(f"{key} = {value}")
    for key, value in sorted(before.items()):
        now = current.sysctls.get(key)
        if key not in wanted and now is not None and now != value:
            result.after.append(("sysctl_set", (key, value, now)))
            old_lines.append(f"{key} = {now}")
            new_lines.append(f"{key} = {value}")
    if old_lines:
        result.changes["sysctls"] = {"old": old_lines, "new": new_lines}


def memory_after(plan, current, backend_name=None):
    """
    What to remember once ``plan`` is applied: the first-seen value of each
    kernel parameter, on kernels without rule protocols the rules added, and
    the packet-filter backend that holds the plan's chains (``backend``: the
    next apply looks at another backend only when it differs, see
    :func:`backends_to_clear`).
    """
    memory = {}
    if backend_name and plan.chains:
        memory["backend"] = backend_name
    before = current.memory.get("sysctls_before", {})
    kept = {item.key: before.get(item.key, current.sysctls.get(item.key)) for item in plan.sysctls}
    if kept:
        memory["sysctls_before"] = kept
    if not current.kernel.rule_protocol and plan.rules:
        memory["rules"] = sorted(list(_rule_key(rule)) for rule in plan.rules)
    return memory


def backends_to_clear(name, memory, has_work, names):
    """
    Pure: the other packet-filter backends (their names, from ``names``) in
    which an apply with backend ``name`` looks for the role's part, to remove
    it. ``memory`` is the role's memory (``<role>.json``), whose ``backend``
    is the backend of the last successful apply; ``has_work``: whether the
    apply changes anything in ``name``'s backend, the routes, rules, kernel
    parameters or boot files anyway.

    - The memory names ``name``: none. A no-op costs nothing more (the
      nftables no-op still starts no process: no ``iptables-save``).
    - The memory names another backend: that one, on every apply until it
      succeeds (a switch of backend, or one cut short before its memory was
      written), even when ``name``'s part is already in place.
    - No memory (no ``persist``, the role's first apply, a memory written
      before the backend was remembered): every other backend, but only
      when the apply has work anyway. A switch always has work (the new
      backend holds nothing yet), so it finds the old part; a no-op looks
      nowhere else. What this cannot see: a host without ``persist`` whose
      switch was cut short between the new backend's transaction and the
      old one's removal; both then mark alike (harmless) until an apply with
      work, or ``relayroute.relay_remove``/``proxy_remove`` with the old
      backend, removes the old part.
    """
    others = [other for other in names if other != name]
    last = memory.get("backend")
    if last == name:
        return []
    if last in others:
        return [last]
    return others if has_work else []


def clearing(owner, others):
    """
    Pure: ``[(backend, ruleset, payload)]``, the transaction removing the
    owner's part from each of ``others`` (``[(backend, ruleset now)]``) that
    holds any, and the changes an operator reads under each backend's name.
    """
    empty = planner.empty_plan(owner)
    todo, changes = [], {}
    for other, ruleset in others:
        payload = other.transaction(empty, ruleset)
        if payload:
            todo.append((other, ruleset, payload))
            changes[other.NAME] = {
                "old": other.owned_lines(ruleset, owner.chain_prefix),
                "new": [],
            }
    return todo, changes


def _other_rulesets(filter_backend, memory, has_work):
    """The other backends to look at (see :func:`backends_to_clear`), each read once."""
    names = backends_to_clear(filter_backend.NAME, memory, has_work, list(BACKENDS))
    found = []
    for name in names:
        other = BACKENDS[name]
        # A backend this host cannot run holds nothing (no iptables tools on an
        # nftables-only host, no libnftables on CentOS 7).
        if other.available():
            found.append((other, other.read()))
    return found


def connmark_moves(plan, have_routes, have_rules):
    """
    Connections in flight whose proxy changes mark follow it: when a proxy
    (known by the gateway of its table, in each family) gets a new mark or mask, its
    connections' connmark moves from the old to the new one, after the new
    rule and chains are in place and before the old rule goes. Their replies
    keep leaving through the proxy at every moment.

    Returns ``[(old_mark, old_mask, new_mark, new_mask)]``.
    """
    old_gateway = {
        (route.family, route.table): route.gateway for route in have_routes if route.gateway
    }
    new_gateway = {
        (route.family, route.table): route.gateway for route in plan.routes if route.gateway
    }
    new_mark = {
        new_gateway[(rule.family, rule.table)]: (rule.fwmark, rule.fwmask)
        for rule in plan.rules
        if (rule.family, rule.table) in new_gateway
    }
    moves = []
    for have in have_rules:
        gateway = old_gateway.get((have.family, have.table))
        if gateway not in new_mark:
            continue
        mark, mask = new_mark[gateway]
        move = (have.fwmark, have.fwmask, mark, mask)
        if (have.fwmark, have.fwmask) != (mark, mask) and move not in moves:
            moves.append(move)
    return moves


def _undo_ops(done, kernel_before, owner):
    """The netlink operations that reverse ``done`` (in reverse order)."""
    old_routes = {route.key: route for route in owned_routes(kernel_before, owner)}
    undo = []
    for verb, obj in reversed(done):
        if verb == "route_replace":
            previous = old_routes.get(obj.key)
            undo.append(("route_replace", previous) if previous else ("route_del", obj))
        elif verb == "route_del":
            undo.append(("route_replace", obj))
        elif verb == "rule_add":
            undo.append(("rule_del", obj))
        elif verb == "rule_del":
            undo.append(("rule_add", obj))
        elif verb == "connmark_move":
            old, old_mask, new, new_mask = obj
            undo.append(("connmark_move", (new, new_mask, old, old_mask)))
        elif verb == "sysctl_set":
            key, value, previous = obj
            undo.append(("sysctl_set", (key, previous, value)))
    return undo


def _rollback(done_ops, written, current, plan):
    """
    Put back what was changed, newest first: each packet-filter backend
    written (``[(backend, ruleset before)]``) to its ruleset before, then the
    netlink operations. Returns the problems met doing so.
    """
    problems = []
    prefix = plan.owner.chain_prefix
    for filter_backend, before in reversed(written):
        try:
            chains, jumps = filter_backend.snapshot(before, prefix)
            now = filter_backend.read()
            payload = filter_backend.transaction_to(chains, jumps, now, prefix)
            if payload:
                filter_backend.apply(payload)
        except Exception as err:  # noqa: BLE001 - report every rollback failure
            problems.append(f"restoring {filter_backend.NAME} chains: {err}")
    try:
        netlink.run_ops(_undo_ops(done_ops, current.kernel, plan.owner))
    except Exception as err:  # noqa: BLE001
        problems.append(f"restoring routes and rules: {err}")
    return problems


def converge(
    plan,
    filter_backend,
    current=None,
    test=False,
    prefix="",
    scope=None,
    persist_target=None,
    kernel=None,
    others=None,
):
    """
    Bring the owner's kernel state to ``plan``. Returns ``{"changes": ...}``;
    with ``test`` nothing is touched and the changes are what would be made.
    Raises :class:`InputError` for conflicts with other tools, or a host that
    cannot restore the plan at boot (nothing touched), and
    :class:`ApplyError` when applying fails (rolled back).

    With ``persist_target`` (a :class:`persist.Target`), what the host runs at
    boot and the remembered earlier values are kept (see :mod:`persist`),
    the role's systemd units among them when the target keeps units (on a
    systemd host: ``systemctl daemon-reload`` and the watcher restarted when
    a unit changed, see :func:`units.actions`; a no-op runs nothing). All are
    written only once the kernel is right: a refused apply writes no boot path.
    ``kernel``: a netlink dump already made for this run, reused.

    Switching backend: the owner's part in another packet-filter backend
    (``others``: ``[(backend, ruleset)]``; by default, when the engine reads
    the kernel itself, the backends :func:`backends_to_clear` names, each
    read once) is removed in the same apply, right after ``filter_backend``'s
    transaction and before anything stale goes: new routes and rules, the
    new backend's chains, the old backend's part out, then the connmark moves
    and the removals. There is never a moment where neither backend marks.
    For a moment both do, which is harmless: both render the same plan
    (a relay's marks come from the same proxies, MACs, masks and values), so
    a packet one backend marks gets the same bits from the other, under the
    same mask; restoring a mark the other has set, or saving one it has
    restored, writes the bits that are there already. Established
    connections keep their connmark throughout: both backends restore it
    the same way. The verification reads both again; a failure puts both
    back as they were. Changes are reported under each backend's name: the
    additions under the new one's, the removals under the old one's.
    """
    directory = persist_target.dir if persist_target else None
    own_read = current is None
    if current is None:
        memory = persist.load(directory, plan.owner.role)
        keys = [item.key for item in plan.sysctls]
        current = read(filter_backend, kernel, sysctl_keys=keys, memory=memory)
    current.kernel = adopt_rules(current.kernel, plan, current.memory)
    errors = conflicts(plan, current.kernel, prefix)
    if errors:
        raise InputError(errors)
    todo = diff(plan, current, filter_backend, scope)
    saving = _persist_changes(plan, current, filter_backend, persist_target, prefix)
    if others is None:
        others = []
        if own_read and scope is None:
            others = _other_rulesets(filter_backend, current.memory, bool(todo or saving))
    clears, cleared = clearing(plan.owner, others) if scope is None else ([], {})
    todo.changes.update(cleared)
    if saving:
        todo.changes["persist"] = saving["changes"]
        if saving["systemd"]:
            todo.changes["systemd"] = [" ".join(filter(None, act)) for act in saving["systemd"]]
    if test:
        return {"changes": todo.changes}
    if not todo and not clears:
        # Nothing to change; the data path is still proven, as after a change.
        problems = lookup_problems(plan, current.kernel, prefix)
        if problems:
            raise ApplyError(f"{_lookups_failed(problems)}; nothing was changed")
        if saving:
            _save(persist_target, plan, saving)
        return {"changes": todo.changes}

    done = []
    written = []
    try:
        done += netlink.run_ops(todo.before)
        if todo.transaction:
            written.append((filter_backend, current.ruleset))
            filter_backend.apply(todo.transaction)
        # The old backend's part goes once the new one marks (see above).
        for other, ruleset, payload in clears:
            written.append((other, ruleset))
            other.apply(payload)
        done += netlink.run_ops(todo.after)
        keys = [item.key for item in plan.sysctls]
        now = read(filter_backend, sysctl_keys=keys, part=plan.owner.chain_prefix)
        now.kernel = adopt_rules(now.kernel, plan, current.memory)
        again = diff(plan, now, filter_backend, scope)
        prefix_ = plan.owner.chain_prefix
        left, _ = clearing(plan.owner, [(o, o.read_part(prefix_)) for o, _r, _p in clears])
        if again or left:
            found = [f"{again.changes}"] if again else []
            found += [f"{other.NAME} still holds the role's part" for other, _r, _p in left]
            raise RuntimeError(
                "verification failed: after applying, the kernel still differs from the plan: "
                + "; ".join(found)
            )
        problems = lookup_problems(plan, now.kernel, prefix)
        if problems:
            raise RuntimeError(_lookups_failed(problems))
    except Exception as err:
        done += getattr(err, "done", [])
        problems = _rollback(done, written, current, plan)
        if problems:
            raise ApplyError(
                f"{err}; rollback incomplete: {'; '.join(problems)}", rolled_back=False
            ) from err
        raise ApplyError(f"{err}; the previous state was restored") from err
    if saving:
        _save(persist_target, plan, saving)
    return {"changes": todo.changes}


def lookup_problems(plan, kernel, prefix=""):
    """
    The kernel's own route lookups of the plan's data path (``plan.lookups``:
    the relay role's, none for the other roles), compared with the plan.
    Returns the problems, each naming the proxy, the lookup and the answer.
    Netlink only, a few ms.
    """
    if not plan.lookups:
        return []
    answers = netlink.route_lookups(plan.lookups)
    return planner.lookup_problems(answers, kernel.rules, prefix)


def _lookups_failed(problems):
    return "data-path verification failed: " + "; ".join(problems)


def _save(target, plan, saving):
    """
    Write the boot files and the memory; on a systemd host, stop a watcher
    whose unit goes first, and once written reload systemd's units and
    (re)start a watcher whose unit or script changed (:func:`units.actions`).
    """
    todo = saving.get("systemd", [])
    for verb, unit in todo:
        if verb == "stop":
            _systemctl(verb, unit)
    persist.write_files(saving["files"], saving.get("kinds"))
    persist.save_memory(target.dir, plan.owner.role, saving["memory"])
    for verb, unit in todo:
        if verb != "stop":
            _systemctl(verb, unit)


# systemd's own test for a host it booted (sd_booted(3)); a test points it elsewhere.
SYSTEMD_RUNTIME = "/run/systemd/system"
SYSTEMCTL = "systemctl"


def _on_systemd():
    return os.path.isdir(SYSTEMD_RUNTIME)


def _systemctl(verb, unit=None):
    import subprocess

    argv = [SYSTEMCTL, verb] + ([unit] if unit else [])
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as err:
        raise RuntimeError(
            f"{' '.join(argv)}: {err}; the routing and boot files are in place"
        ) from err
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}; "
            "the routing and boot files are in place"
        )


def _persist_changes(plan, current, filter_backend, target, prefix=""):
    """
    What to write for ``plan`` at ``target``: ``{"files": {path: text or None},
    "memory": {...}, "changes": {path: created|updated|removed}}``, or None
    when everything is already there. Raises :class:`InputError` when the
    host could not restore the plan at boot with the chosen mechanism.
    """
    if not target:
        return None
    try:
        wanted = persist.boot_files(plan, target, current.kernel, filter_backend)
    except ValueError as err:
        raise InputError([f"{_key(prefix, 'persist:mechanism')}: {err}"]) from err
    script, memory_path = persist.paths(target.dir, plan.owner.role)
    remembered = current.memory.get("boot_files", {})
    # Units relayroute wrote, on an apply not told to keep units (no watcher
    # settings: a call by hand): left as they are while the restore script
    # they run stays, removed with it.
    leave = not target.units and wanted.get(script, (None, None))[1] is not None
    carried = {}
    for path, kind in remembered.items():
        if path in wanted:
            continue
        if leave and kind in units.KINDS:
            carried[path] = kind
        else:
            wanted[path] = (kind, None)
    files = {}
    for path, (kind, ours) in wanted.items():
        old = persist.read_text(path, kind)
        files[path] = (kind, old, persist.merged(kind, old, ours, plan, filter_backend))
    writes = {path: item for path, item in files.items() if item[2] != item[1]}
    problems = persist.check_host(plan, target, files, _key(prefix, "persist:mechanism"))
    problems += persist.check_backend(plan, target, filter_backend.NAME, _key(prefix, "backend"))
    if problems:
        raise InputError(problems)
    memory = memory_after(plan, current, filter_backend.NAME)
    # The restore script is always looked after; the other files are
    # remembered so that a later plan or mechanism without them cleans them.
    kept = {
        path: kind for path, (kind, ours) in wanted.items() if ours is not None and path != script
    }
    kept.update(carried)
    if kept:
        memory["boot_files"] = kept
    if not writes and memory == current.memory:
        return None
    changes = {
        path: "removed" if new is None else ("created" if old is None else "updated")
        for path, (kind, old, new) in writes.items()
    }
    if memory != current.memory:
        changes[memory_path] = (
            "removed" if not memory else ("updated" if current.memory else "created")
        )
    unit_writes = {path: item for path, item in writes.items() if item[0] in units.KINDS}
    return {
        "files": {path: new for path, (_kind, _old, new) in writes.items()},
        "kinds": {path: kind for path, (kind, _old, _new) in unit_writes.items()},
        "memory": memory,
        "changes": changes,
        "systemd": units.actions(plan.owner.role, unit_writes, unit_writes and _on_systemd()),
    }


def _key(prefix, key):
    return f"{prefix}:{key}" if prefix else key
