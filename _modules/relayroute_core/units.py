"""
The systemd units of a role, with ``persist:mechanism: unit``: their paths
and texts, written by the engine as boot files (``persist.boot_files``)
beside the restore script they run. One place for every line of them.

- ``relayroute-<role>.service`` runs ``<dir>/<role>.restore`` at boot,
  before the mail services start, in the watcher's sandbox (:data:`SANDBOX`);
- ``relayroute-<role>-watch.service`` runs the watcher, ``<dir>/<role>.watch``
  (:data:`watcher.SCRIPT`), which runs the same restore script when the
  kernel loses part of it (README, "Between applies"), in a sandbox;
- each is enabled by a symlink in ``<systemd_dir>/<wanted_by>.wants/``, as
  ``systemctl enable`` makes it (no process on an apply).

Pure: text in, text out.
"""

import os

# Kinds of boot file (see persist.boot_files): a unit's text, an enabling
# symlink (its "text" is the path it points to), the watcher script.
UNIT, LINK, SCRIPT = "unit", "link", "script"
KINDS = (UNIT, LINK, SCRIPT)

# What both units run in: the restore script (and the watcher around it) as
# root's uid with no capability but those the restore needs, read-only
# everywhere but the lock's directory. One block, so the two never drift apart.
SANDBOX = """\
# The lock every apply holds (/run/relayroute/lock): kept when the unit stops,
# so an apply in progress and a restarted watcher lock the same file.
RuntimeDirectory=relayroute
RuntimeDirectoryPreserve=yes
RuntimeDirectoryMode=0755
# Root's uid (the kernel parameters, the lock and the scripts are root's), with
# no capability but those the restore needs: routes, rules and the packet filter
# (CAP_NET_ADMIN; CAP_NET_RAW for iptables-legacy's socket).
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
# iptables-legacy's lock file, when the host has one (nf_tables needs none).
ReadWritePaths=-/run/xtables.lock
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectProc=invisible
ProtectKernelLogs=yes
UMask=0077
ProtectControlGroups=yes
ProtectKernelModules=yes
ProtectClock=yes
ProtectHostname=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
# rtnetlink for ip and nf_tables; AF_INET for iptables-legacy's socket.
RestrictAddressFamilies=AF_NETLINK AF_UNIX AF_INET AF_INET6
# The restore writes net.* kernel parameters under /proc/sys: no ProtectKernelTunables.
"""

BOOT_UNIT = """\
# Managed by Salt (relayroute): restores the {role} role's routing at boot.
[Unit]
Description=relayroute: restore the {role} role's policy routing and marks
Documentation=file://{script}
Wants=network-online.target
After=network-online.target
# Routing is in place before mail flows.
Before=postfix.service haproxy.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh {script}
{sandbox}
[Install]
WantedBy={wanted_by}
"""

WATCH_UNIT = """\
# Managed by Salt (relayroute): keeps the {role} role's routing in place between applies.
[Unit]
Description=relayroute: put the {role} role's policy routing back when the kernel loses it
Documentation=file://{watcher}
# The boot restore first: the watcher repairs what goes missing afterwards.
After={boot_unit} network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={shell} {watcher} -d {debounce} {script}
Restart=always
RestartSec=2
{sandbox}
[Install]
WantedBy={wanted_by}
"""


def boot_unit_name(role):
    return f"relayroute-{role}.service"


def watch_unit_name(role):
    return f"relayroute-{role}-watch.service"


def watcher_path(directory, role):
    return os.path.join(directory, f"{role}.watch")


def boot_unit(role, script, wanted_by):
    """The boot unit's text: runs ``script`` (the role's restore script) once at boot."""
    return BOOT_UNIT.format(role=role, script=script, wanted_by=wanted_by, sandbox=SANDBOX)


def watch_unit(role, script, watcher, shell, debounce, wanted_by):
    """The watcher unit's text: ``shell watcher -d debounce script``, sandboxed."""
    return WATCH_UNIT.format(
        role=role,
        script=script,
        watcher=watcher,
        shell=shell,
        debounce=debounce,
        boot_unit=boot_unit_name(role),
        wanted_by=wanted_by,
        sandbox=SANDBOX,
    )


def files(role, script, wanted, target, watch_script):
    """
    ``{path: (kind, text)}``: every path of the role's units in ``target``
    (a ``persist.Target``), the text None where it must go: all of them when
    the restore script ``script`` is not ``wanted`` (an empty plan, another
    mechanism), the watcher's when ``target.watch`` is off. A link's text is
    the unit it points to. ``watch_script()`` gives the watcher script's text
    (read only when it is wanted).
    """
    directory, wants = target.systemd_dir, f"{target.wanted_by}.wants"
    watcher = watcher_path(target.dir, role)
    boot, watch = boot_unit_name(role), watch_unit_name(role)
    boot_path, watch_path = os.path.join(directory, boot), os.path.join(directory, watch)
    watching = wanted and target.watch
    watch_text = None
    if watching:
        watch_text = watch_unit(
            role, script, watcher, target.watch_shell, target.watch_debounce, target.wanted_by
        )
    return {
        boot_path: (UNIT, boot_unit(role, script, target.wanted_by) if wanted else None),
        os.path.join(directory, wants, boot): (LINK, boot_path if wanted else None),
        watcher: (SCRIPT, watch_script() if watching else None),
        watch_path: (UNIT, watch_text),
        os.path.join(directory, wants, watch): (LINK, watch_path if watching else None),
    }


def actions(role, writes, systemd):
    """
    What systemd must do about the role's units, given the boot files an
    apply writes (``writes``: ``{path: (kind, old text, new text)}``), on a
    host whose init is ``systemd`` (elsewhere: nothing). ``[(verb, unit)]``
    in order:

    - ``("stop", watcher)`` before the files are written, when its unit goes
      (the watcher switched off, another mechanism, the role removed);
    - ``("daemon-reload", None)`` once they are, when a unit's text changed;
    - ``("restart", watcher)`` last, when its unit or script changed and it
      stays (``systemctl restart`` starts it when it is not running).

    A no-op writes nothing, so it does nothing.
    """
    if not systemd:
        return []
    watch = watch_unit_name(role)
    reload_ = any(kind == UNIT for kind, _old, _new in writes.values())
    watcher = [
        (kind, old, new)
        for path, (kind, old, new) in writes.items()
        if kind == SCRIPT or (kind == UNIT and os.path.basename(path) == watch)
    ]
    goes = any(kind == UNIT and new is None for kind, _old, new in watcher)
    found = []
    if goes and any(kind == UNIT and old is not None for kind, old, _new in watcher):
        found.append(("stop", watch))
    if reload_:
        found.append(("daemon-reload", None))
    if not goes and any(new is not None for _kind, _old, new in watcher):
        found.append(("restart", watch))
    return found
