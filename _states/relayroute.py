"""
States for relayroute: keep a relay's reply routing, a proxy's TPROXY divert
or a single policy route present or absent.

Each state asks the ``relayroute`` execution module for the difference first:
no difference means ``result: True`` and no changes; with ``test=True`` the
exact changes are returned with ``result: None`` and nothing is touched.
``changes`` shows old and new ip rules, routes and packet-filter lines.

.. code-block:: yaml

    relayroute-relay-policy-routing:
      relayroute.relay_present:
        - lan_networks: [192.0.2.0/24]
        - mark_mask: 0xff
        - proxies:
            master-relay:
              address: 192.0.2.2
              mark: 254
              table: 1000254
              priority: 1000
"""

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "relayroute"


def __virtual__():
    # The execution module's own __virtual__ explains an unsuitable host; its
    # functions are looked up when a state runs (see _run).
    return __virtualname__


def _run(name, func, what, **kwargs):
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    test = bool(__opts__.get("test"))
    try:
        function = __salt__[func]
    except KeyError:
        ret["comment"] = (
            f"{func} is not available: run saltutil.sync_all, and see "
            "'salt-call sys.doc relayroute' for what this host lacks"
        )
        return ret
    try:
        out = function(test=test, **kwargs)
    except (CommandExecutionError, SaltInvocationError) as err:
        ret["comment"] = str(err)
        return ret
    changes = out["changes"]
    if not changes:
        ret["result"] = True
        ret["comment"] = f"{what} is already as described"
        return ret
    ret["changes"] = changes
    if test:
        ret["result"] = None
        ret["comment"] = f"{what} would be changed"
        return ret
    ret["result"] = True
    ret["comment"] = f"{what} was changed"
    return ret


def relay_present(
    name,
    lan_networks,
    mark_mask,
    proxies,
    backend="iptables",
    prefix="",
    persist_dir=None,
    persist=None,
    watcher=None,
):
    """
    Make this relay answer each connection through the gateway it came in by.

    name
        The state's name (free text).
    lan_networks
        The relay's own networks; their traffic is never marked.
    mark_mask
        relayroute's bits of the packet mark (other mark users keep theirs).
    proxies
        Mapping of each master-relay's name to ``address`` (on the relay's
        network), ``mark``, ``table``, ``priority`` and optional ``mac`` and
        ``macs`` (an HA pair's nodes, all marked with the proxy's mark; looked
        up in the neighbour table when neither is given).
    backend
        Packet-filter backend: ``iptables``.
    prefix
        Key path prepended to input errors, e.g. ``relayroute`` for pillar.
    persist_dir
        Keep the boot-time restore script there (``relay.restore``), e.g.
        ``/etc/relayroute``.
    persist
        The pillar's ``persist`` settings instead: ``dir``, ``mechanism``
        (``unit``, or ``network-scripts`` for CentOS 7's route-/rule- files and
        /etc/sysconfig/iptables) and the paths of those files.
    watcher
        The watcher's settings (``relayroute:watch``: ``enabled``,
        ``debounce``, ``shell``; not ``watch``, Salt's requisite); given,
        the role's systemd units (boot unit, watcher and its unit, their
        ``.wants`` symlinks) are kept with mechanism ``unit`` and removed
        otherwise, reported under ``changes: persist``.
    """
    return _run(
        name,
        "relayroute.relay_apply",
        "relay reply routing",
        lan_networks=lan_networks,
        mark_mask=mark_mask,
        proxies=proxies,
        backend=backend,
        prefix=prefix,
        persist_dir=persist_dir,
        persist=persist,
        watcher=watcher,
    )


def relay_absent(name, backend="iptables", persist_dir=None, persist=None, watcher=None):
    """Remove exactly what relayroute added for the relay role, boot files and units included."""
    return _run(
        name,
        "relayroute.relay_remove",
        "relay reply routing",
        backend=backend,
        persist_dir=persist_dir,
        persist=persist,
        watcher=watcher,
    )


def proxy_present(
    name,
    divert_mark=None,
    divert_table=100,
    divert_priority=100,
    mark_mask=0xFF,
    backend="iptables",
    prefix="",
    persist_dir=None,
    persist=None,
    families=(4,),
    watcher=None,
):
    """
    Keep the transparent proxy's divert routing: ``-m socket --transparent``
    packets get ``divert_mark``, which routes them to the local stack through
    ``local 0.0.0.0/0 dev lo table divert_table`` (and ``local ::/0`` for
    IPv6). ``divert_mark`` defaults to the lowest bit of ``mark_mask``.
    ``families``: the address families of the proxy's VIPs (``[4, 6]``).
    ``persist``, ``watcher``: as for :func:`relay_present`.
    """
    return _run(
        name,
        "relayroute.proxy_apply",
        "proxy divert routing",
        divert_mark=divert_mark,
        divert_table=divert_table,
        divert_priority=divert_priority,
        mark_mask=mark_mask,
        backend=backend,
        prefix=prefix,
        persist_dir=persist_dir,
        persist=persist,
        families=families,
        watcher=watcher,
    )


def proxy_absent(name, backend="iptables", persist_dir=None, persist=None, watcher=None):
    """Remove exactly what relayroute added for the proxy role, boot files and units included."""
    return _run(
        name,
        "relayroute.proxy_remove",
        "proxy divert routing",
        backend=backend,
        persist_dir=persist_dir,
        persist=persist,
        watcher=watcher,
    )


def policy_route_present(name, table, gateway, fwmark, priority, fwmask=0xFFFFFFFF):
    """
    Keep one policy route: ``default via gateway`` in ``table`` and the rule
    ``priority: fwmark fwmark/fwmask lookup table``.

    .. code-block:: yaml

        backup-uplink:
          relayroute.policy_route_present:
            - table: 1000250
            - gateway: 192.0.2.3
            - fwmark: 250
            - fwmask: 0xff
            - priority: 1001
    """
    return _run(
        name,
        "relayroute.policy_route_apply",
        f"policy route for table {table}",
        table=table,
        gateway=gateway,
        fwmark=fwmark,
        fwmask=fwmask,
        priority=priority,
    )


def policy_route_absent(name, table, gateway, fwmark, priority, fwmask=0xFFFFFFFF):
    """Remove one policy route kept by :func:`policy_route_present`."""
    return _run(
        name,
        "relayroute.policy_route_remove",
        f"policy route for table {table}",
        table=table,
        gateway=gateway,
        fwmark=fwmark,
        fwmask=fwmask,
        priority=priority,
    )


def haproxy_privileged(name, pidfile=None, pid=None, user=None, require_running=True):
    """
    Fail when the running HAProxy lacks what transparent proxying needs:
    CAP_NET_BIND_SERVICE, and CAP_NET_ADMIN or CAP_NET_RAW (IP_TRANSPARENT),
    in the effective set of its master and every worker; with ``user``, also
    when a process runs as another user. An HAProxy without CAP_NET_ADMIN and
    CAP_NET_RAW starts and accepts connections, then drops every one: this
    state turns that into a failed state naming what is missing. It changes
    nothing and reads ``/proc`` only.

    pidfile, pid
        The master's pid file (the unit's ``PIDFILE``) or pid.
    user
        The user HAProxy must run as.
    require_running
        False where relayroute does not run HAProxy (``manage_service:
        false``): an HAProxy that is not running passes, one that runs is
        checked.

    .. code-block:: yaml

        relayroute-proxy-haproxy-privileges:
          relayroute.haproxy_privileged:
            - pidfile: /run/haproxy/haproxy.pid
            - user: haproxy
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    try:
        function = __salt__["relayroute.haproxy_privileges"]
    except KeyError:
        ret["comment"] = (
            "relayroute.haproxy_privileges is not available: run saltutil.sync_all, and "
            "see 'salt-call sys.doc relayroute' for what this host lacks"
        )
        return ret
    try:
        found = function(pidfile=pidfile, pid=pid, user=user)
    except (CommandExecutionError, SaltInvocationError) as err:
        ret["comment"] = str(err)
        return ret
    if not found["running"]:
        if not require_running:
            ret["result"] = True
        elif __opts__.get("test"):
            ret["result"] = None  # the service state before this one would start it
        ret["comment"] = found["comment"] + (
            "" if require_running else " (relayroute does not run it: nothing to check)"
        )
        return ret
    if found["problems"]:
        # In test mode a restart before this state may be pending: not yet a failure.
        ret["result"] = None if __opts__.get("test") else False
        ret["comment"] = "; ".join(found["problems"]) + f". {found['comment']}"
        return ret
    ret["result"] = True
    ret["comment"] = f"{found['comment']}: every process has what it needs"
    return ret
