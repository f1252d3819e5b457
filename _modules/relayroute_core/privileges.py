"""
Whether HAProxy's processes hold the privileges transparent proxying needs,
judged from their ``/proc/PID/status`` text.

Pure: decoding capability masks and judging status texts; reading /proc is
the caller's job (``relayroute.haproxy_privileges``).

What HAProxy needs (checked with HAProxy 2.6 started as an unprivileged user
with ambient capabilities): CAP_NET_BIND_SERVICE to bind ports 25 and 587, at
start and at every reload (the master re-executes itself and binds again);
and CAP_NET_ADMIN or CAP_NET_RAW for IP_TRANSPARENT, which the transparent
binds and every ``usesrc clientip`` connection to a relay set. Without the
latter HAProxy starts, binds the VIP when it is local, accepts connections
and closes each without a word: the failure this module exists to catch.
"""

# linux/capability.h, bit by bit (Linux 5.9 added 40, the last as of 6.x).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

# Each entry: any one of its capabilities will do, and why it is needed.
NEEDED = (
    (("CAP_NET_BIND_SERVICE",), "binding ports below 1024 (25, 587)"),
    (
        ("CAP_NET_ADMIN", "CAP_NET_RAW"),
        "IP_TRANSPARENT (transparent binds, 'usesrc clientip'): without it HAProxy "
        "accepts every connection and drops it",
    ),
)

_MASKS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def decode(mask):
    """The capability names set in a mask (``/proc/PID/status`` hex text or an int).

    >>> decode("0000000000001400")
    ('CAP_NET_BIND_SERVICE', 'CAP_NET_ADMIN')

    A bit beyond the names known here is named ``cap_<bit>``.
    """
    value = int(mask, 16) if isinstance(mask, str) else int(mask)
    names = []
    bit = 0
    while value >> bit:
        if value >> bit & 1:
            names.append(CAPABILITIES[bit] if bit < len(CAPABILITIES) else f"cap_{bit}")
        bit += 1
    return tuple(names)


def parse_status(text):
    """
    The fields of a ``/proc/PID/status`` text that matter here: ``name``,
    ``pid``, ``ppid``, ``uid`` and ``gid`` (effective), and each capability
    set decoded (``CapEff``, ``CapPrm``, ``CapInh``, ``CapBnd``, ``CapAmb``).
    """
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    status = {
        "name": fields.get("Name", ""),
        "pid": int(fields["Pid"]) if "Pid" in fields else None,
        "ppid": int(fields["PPid"]) if "PPid" in fields else None,
        # Real, effective, saved, filesystem: the effective one decides.
        "uid": int(fields["Uid"].split()[1]) if "Uid" in fields else None,
        "gid": int(fields["Gid"].split()[1]) if "Gid" in fields else None,
    }
    for key in _MASKS:
        status[key] = decode(fields[key]) if key in fields else ()
    return status


def missing(effective):
    """What of ``NEEDED`` the effective set ``effective`` (names) lacks: ``[(names, why)]``."""
    have = set(effective)
    return [(names, why) for names, why in NEEDED if not have & set(names)]


def _who(role, status):
    return f"{role} {status['pid']} (uid {status['uid']})"


def problems(master, workers, uid=None, user=None):
    """
    What is wrong with HAProxy's processes (``parse_status`` answers), one
    line each; [] when every process has what it needs.

    ``uid``/``user``: the user HAProxy must run as (its drop-in's ``User=``);
    a process running as another (root after a missed restart) is named.
    """
    found = []
    if not workers:
        found.append(f"master {master['pid']} has no worker: HAProxy serves no connection")
    for role, status in [("master", master), *(("worker", w) for w in workers)]:
        if uid is not None and status["uid"] != uid:
            found.append(
                f"{_who(role, status)} runs as uid {status['uid']}, not as {user or uid} "
                f"(uid {uid}): was HAProxy restarted since its unit changed?"
            )
        for names, why in missing(status["CapEff"]):
            found.append(
                f"{_who(role, status)} lacks {' or '.join(names)} in its effective "
                f"capabilities (CapEff: {', '.join(status['CapEff']) or 'none'}), needed for {why}"
            )
    return found


def summary(status):
    """One process in a line: ``pid N uid U CapEff=A,B``."""
    return f"pid {status['pid']} uid {status['uid']} CapEff={','.join(status['CapEff']) or '-'}"
