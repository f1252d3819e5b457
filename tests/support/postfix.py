"""
A real Postfix instance inside a test network namespace.

Each instance has its own configuration and queue directories and its own log
file under a directory the caller owns (e.g. ``tmp_path``) and its own data
directory, so several instances - one per namespace - run side by side on one
filesystem. Nothing
ever leaves the lab: every delivery transport is deferred (messages stay in the
queue), DNS is off and the only network is the namespaces' own.
"""

import atexit
import contextlib
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.netns import _alive, live_processes

# Every transport a message could be handed to stays deferred: accepted mail
# sits in the queue until the instance is thrown away.
DEFER_TRANSPORTS = ("smtp", "relay", "local", "virtual", "lmtp", "error", "retry", "discard")

# The Debian master.cf services, all with chroot "n" (the queue lives in a
# temp dir that has no chroot setup), plus submission on 587 without TLS/SASL.
# Placeholder {smtpd} is the list of inet listeners.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{smtpd}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_CONNECT = re.compile(r"/smtpd\[\d+\]: connect from ([^\s\[]*)\[([^\]]+)\]")
# "<queue id>: client=host[IP]": smtpd took a message from IP.
_CLIENT = re.compile(r"\]: ([0-9A-Za-z]+): client=[^\s\[]*\[([^\]]+)\]")
# "<queue id>: to=<rcpt>, ..., status=deferred (...)": a delivery attempt's outcome.
_STATUS = re.compile(r"\]: ([0-9A-Za-z]+): to=<[^>]*>, .*?status=(\w+)")
# Postfix logs through postlogd (a datagram socket and a process of its own),
# after the SMTP reply: what a client saw answered shows up in the maillog
# later. Every read of the log for something that must be there waits for it,
# up to this many seconds.
LOG_TIMEOUT = 20
_DATA_DIRS = set()  # data directories outside base_dir, removed at exit
_QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


class PostfixError(RuntimeError):
    """Postfix could not be started or stopped."""


class PostfixInstance:
    """One Postfix (``postfix -c DIR``) running inside ``ns``.

    ``myhostname`` is a fully qualified name (``mydomain`` is the rest after its
    first label). ``base_dir`` is a directory of the caller; the instance uses
    ``base_dir/postfix-<ns.short>/{etc,spool,maillog}``, and ``data_dir`` as its
    data_directory (default ``/tmp/<ns.name>-postfix-data``, removed by ``stop``
    or at exit). ``inet_interfaces`` are the addresses smtpd listens on (port 25
    and, unless ``submission`` is false, 587). Relaying is permitted for
    ``mynetworks`` only; mail to ``<anyone>@<myhostname>`` is accepted as local
    mail. ``extra_main`` adds or overrides main.cf parameters. Addresses and
    networks of either family are written as they are (IPv6 ones are put in
    Postfix's brackets here); with an IPv6 address among ``inet_interfaces``
    the instance speaks both families (``inet_protocols = all``).
    """

    def __init__(
        self,
        ns,
        base_dir,
        myhostname,
        inet_interfaces,
        mynetworks,
        submission=True,
        extra_main=None,
        data_dir=None,
    ):
        self.ns = ns
        self.myhostname = myhostname
        self.inet_interfaces = list(inet_interfaces)
        self.mynetworks = list(mynetworks)
        self.submission = submission
        self.extra_main = dict(extra_main or {})
        self.root = Path(base_dir) / f"postfix-{ns.short}"
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        # Postfix opens data_directory files (master.lock) as the postfix
        # user, who cannot traverse pytest's 0700 /tmp/pytest-of-root (and
        # pytest resets that mode at every session start, so loosening it
        # breaks as soon as two sessions overlap): keep it outside base_dir.
        self.data_dir = Path(data_dir or Path(tempfile.gettempdir()) / f"{ns.name}-postfix-data")
        self.log_path = self.root / "maillog"
        self.master_pid = None

    def __repr__(self):
        return f"PostfixInstance({self.ns.name}, {self.myhostname})"

    # -- configuration -------------------------------------------------

    def main_cf(self):
        """The main.cf parameters of this instance, as a dict."""
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            "syslog_name": f"postfix-{self.ns.short}",
            "myhostname": self.myhostname,
            "mydomain": self.myhostname.split(".", 1)[-1],
            "myorigin": "$myhostname",
            "mydestination": "$myhostname, localhost",
            "mynetworks": " ".join(_bracketed(n) for n in self.mynetworks),
            "inet_interfaces": ", ".join(_bracketed(a) for a in self.inet_interfaces),
            # IPv6 only when smtpd listens on an IPv6 address: an IPv4-only
            # instance's main.cf is what it has always been.
            "inet_protocols": "all" if any(":" in a for a in self.inet_interfaces) else "ipv4",
            "relay_domains": "",
            "relayhost": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP",
            # Any local part of $myhostname is accepted (no passwd/alias lookups).
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "html_directory": "no",
            # No DNS inside the lab: no PTR lookups, no MX lookups, no delivery.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "defer_transports": ", ".join(DEFER_TRANSPORTS),
        }
        params.update(self.extra_main)
        return params

    def master_cf(self):
        """The master.cf text: smtpd on 25 (and 587) plus the internal services."""
        smtpd = ["smtp      inet  n       -       n       -       -       smtpd"]
        if self.submission:
            smtpd.append("submission inet n       -       n       -       -       smtpd")
        return MASTER_CF.format(smtpd="\n".join(smtpd))

    def write_config(self):
        """Create the directories and write main.cf and master.cf."""
        # The queue directory is root's and must exist (postfix chdir()s into
        # it); Postfix creates its subdirectories and the data directory
        # (owned by the postfix user, which it checks) at the first start.
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        past = time.time() - 10
        for name, text in (("main.cf", main), ("master.cf", self.master_cf())):
            path = self.config_dir / name
            path.write_text(text)
            # Postfix re-reads a main.cf modified in the last second until it
            # is older (~2 s of sleeping at every start after a rewrite).
            os.utime(path, (past, past))
        _DATA_DIRS.add(self.data_dir)

    # -- life cycle ----------------------------------------------------

    def postfix(self, *args, check=True, timeout=60):
        """Run ``postfix -c <config_dir> ARGS`` inside the namespace."""
        return self.ns.exec(
            ["postfix", "-c", str(self.config_dir), *args], check=check, timeout=timeout
        )

    def check(self, timeout=30):
        """``postfix -c DIR check``: ``(ok, output)``.

        Run on a pseudo-terminal: Postfix commands print errors to stderr only
        when it is a tty, and fatal errors raised before logging is set up
        (e.g. an inet_interfaces address missing) would be lost otherwise.
        """
        if not (self.config_dir / "main.cf").exists():
            self.write_config()
        argv = ["ip", "netns", "exec", self.ns.name, "postfix", "-c", str(self.config_dir)]
        returncode, output = _run_on_tty([*argv, "check"], timeout)
        return returncode == 0, output.strip()

    def start(self, timeout=30):
        """Start the master (writing the configuration first if there is none yet).

        Returns ``self`` once the master runs; its pid is tracked by the
        namespace, so it is killed at cleanup even if ``stop`` is never called.
        """
        if not (self.config_dir / "main.cf").exists():
            self.write_config()
        proc = self.postfix("start", check=False, timeout=timeout)
        if proc.returncode != 0:
            _ok, diagnosis = self.check()
            raise PostfixError(
                f"postfix start failed ({proc.returncode}): {proc.stderr.strip()}\n"
                f"postfix check: {diagnosis}\n{self.log_text()[-2000:]}"
            )
        self.master_pid = self._read_master_pid()
        self.ns.track_pid(self.master_pid)
        if not self.running():
            raise PostfixError(f"Postfix master {self.master_pid} is not running")
        return self

    def reload(self):
        """``postfix reload``: re-read main.cf/master.cf (see ``write_config``)."""
        self.postfix("reload")

    def running(self):
        """True while the master process runs (a zombie does not count)."""
        return self.master_pid is not None and _alive(self.master_pid)

    def stop(self, timeout=10):
        """``postfix stop``; then make sure the master and all its children are gone."""
        if self.master_pid is None:
            return
        if _alive(self.master_pid):
            self.postfix("stop", check=False, timeout=timeout + 10)
        deadline = time.monotonic() + timeout
        while live_processes(pgid=self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The master leads its own session and process group; kill what is left.
        for pid in live_processes(pgid=self.master_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.master_pid = None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _read_master_pid(self):
        text = (self.queue_dir / "pid" / "master.pid").read_text()
        return int(text.split()[0])

    # -- observation ---------------------------------------------------

    def log_text(self):
        """The instance's maillog so far ('' before the first line)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern, timeout=LOG_TIMEOUT):
        """Wait until the maillog matches ``pattern`` (regex); return the match."""
        return _poll(lambda: re.search(pattern, self.log_text()), timeout)

    def clients(self):
        """``{queue id: client IP}`` of every message smtpd accepted, from the maillog."""
        return dict(_CLIENT.findall(self.log_text()))

    def statuses(self):
        """``{queue id: [status of each delivery attempt]}`` from the maillog."""
        found = {}
        for queue_id, status in _STATUS.findall(self.log_text()):
            found.setdefault(queue_id, []).append(status)
        return found

    def wait_for_statuses(self, queue_ids, timeout=LOG_TIMEOUT):
        """
        The logged delivery statuses of ``queue_ids`` once each has at least
        one (or, after ``timeout`` seconds, those found): ``{queue id: [status]}``.
        """
        wanted = set(queue_ids)

        def found():
            return {q: s for q, s in self.statuses().items() if q in wanted}

        _poll(lambda: set(found()) == wanted, timeout)
        return found()

    def client_ips_seen(self):
        """Client IPs of smtpd 'connect from host[IP]' lines, in log order."""
        return [m.group(2) for m in _CONNECT.finditer(self.log_text())]

    def queue_ids(self):
        """
        Queue ids of all messages in the queue (all of them: nothing is
        delivered). A message that qmgr moves on (incoming, active, deferred)
        while the directories are walked is seen twice: it counts once.
        """
        ids = set()
        for sub in _QUEUE_SUBDIRS:
            for _dirpath, _dirs, files in os.walk(self.queue_dir / sub):
                ids.update(files)
        return sorted(ids)

    def accepted_count(self):
        """Number of messages accepted so far (every accepted message stays queued)."""
        return len(self.queue_ids())

    def postcat(self, queue_id):
        """The queue file of ``queue_id`` as text (envelope and content)."""
        return self.ns.exec(["postcat", "-c", str(self.config_dir), "-q", queue_id]).stdout


def _bracketed(address):
    """Postfix's form of an IPv6 address or network: '[2001:db8::]/64'; others unchanged."""
    if ":" not in address or address.startswith("["):
        return address
    host, slash, prefix = address.partition("/")
    return f"[{host}]{slash}{prefix}"


def wait_for_messages(instances, queue_ids, timeout=LOG_TIMEOUT):
    """
    Which instance accepted each message of ``queue_ids`` and from which
    client, read from the maillogs of ``instances`` (``{name: instance}``):
    ``{queue id: (name, client IP)}``, once every id has its ``client=`` line,
    or, after ``timeout`` seconds, as far as found.
    """
    wanted = set(queue_ids)

    def found():
        where = {}
        for name, instance in instances.items():
            for queue_id, client in instance.clients().items():
                if queue_id in wanted:
                    if queue_id in where:
                        raise AssertionError(f"queue id {queue_id} in two logs: {where[queue_id]}")
                    where[queue_id] = (name, client)
        return where

    _poll(lambda: set(found()) == wanted, timeout)
    return found()


def _poll(check, timeout):
    """``check()`` every 0.1 s until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _run_on_tty(argv, timeout):
    """Run ``argv`` with stdout and stderr on a pty; return (returncode, output)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.2)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait(timeout=10)
    return proc.returncode, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@atexit.register
def _remove_data_dirs():
    # Data directories of instances never stopped (a test that crashed).
    for path in _DATA_DIRS:
        shutil.rmtree(path, ignore_errors=True)
