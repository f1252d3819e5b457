"""
The end-to-end probe behind ``salt-run relayroute.probe``: SMTP sessions from a
host outside the relays' LAN to every relay directly and through every VIP, and
the relays' conntrack entries of those sessions, judged path by path.

HAProxy's health checks leave from the proxy's own LAN address and are never
marked: they stay green while a relay answers proxied clients through the
wrong gateway. The probe makes the check they cannot: a client's session
through each path, and on the relay, the connmark its reply was routed by.

What a path needs to pass:

- directly to a relay (each address, each port): the banner (220) and EHLO
  (250) came back, and the relay's conntrack entry of that very session (the
  probe's source address and port) has connmark 0 under ``mark_mask``;
- through a proxy's VIP (each VIP, each port): on every relay HAProxy sent one
  of the probe's sessions to, each entry carries the proxy's mark and got past
  the handshake (a reply routed the wrong way never reaches HAProxy: the entry
  stays ``SYN_RECV`` whatever its mark); and every session got its banner.

HAProxy connects to a relay from the client's address but from a port of its
own, so an entry through a VIP cannot be told by its port: sessions through
VIPs run in phases, at most one VIP per family in each, and the entries that
appear on a relay during a phase (compared with its entries just before) are
that phase's. Sessions through one VIP and port are held open together until
each has its banner, so HAProxy (``balance leastconn``) gives each relay one;
``probe:vip_sessions`` sets how many (by default: the relays serving the port).

Pure: :func:`settings`, :func:`network`, :func:`phases`, :func:`judge` and
:func:`table` take and return plain data (no socket, no Salt).
:func:`run_sessions` and :func:`sources_towards` are the probe minion's side
(sockets, every operation bounded by the timeout).
"""

import ipaddress
import smtplib
import socket
import threading

from . import mine, model, topology

KEYS = {"minion", "ports", "timeout", "families", "source", "vip_sessions", "message"}
MESSAGE_KEYS = {"from", "to"}
DEFAULT_TIMEOUT = 10
MAX_TIMEOUT = 120
MAX_VIP_SESSIONS = 64
FAMILIES = (4, 6)
# Conntrack's TCP states of a connection whose handshake never completed
# (LISTEN is SYN_SENT2, a simultaneous open; UNKNOWN: no state reported).
UNFINISHED = frozenset({"SYN_SENT", "SYN_RECV", "LISTEN", "NONE", "UNKNOWN", ""})
DIRECT = "direct"


# -- settings ---------------------------------------------------------------


def _message(value, errors, path):
    if not isinstance(value, dict):
        errors.add(path, value, "must be a mapping with 'from' and 'to' (a sink address)")
        return None
    topology._unknown(errors, path, value, MESSAGE_KEYS)
    found = {}
    for key in sorted(MESSAGE_KEYS):
        text = value.get(key)
        if not isinstance(text, str) or "@" not in text or topology.CONTROL.search(text):
            errors.add(f"{path}:{key}", text, "must be a mail address such as sink@example.org")
        elif any(c in text for c in " <>"):
            errors.add(f"{path}:{key}", text, "must be a bare address, without spaces or <>")
        else:
            found[key] = text
    return found if len(found) == len(MESSAGE_KEYS) else None


def settings(values, ports, prefix="relayroute", path="probe"):
    """
    Validate the probe's settings (pillar ``relayroute:probe``, or the
    runner's arguments over it) against the topology's ``ports``. Returns
    ``{"errors": [...], "settings": {...} or None}``; each error names the key
    path (``relayroute:probe:...``) and the value.

    minion
        The probe minion's id: a host outside the relays' LAN (required).
    ports
        The ports to probe, among the topology's (default: all of them).
    timeout
        Seconds each network operation may take (connect, each reply): 1-120,
        default 10.
    families
        The address families to probe, ``[4, 6]`` by default (each relay
        address and VIP of those families).
    source
        The probe's address to send from, one or one per family (default:
        what its routing chooses).
    vip_sessions
        Sessions through each VIP and port (default: the relays serving the
        port in the VIP's family, so that each gets one).
    message
        ``{from: ..., to: ...}``: send a whole message to this sink in every
        session (default: EHLO and QUIT only, no mail).
    """
    errors = model._Errors(prefix)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        errors.add(path, values, "must be a mapping of probe settings (minion, ports, ...)")
        return {"errors": errors.items, "settings": None}
    topology._unknown(errors, path, values, KEYS)
    minion = values.get("minion")
    if not isinstance(minion, str) or not minion.strip() or topology.CONTROL.search(minion):
        errors.add(
            f"{path}:minion", minion, "is required: the id of the minion the sessions start from"
        )
    chosen = list(ports)
    if values.get("ports") is not None:
        chosen = topology._ports(values["ports"], errors, f"{path}:ports", list(ports))
    timeout = DEFAULT_TIMEOUT
    if values.get("timeout") is not None:
        timeout = values["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            errors.add(f"{path}:timeout", timeout, "must be a number of seconds")
        elif not 1 <= timeout <= MAX_TIMEOUT:
            errors.add(f"{path}:timeout", timeout, f"must be from 1 to {MAX_TIMEOUT} seconds")
    families = list(FAMILIES)
    if values.get("families") is not None:
        raw = values["families"]
        if (
            not isinstance(raw, (list, tuple))
            or not raw
            or any(isinstance(f, bool) or f not in FAMILIES for f in raw)
        ):
            errors.add(f"{path}:families", raw, "must be a non-empty list of 4 and/or 6")
        else:
            families = sorted(set(raw))
    source = ()
    if values.get("source") is not None:
        source = model.to_addresses(values["source"], errors, f"{path}:source")
    vip_sessions = None
    if values.get("vip_sessions") is not None:
        vip_sessions = model.to_int(
            values["vip_sessions"],
            errors,
            f"{path}:vip_sessions",
            1,
            MAX_VIP_SESSIONS,
            "a number of sessions",
        )
    message = None
    if values.get("message") is not None:
        message = _message(values["message"], errors, f"{path}:message")
    if errors.items:
        return {"errors": errors.items, "settings": None}
    return {
        "errors": [],
        "settings": {
            "minion": minion,
            "ports": chosen,
            "timeout": timeout,
            "families": families,
            "source": list(source),
            "vip_sessions": vip_sessions,
            "message": message,
        },
    }


def _listed(value):
    return [value] if isinstance(value, str) else list(value)


def family_of(address):
    return ipaddress.ip_address(address).version


def network(config, records=None):
    """
    What the probe needs of the ``relayroute`` pillar, validated as the
    formula validates it (``probe`` aside): ``{"errors": [...], "mark_mask":
    int, "ports": [...], "relays": {name: {"addresses": [...], "ports":
    [...]}}, "proxies": {name: {"vips": [...], "mark": int}}}``. With
    ``mine:enabled`` or ``relays_from_mine``, what the pillar omits comes
    from the mine's ``records`` (``{minion: record}``), as for the formula.
    """
    if not isinstance(config, dict):
        config = {"": config}  # topology names the bad value
    rest = {key: value for key, value in config.items() if key != "probe"}
    rest, _notes = mine.merge(rest, records or {})
    result = topology.topology(rest)
    if result["errors"]:
        return {"errors": result["errors"]}
    relay_args = result["relay"]
    proxies, relays, ports = {}, {}, []
    for name in sorted(relay_args["proxies"]):
        # The proxy role's arguments carry its VIPs, the ports and each relay's.
        args = topology.topology(rest, name)["proxy"]
        proxies[name] = {
            "vips": _listed(args["vip"]),
            "mark": relay_args["proxies"][name]["mark"],
        }
        ports = args["ports"]
        relays = {
            relay["name"]: {"addresses": _listed(relay["address"]), "ports": relay["ports"]}
            for relay in args["relays"]
        }
    return {
        "errors": [],
        "mark_mask": relay_args["mark_mask"],
        "ports": ports,
        "relays": relays,
        "proxies": proxies,
    }


# -- the sessions -------------------------------------------------------------


def _serving(net, port, family):
    """The relays HAProxy sends a VIP's sessions of ``port`` and ``family`` to."""
    return [
        name
        for name, relay in sorted(net["relays"].items())
        if port in relay["ports"] and any(family_of(a) == family for a in relay["addresses"])
    ]


def phases(net, chosen):
    """
    The sessions to open, in phases: first every relay directly (each address
    of a probed family, each of its probed ports; all at once), then the VIPs,
    at most one of each family per phase (a relay's new entries in a phase are
    told apart by family and port only). Each session is ``{"id", "path"
    ("direct" or the proxy's name), "relay" (direct only), "address", "port",
    "family", "group"}``; sessions of one group (one VIP and port) are opened
    one after another and held, other groups run side by side.
    """
    number = iter(range(1, 1_000_000))
    direct = []
    for name, relay in sorted(net["relays"].items()):
        for address in relay["addresses"]:
            if family_of(address) not in chosen["families"]:
                continue
            for port in relay["ports"]:
                if port in chosen["ports"]:
                    sid = f"s{next(number)}"
                    direct.append(
                        {
                            "id": sid,
                            "path": DIRECT,
                            "relay": name,
                            "address": address,
                            "port": port,
                            "family": family_of(address),
                            "group": sid,
                        }
                    )
    found = [{"name": DIRECT, "sessions": direct}] if direct else []
    pending = [
        (proxy, vip)
        for proxy, entry in sorted(net["proxies"].items())
        for vip in entry["vips"]
        if family_of(vip) in chosen["families"]
    ]
    while pending:
        taken, later, sessions = set(), [], []
        for proxy, vip in pending:
            family = family_of(vip)
            if family in taken:
                later.append((proxy, vip))
                continue
            taken.add(family)
            for port in chosen["ports"]:
                serving = _serving(net, port, family)
                if not serving:
                    continue
                for _ in range(chosen["vip_sessions"] or len(serving)):
                    sessions.append(
                        {
                            "id": f"s{next(number)}",
                            "path": proxy,
                            "relay": None,
                            "address": vip,
                            "port": port,
                            "family": family,
                            "group": f"{proxy} {vip} {port}",
                        }
                    )
        if sessions:
            found.append({"name": f"vip{len(found)}", "sessions": sessions})
        pending = later
    return found


def call_timeout(sessions, timeout, message=None):
    """
    Seconds the probe minion may take for ``sessions`` (what the runner waits
    for it): the longest group opens its sessions one after another (connect,
    banner), then each exchanges its commands (EHLO, QUIT; and MAIL, RCPT,
    DATA, its end with a message); a few seconds for Salt on top.
    """
    sizes = {}
    for session in sessions:
        sizes[session["group"]] = sizes.get(session["group"], 0) + 1
    largest = max(sizes.values(), default=0)
    steps = 2 + (6 if message else 2)
    return int(largest * steps * timeout) + 15


def sources_of(results, extra=()):
    """The probe's source addresses, normalised: where a relay's entries come from."""
    found = {_norm(r["local"]) for r in results if r.get("local")}
    found |= {_norm(a) for a in extra if a}
    return sorted(found)


# -- the relays' side ----------------------------------------------------------


def _norm(address):
    return str(ipaddress.ip_address(address))


def select_flows(flows, sources, ports):
    """
    The conntrack entries (:class:`netlink.Flow`) of TCP connections from one
    of ``sources`` to one of ``ports``, as plain dicts (``src``, ``sport``,
    ``dst``, ``dport``, ``mark``, ``state``).
    """
    wanted = {_norm(source) for source in sources}
    ports = set(ports)
    return [
        {
            "src": _norm(flow.src),
            "sport": flow.sport,
            "dst": _norm(flow.dst),
            "dport": flow.dport,
            "mark": flow.mark,
            "state": flow.state,
        }
        for flow in flows
        if flow.proto == "tcp" and flow.dport in ports and _norm(flow.src) in wanted
    ]


def _key(flow):
    return (flow["src"], flow["sport"], flow["dst"], flow["dport"])


def new_flows(before, after):
    """The entries of ``after`` not in ``before`` (the same connection by its addresses, ports)."""
    seen = {_key(flow) for flow in before}
    return [flow for flow in after if _key(flow) not in seen]


# -- judgement ----------------------------------------------------------------


def session_problem(result, message=None):
    """Why a session failed (None: banner, EHLO and, when asked, the message went through)."""
    if result is None:
        return "the probe minion returned nothing for this session"
    if result.get("error"):
        return result["error"]
    if not result.get("banner_ok"):
        return f"no 220 banner (got {result.get('banner')!r})"
    if not result.get("ehlo_ok"):
        return "EHLO was not answered 250"
    if message and not result.get("sent"):
        return "the message was not accepted"
    return None


def _mark(value):
    return f"{value:#x}" if value else "0"


def _flow_problems(flows, expected, mask):
    problems = []
    for flow in flows:
        mark = flow["mark"] & mask
        where = f"{flow['src']}:{flow['sport']} -> {flow['dst']}:{flow['dport']}"
        if mark != expected:
            problems.append(f"connmark {_mark(mark)} on {where}, not {_mark(expected)}")
        if flow["state"] in UNFINISHED:
            problems.append(
                f"{where} never got past the handshake ({flow['state'] or 'no state'}): "
                "the relay's reply did not come back"
            )
    return problems


def judge(net, chosen, plan, results, snapshots, baseline=None):
    """
    Pure: the rows of the probe's table, one per relay and path, from the
    sessions' ``results`` (``{session id: result}``, what :func:`run_sessions`
    returned) and each relay's conntrack entries from the probe
    (:func:`select_flows`) after each phase of ``plan``: ``snapshots[i]`` is
    ``{relay: [flow, ...] or "why it is unknown"}`` after ``plan[i]``, and
    ``baseline`` the same before the first phase (needed when that is no
    direct phase: a VIP phase's entries are those new since the one before).

    A row: ``{"relay", "path" ("direct" or the proxy's name), "to" (address:port),
    "banners" (banners/sessions), "marks" (connmarks seen under mark_mask),
    "expected", "ok", "problems": [...]}``.
    """
    mask = net["mark_mask"]
    message = chosen.get("message")
    rows = []
    before = baseline or {}
    untracked = set()
    for phase, after in zip(plan, snapshots):
        if phase["name"] == DIRECT:
            untracked = _untracked_relays(phase["sessions"], results, after)
            for session in phase["sessions"]:
                result = results.get(session["id"])
                rows.append(_direct_row(session, result, after, mask, message, untracked))
        else:
            rows += _vip_rows(net, phase, results, before, after, mask, message, untracked)
        before = after
    return rows


def _entry_of(flows, result, port):
    """The entries of the session of ``result`` (by its source address and port)."""
    src, sport = _norm(result["local"]), result["local_port"]
    return [f for f in flows if (f["src"], f["sport"], f["dport"]) == (src, sport, port)]


def _untracked_relays(sessions, results, snapshot):
    """
    The relays whose conntrack has an entry of none of the direct sessions
    that reached them (their kernel tracks no connection: entries of earlier
    runs may linger there, but none of this one's).
    """
    reached, tracked = set(), set()
    for session in sessions:
        result = results.get(session["id"]) or {}
        flows = snapshot.get(session["relay"])
        if not result.get("local_port") or not isinstance(flows, list):
            continue
        reached.add(session["relay"])
        if _entry_of(flows, result, session["port"]):
            tracked.add(session["relay"])
    return reached - tracked


def _untracked(relay):
    return (
        f"{relay} has a conntrack entry of none of the probe's direct sessions: its kernel "
        "tracks no connection (relayroute's rules, which use conntrack, are not in place?)"
    )


def _fmt_to(address, port):
    return f"[{address}]:{port}" if family_of(address) == 6 else f"{address}:{port}"


def _row(relay, path, to, banners, marks, expected, problems):
    return {
        "relay": relay,
        "path": path,
        "to": to,
        "banners": banners,
        "marks": [_mark(m) for m in marks],
        "expected": _mark(expected),
        "ok": not problems,
        "problems": problems,
    }


def _direct_row(session, result, snapshot, mask, message, untracked):
    relay, port = session["relay"], session["port"]
    problems = []
    why = session_problem(result, message)
    if why:
        problems.append(why)
    marks = []
    flows = snapshot.get(relay, "the relay's minion did not answer")
    local = (result or {}).get("local")
    if isinstance(flows, str):
        problems.append(f"conntrack unknown: {flows}")
    elif local and result.get("local_port"):
        mine = _entry_of(flows, result, port)
        if relay in untracked:
            problems.append(_untracked(relay))
        elif not mine:
            where = f"{_norm(local)}:{result['local_port']}"
            problems.append(f"no conntrack entry of {where} -> port {port} on {relay}")
        marks = sorted({f["mark"] & mask for f in mine})
        problems += _flow_problems(mine, 0, mask)
    banner = "1/1" if result and result.get("banner_ok") else "0/1"
    return _row(relay, DIRECT, _fmt_to(session["address"], port), banner, marks, 0, problems)


def _vip_rows(net, phase, results, before, after, mask, message, untracked):
    groups = {}
    for session in phase["sessions"]:
        groups.setdefault((session["path"], session["address"], session["port"]), []).append(
            session
        )
    rows = []
    for (proxy, vip, port), sessions in groups.items():
        family = family_of(vip)
        expected = net["proxies"][proxy]["mark"]
        outcomes = [session_problem(results.get(s["id"]), message) for s in sessions]
        failed = [why for why in outcomes if why]
        banners = f"{sum(1 for s in sessions if (results.get(s['id']) or {}).get('banner_ok'))}"
        banners += f"/{len(sessions)}"
        to = _fmt_to(vip, port)
        group_rows = []
        for relay in _serving(net, port, family):
            problems = []
            seen, earlier = after.get(relay), before.get(relay, [])
            if seen is None:
                seen = "the relay's minion did not answer"
            if isinstance(seen, str) or isinstance(earlier, str):
                why = seen if isinstance(seen, str) else earlier
                problems.append(f"conntrack unknown: {why}")
                group_rows.append(_row(relay, proxy, to, banners, [], expected, problems))
                continue
            flows = [
                f
                for f in new_flows(earlier, seen)
                if f["dport"] == port and family_of(f["dst"]) == family
            ]
            if not flows and relay in untracked:
                problems.append(_untracked(relay))
            elif not flows:
                problems.append(
                    f"none of the {len(sessions)} sessions through {to} reached {relay}: "
                    "HAProxy holds it down or sent them elsewhere "
                    "(relayroute:probe:vip_sessions sends more)"
                )
            problems += _flow_problems(flows, expected, mask)
            marks = sorted({f["mark"] & mask for f in flows})
            group_rows.append(_row(relay, proxy, to, banners, marks, expected, problems))
        if failed and all(row["ok"] for row in group_rows):
            # The sessions failed, and no relay shows why: before HAProxy, or a
            # relay whose reply went astray without a trace in its conntrack.
            group_rows.append(
                _row(
                    "-",
                    proxy,
                    to,
                    banners,
                    [],
                    expected,
                    [f"{len(failed)} of {len(sessions)} sessions failed: {failed[0]}"],
                )
            )
        rows += group_rows
    return rows


COLUMNS = ("RELAY", "PATH", "TO", "BANNER", "CONNMARK", "RESULT")


def table(rows):
    """The rows as a text table, one line each, failures with every reason."""
    lines = [
        (
            row["relay"],
            row["path"] if row["path"] == DIRECT else f"via {row['path']}",
            row["to"],
            row["banners"],
            f"{','.join(row['marks']) or '-'} (want {row['expected']})",
            "ok" if row["ok"] else "FAIL: " + "; ".join(row["problems"]),
        )
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(COLUMNS, *lines)]
    widths[-1] = 0
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
        for line in (COLUMNS, *lines)
    )


def summary(rows):
    """One line: how many paths passed, and the first failure, naming relay and path."""
    failed = [row for row in rows if not row["ok"]]
    if not failed:
        return f"relayroute probe OK: {len(rows)} paths"
    first = failed[0]
    path = first["path"] if first["path"] == DIRECT else f"via {first['path']}"
    return (
        f"relayroute probe FAILED: {len(failed)} of {len(rows)} paths: {first['relay']} {path} "
        f"{first['to']}: {first['problems'][0]}"
    )


# -- the probe minion's side ---------------------------------------------------


def sources_towards(addresses, source=()):
    """
    ``{address: the local address this host sends to it from}``, by the
    kernel's route choice (a UDP socket's connect sends nothing); None when
    there is no route. ``source``: the addresses to bind, one per family.
    """
    bind = {family_of(a): a for a in source}
    found = {}
    for address in addresses:
        family = family_of(address)
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        try:
            with socket.socket(af, socket.SOCK_DGRAM) as sock:
                if family in bind:
                    sock.bind((bind[family], 0))
                sock.connect((address, 9))
                found[address] = _norm(sock.getsockname()[0])
        except OSError:
            found[address] = None
    return found


class _Session(smtplib.SMTP):
    """smtplib's client, remembering its local address before the banner is read."""

    local = None

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        self.local = sock.getsockname()[:2]
        return sock


def _literal(address):
    """EHLO's argument for a host without a name: its address literal (RFC 5321)."""
    return f"[IPv6:{address}]" if family_of(address) == 6 else f"[{address}]"


def _open(session, timeout, bind):
    """Connect and read the banner; the result so far and the open client (or None)."""
    result = {
        "id": session["id"],
        "address": session["address"],
        "port": session["port"],
        "local": None,
        "local_port": None,
        "banner_ok": False,
        "banner": None,
        "ehlo_ok": False,
        "sent": None,
        "error": None,
    }
    source = bind.get(family_of(session["address"]))
    # local_hostname given: smtplib would otherwise ask DNS for this host's name.
    client = _Session(
        local_hostname="localhost",
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    try:
        code, text = client.connect(session["address"], session["port"])
        result["banner"] = f"{code} {text.decode(errors='replace')}".splitlines()[0]
        result["banner_ok"] = code == 220
        if code != 220:
            result["error"] = f"banner {result['banner']!r}, not 220"
    except (OSError, smtplib.SMTPException) as err:
        result["error"] = _error(err, "connect and banner", timeout)
    if client.local:
        result["local"], result["local_port"] = _norm(client.local[0]), client.local[1]
    if not result["banner_ok"]:
        client.close()
        return result, None
    return result, client


def _error(err, step, timeout):
    # smtplib turns a timeout while reading a reply into SMTPServerDisconnected.
    if isinstance(err, (socket.timeout, TimeoutError)) or "timed out" in str(err):
        return f"{step}: no answer within {timeout:g} s"
    text = str(err) or type(err).__name__
    return f"{step}: {text}"


def _exchange(result, client, message):
    """EHLO, the message when asked, QUIT; the client is closed whatever happens."""
    step = "EHLO"
    try:
        client.local_hostname = _literal(result["local"])
        code, _text = client.ehlo()
        result["ehlo_ok"] = code == 250
        if code != 250:
            result["error"] = f"EHLO answered {code}, not 250"
        elif message:
            step = "the message"
            body = (
                f"From: <{message['from']}>\r\nTo: <{message['to']}>\r\n"
                f"Subject: relayroute probe {result['id']} to {result['address']}:"
                f"{result['port']}\r\nX-Relayroute-Probe: {result['id']}\r\n\r\n"
                "relayroute's end-to-end probe; nothing to do.\r\n"
            )
            client.sendmail(message["from"], [message["to"]], body)
            result["sent"] = True
        step = "QUIT"
        client.quit()
    except (OSError, smtplib.SMTPException) as err:
        if step != "QUIT":
            result["error"] = _error(err, step, client.timeout)
            if step == "the message":
                result["sent"] = False
    finally:
        client.close()


def run_sessions(sessions, timeout=DEFAULT_TIMEOUT, message=None, source=()):
    """
    Open ``sessions`` (``{"id", "address", "port", "group"}``) and return
    one result each: ``id``, ``address``, ``port``, ``local`` and
    ``local_port`` (where it came from), ``banner_ok``, ``banner`` (its first
    line), ``ehlo_ok``, ``sent`` (with ``message``), ``error`` (what failed,
    None). Groups run side by side; in a group each session is opened (connect,
    banner) while the ones before are held open, then each says EHLO, sends
    ``message`` (``{"from", "to"}``) when given, and QUIT. Every operation is
    bounded by ``timeout`` seconds. ``source``: addresses to send from, one
    per family.
    """
    bind = {family_of(a): a for a in source}
    groups = {}
    for session in sessions:
        groups.setdefault(session.get("group", session["id"]), []).append(session)
    results = {}

    def one_group(members):
        held = []
        for session in members:
            result, client = _open(session, timeout, bind)
            results[session["id"]] = result
            if client is not None:
                held.append((result, client))
        for result, client in held:
            _exchange(result, client, message)

    threads = [threading.Thread(target=one_group, args=(m,), daemon=True) for m in groups.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[session["id"]] for session in sessions]
