"""
SMTP sessions from inside a test network namespace, with the real swaks client.

``send_mail`` runs one swaks transaction and returns its transcript parsed into
the server's replies, so a test can assert on the reply that decided the
transaction (e.g. 250 queued, 554 relay access denied).
"""

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

# swaks prefixes: " -> " client line, "<-  " server reply, "<** " server error
# reply, "*** " swaks' own error, "=== " information.
_REPLY = re.compile(r"^<(?:-  |\*\* )(\d{3})([ -])(.*)$")
_QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")
# swaks without Perl's IO::Socket::INET6 (Debian: libio-socket-inet6-perl) exits
# on an IPv6 server or local address without trying: not a broken path.
_NO_IPV6 = "IPv6 not available"


class SwaksError(RuntimeError):
    """swaks could not try the session at all (a missing part of its own)."""


@dataclass
class SmtpResult:
    """Outcome of one swaks run."""

    returncode: int
    transcript: str
    # (command, code, text): command is the first client line before the reply
    # ("<banner>" for the greeting, "<message>" for the end of DATA).
    replies: List[Tuple[str, int, str]] = field(default_factory=list)

    @property
    def ok(self):
        """swaks exited 0: the whole transaction was accepted."""
        return self.returncode == 0

    @property
    def code(self) -> Optional[int]:
        """The final reply code of the transaction (the QUIT reply does not count)."""
        for command, code, _text in reversed(self.replies):
            if command.upper() != "QUIT":
                return code
        return None

    @property
    def text(self):
        """The text of the final reply (see ``code``)."""
        for command, _code, text in reversed(self.replies):
            if command.upper() != "QUIT":
                return text
        return ""

    @property
    def queue_id(self) -> Optional[str]:
        """The server's queue id from '250 ... queued as ID', if any."""
        match = _QUEUED.search(self.text) if self.code == 250 else None
        return match.group(1) if match else None


def send_mail(
    ns,
    server,
    port=25,
    mail_from="sender@example.com",
    rcpt_to="postmaster@example.net",
    timeout=20,
    helo="client.example.com",
    local_interface=None,
    body=None,
    extra_args=(),
):
    """Send one message with swaks from namespace ``ns`` to ``server:port``.

    ``rcpt_to`` is an address or a list of them; ``local_interface`` picks the
    client's source address (swaks ``--local-interface``); ``timeout`` (seconds)
    bounds every wait for the server. ``server`` and ``local_interface`` may be
    IPv6 addresses (swaks then needs Perl's IO::Socket::INET6). Never raises on
    SMTP failure: see ``ok``; raises ``SwaksError`` when swaks could not try
    (so a probe expected to fail never passes for the wrong reason).
    """
    recipients = rcpt_to if isinstance(rcpt_to, str) else ",".join(rcpt_to)
    argv = [
        "swaks",
        "--server", str(server),
        "--port", str(port),
        "--from", mail_from,
        "--to", recipients,
        "--helo", helo,
        "--timeout", f"{int(timeout)}s",
    ]  # fmt: skip
    if local_interface:
        argv += ["--local-interface", str(local_interface)]
    if body is not None:
        argv += ["--body", body]
    argv += list(extra_args)
    proc = ns.exec(argv, check=False, timeout=timeout * 4 + 10)
    transcript = proc.stdout + proc.stderr
    if _NO_IPV6 in transcript:
        raise SwaksError(f"{transcript.strip()} (install libio-socket-inet6-perl)")
    return SmtpResult(proc.returncode, transcript, parse_replies(transcript))


def parse_replies(transcript):
    """Server replies of a swaks transcript as (command, code, text) tuples.

    A multi-line reply gives one tuple with its lines joined by newlines.
    """
    replies = []
    command = "<banner>"
    pending = []  # lines of a multi-line reply in progress
    fresh = True  # the next client line starts a new command
    for line in transcript.splitlines():
        if line.startswith(" -> "):
            if fresh:
                command = line[4:].strip()
                fresh = False
            continue
        match = _REPLY.match(line)
        if not match:
            continue
        code, more, text = int(match.group(1)), match.group(2) == "-", match.group(3)
        pending.append(text)
        if more:
            continue
        replies.append((command, code, "\n".join(pending)))
        pending = []
        fresh = True
        if code == 354:
            command = "<message>"
            fresh = False
    return replies
