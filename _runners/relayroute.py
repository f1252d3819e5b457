"""
relayroute's runner: ``salt-run relayroute.probe``, the end-to-end check of
every mail path that HAProxy's health checks cannot make (they leave from the
proxy's own address and stay green while reply routing is broken).

From a probe minion outside the relays' LAN, SMTP sessions go to each relay
directly and through each VIP, on each port (EHLO and QUIT; a whole message to
a sink when asked); then each relay says which conntrack entries those sessions
made there and with which connmark. A path passes when its sessions got their
banner and the relay routed the replies by the right mark: 0 directly, the
proxy's mark through its VIP (see ``_modules/relayroute_core/probe.py``).

Install: the runner and the execution module come with the formula (``_runners/``,
``_modules/``); ``salt-run saltutil.sync_all`` puts both into the master's
extension modules (the runner imports the execution module's pure sub-modules
from there, so the master needs neither pyroute2 nor a packet filter), and
``salt '*' saltutil.sync_all`` gives the probe minion and the relays
``relayroute.probe_smtp`` and ``relayroute.probe_flows``.
"""

import importlib
import logging
import os
import sys
import types

import salt.client
import salt.utils.minions

log = logging.getLogger(__name__)

__virtualname__ = "relayroute"

# The execution module's package under a private name: the master's loader
# never loads it as the ``relayroute`` execution module, and this runner uses
# only its pure sub-modules (probe, topology, model, ...).
CORE = "relayroute_runner_core"
CORE_DIR = "relayroute_core"
# Exit codes: every path passed; a path failed; the probe could not run (the
# pillar does not validate, the probe minion did not answer).
OK, FAILED, NOT_RUN = 0, 1, 2
SALT_SLACK = 15  # seconds Salt itself may take around a call


def __virtual__():
    return __virtualname__


def _core_dirs():
    """Where the execution module's package may be: the master's synced extension modules
    (``salt-run saltutil.sync_modules``), then beside this file (a checkout in runner_dirs)."""
    here = os.path.dirname(os.path.abspath(__file__))
    extmods = __opts__.get("extension_modules") or ""  # noqa: F821 - injected by Salt's loader
    return [
        os.path.join(extmods, "modules", CORE_DIR),
        os.path.join(os.path.dirname(here), "_modules", CORE_DIR),
    ]


def _probing():
    """The pure sub-module ``probe`` of the execution module's package."""
    return _core("probe")


def _core(name):
    """A pure sub-module of the execution module's package (``probe``, ``status``)."""
    if CORE not in sys.modules:
        found = next((d for d in _core_dirs() if os.path.isfile(os.path.join(d, "probe.py"))), None)
        if found is None:
            raise RuntimeError(
                "relayroute's execution module is not on the master: run "
                f"'salt-run saltutil.sync_modules' (looked in {', '.join(_core_dirs())})"
            )
        # A package of the directory without running its __init__.py (the
        # execution module, which needs pyroute2): relative imports between the
        # pure sub-modules resolve inside it.
        package = types.ModuleType(CORE)
        package.__path__ = [found]
        sys.modules[CORE] = package
    return importlib.import_module(f"{CORE}.{name}")


def _client():
    return salt.client.get_local_client(__opts__["conf_file"])  # noqa: F821


def _answers(client, tgt, fun, arg, timeout, tgt_type="list", kwarg=None):
    """``{minion: (ok, return or why not)}`` of a call; a minion that did not answer is absent."""
    found = {}
    returns = client.cmd(
        tgt, fun, arg=arg, kwarg=kwarg, timeout=timeout, tgt_type=tgt_type, full_return=True
    )
    for minion, answer in (returns or {}).items():
        ret = answer.get("ret") if isinstance(answer, dict) else answer
        retcode = answer.get("retcode", 0) if isinstance(answer, dict) else 0
        if retcode or isinstance(ret, str):
            found[minion] = (False, f"{fun} failed: {ret}")
        else:
            found[minion] = (True, ret)
    return found


def _pillar(tgt, tgt_type):
    """
    The ``relayroute`` pillar the master compiles for the first minion by id
    matching ``tgt`` (by the master's cache of grains, as ``salt -G`` targets):
    ``(minion, pillar)``.
    """
    import salt.pillar
    import salt.utils.minions

    found = salt.utils.minions.CkMinions(__opts__).check_minions(tgt, tgt_type)  # noqa: F821
    minions = sorted(found.get("minions") or [])
    if not minions:
        raise LookupError(
            f"no minion matches {tgt!r} ({tgt_type}), whose pillar holds the topology "
            "(pillar_tgt, pillar_tgt_type)"
        )
    minion = minions[0]
    _id, grains, _pillar = salt.utils.minions.get_minion_data(minion, __opts__)  # noqa: F821
    compiled = salt.pillar.Pillar(
        __opts__,  # noqa: F821
        grains or {"id": minion},
        minion,
        __opts__.get("saltenv") or "base",  # noqa: F821
        pillarenv=__opts__.get("pillarenv"),  # noqa: F821
    ).compile_pillar()
    if compiled.get("_errors"):
        raise LookupError(f"the pillar of {minion} does not render: {compiled['_errors']}")
    if not compiled.get("relayroute"):
        raise LookupError(f"the pillar of {minion} (matching {tgt!r}) has no relayroute")
    return minion, compiled["relayroute"]


def _not_run(why, **extra):
    __context__["retcode"] = NOT_RUN  # noqa: F821
    return {"ok": False, "retcode": NOT_RUN, "summary": f"relayroute probe NOT RUN: {why}", **extra}


def _snapshot(client, relays, sources, ports, mask, timeout):
    """Each relay's conntrack entries from ``sources`` to ``ports``, or why they are unknown."""
    fun, kwarg = "relayroute.probe_flows", {"mark_mask": mask}
    answers = _answers(client, relays, fun, [sources, ports], timeout, kwarg=kwarg)
    return {
        relay: answers[relay][1]
        if relay in answers
        else f"{relay}'s minion did not answer relayroute.probe_flows within {timeout} s"
        for relay in relays
    }


def probe(
    minion=None,
    ports=None,
    timeout=None,
    families=None,
    source=None,
    vip_sessions=None,
    message=None,
    pillar_tgt="roles:relay",
    pillar_tgt_type="grain",
    details=False,
):
    """
    Probe every mail path end to end: from the probe minion, an SMTP session
    to each relay directly and through each VIP, on each port (EHLO, QUIT; a
    whole message to a sink with ``message``), then each relay's conntrack
    entries of those sessions. A path passes when its sessions got their
    banner and the relay's entries carry the right connmark (under
    ``mark_mask``) past the handshake: 0 directly, the proxy's mark through its
    VIP. Returns ``{"ok", "retcode", "summary", "table"}``, the table one
    line per relay and path, each failure with its reasons. With
    ``details=True`` also ``rows`` (each path as data: relay, path, to,
    banners, marks, expected, ok, problems), ``sessions`` (each session as
    the probe minion saw it), ``probe_minion`` and ``pillar_from``: for
    tools, ``--out=json details=True``.

    Exit code (``retcode``): 0 every path passed, 1 a path failed, 2 the probe
    could not run (the pillar does not validate, the probe minion did not
    answer).

    The topology is the ``relayroute`` pillar the master compiles for the
    first minion by id matching ``pillar_tgt`` (by default the grain
    ``roles:relay``, from the master's cache of grains), as ``salt-run
    pillar.show_pillar`` does: one pillar for every minion, read where it is
    made (no minion needs to answer, and Salt 3008's pillar masking, which
    hides pillar values in what ``pillar.get`` returns, does not apply). The
    relays are asked by their minion ids (the keys of ``relayroute:relays``).

    The settings come from pillar ``relayroute:probe``; an argument given here
    replaces the pillar's:

    minion
        The probe minion's id, outside the relays' LAN (required).
    ports
        The ports to probe (default: the topology's ``ports``).
    timeout
        Seconds each network operation may take (default 10).
    families
        ``[4, 6]`` (default), ``[4]`` or ``[6]``.
    source
        The probe's address(es) to send from, one per family.
    vip_sessions
        Sessions through each VIP and port (default: as many as relays serve it).
    message
        ``{from: ..., to: ...}``: send a whole message to this sink.

    And of the runner only: ``pillar_tgt``/``pillar_tgt_type`` (whose pillar
    holds the topology), ``details`` (every row and session, above).

    The probe minion must reach the relays without source NAT (the relays
    find its sessions by its address) and run relayroute's execution module.

    CLI Example:

    .. code-block:: bash

        salt-run relayroute.probe
        salt-run relayroute.probe minion=probe1 ports='[25]' timeout=5
        salt-run relayroute.probe --out=json details=True    # every row, for tools
    """
    try:
        probing = _probing()
    except RuntimeError as err:
        return _not_run(str(err))
    overrides = {
        "minion": minion,
        "ports": ports,
        "timeout": timeout,
        "families": families,
        "source": source,
        "vip_sessions": vip_sessions,
        "message": message,
    }
    try:
        pillar_from, config = _pillar(pillar_tgt, pillar_tgt_type)
    except LookupError as err:
        return _not_run(str(err))
    records = None
    if probing.mine.wanted(config):
        # The fleet from the mine: what the pillar omits, as the formula fills it in.
        records = __salt__["mine.get"]("*", probing.mine.ALIAS)  # noqa: F821
    net = probing.network(config, records)
    if net["errors"]:
        return _not_run(f"the pillar does not validate: {net['errors'][0]}", errors=net["errors"])
    values = config.get("probe") if isinstance(config, dict) else None
    values = dict(values) if isinstance(values, dict) else values
    if isinstance(values, dict) or values is None:
        values = {**(values or {}), **{k: v for k, v in overrides.items() if v is not None}}
    checked = probing.settings(values, net["ports"])
    if checked["errors"]:
        return _not_run(checked["errors"][0], errors=checked["errors"])
    chosen = checked["settings"]
    plan = probing.phases(net, chosen)
    client = _client()
    relays = sorted(net["relays"])
    towards = sorted({s["address"] for phase in plan for s in phase["sessions"]})
    results, snapshots, baseline = {}, [], None
    sources = []
    for index, phase in enumerate(plan):
        sessions = [
            {key: s[key] for key in ("id", "address", "port", "group")} for s in phase["sessions"]
        ]
        wait = probing.call_timeout(sessions, chosen["timeout"], chosen["message"])
        kwarg = {
            "timeout": chosen["timeout"],
            "message": chosen["message"],
            "source": chosen["source"] or None,
            "towards": towards if index == 0 else None,
        }
        if index == 0 and phase["name"] != probing.DIRECT:
            # No direct phase: the sources and the relays' entries before the first VIP phase.
            found = _probe_call(client, chosen["minion"], [], kwarg, wait)
            if isinstance(found, str):
                return _not_run(found)
            sources = probing.sources_of([], found["sources"].values())
            kwarg["towards"] = None
            baseline = _snapshot(client, relays, sources, chosen["ports"], net["mark_mask"], 30)
        found = _probe_call(client, chosen["minion"], sessions, kwarg, wait)
        if isinstance(found, str):
            return _not_run(found)
        for result in found["sessions"]:
            results[result["id"]] = result
        extra = list(found["sources"].values()) if index == 0 else []
        sources = probing.sources_of(found["sessions"], [*sources, *extra])
        snapshots.append(_snapshot(client, relays, sources, chosen["ports"], net["mark_mask"], 30))
    rows = probing.judge(net, chosen, plan, results, snapshots, baseline)
    ok = bool(rows) and all(row["ok"] for row in rows)
    retcode = OK if ok else FAILED
    __context__["retcode"] = retcode  # noqa: F821 - injected by Salt's loader
    found = {
        "ok": ok,
        "retcode": retcode,
        "summary": probing.summary(rows) if rows else "relayroute probe FAILED: nothing to probe",
        "table": probing.table(rows).splitlines(),
    }
    if details:
        found.update(
            rows=rows,
            sessions=[results[s["id"]] for phase in plan for s in phase["sessions"]],
            probe_minion=chosen["minion"],
            pillar_from=pillar_from,
        )
    return found


def _probe_call(client, minion, sessions, kwarg, wait):
    """The probe minion's answer to ``relayroute.probe_smtp``, or why there is none."""
    answers = _answers(client, [minion], "relayroute.probe_smtp", [sessions], wait, kwarg=kwarg)
    if minion not in answers:
        return (
            f"the probe minion {minion!r} (relayroute:probe:minion) did not answer "
            f"relayroute.probe_smtp within {wait} s"
        )
    ok, ret = answers[minion]
    if not ok or not isinstance(ret, dict):
        return f"the probe minion {minion!r}: {ret}"
    return ret


def status(tgt="roles:relay", tgt_type="grain", timeout=30, details=False):
    """
    The fleet's relays as one table: each relay's ``relayroute.status`` rows
    (one per proxy and a ``(direct)`` row: rule, route, MACs marked, marked
    packets, flows by mark, last apply, drift), a ``relay`` column first; a
    relay that did not answer, or failed, is a row saying so. Returns
    ``{"ok", "retcode", "table"}`` (and ``rows``, ``{relay: [row, ...]}``,
    with ``details=True``); ``retcode`` 1 when a relay drifts, failed or did
    not answer.

    CLI Example:

    .. code-block:: bash

        salt-run relayroute.status
        salt-run relayroute.status tgt='relay*' tgt_type=glob --out=json details=True
    """
    view = _core("status")
    client = _client()
    expected = _targeted(tgt, tgt_type)
    answers = _answers(client, tgt, "relayroute.status", [], timeout, tgt_type=tgt_type)
    rows = {}
    for minion in sorted(expected | set(answers)):
        if minion not in answers:
            rows[minion] = "did not answer"
            continue
        ok, value = answers[minion]
        rows[minion] = value if ok else str(value)
    drifting = [
        minion
        for minion, value in rows.items()
        if not isinstance(value, list) or any(row.get("drift") != "ok" for row in value)
    ]
    retcode = FAILED if drifting or not rows else OK
    __context__["retcode"] = retcode  # noqa: F821
    result = {"ok": retcode == OK, "retcode": retcode, "table": view.table(rows)}
    if details:
        result["rows"] = rows
    return result


def _targeted(tgt, tgt_type):
    """The minion ids ``tgt`` matches by the master's data (those that should answer)."""
    found = salt.utils.minions.CkMinions(__opts__).check_minions(tgt, tgt_type)  # noqa: F821
    return set(found.get("minions") or [])
