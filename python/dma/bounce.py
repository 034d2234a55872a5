"""Delivery status notifications (RFC 3464): one ``multipart/report`` per message listing every
recipient that failed (or, for a delay notice, is still being retried), from MAILER-DAEMON
with the null envelope sender, spooled through the normal submission path.

The report is streamed into the spool (the original message, with FULLBOUNCE, is read through
a cursor, never held in memory).  A bounce of a bounce goes to the postmaster once; a failure
of that is only logged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

from dma import _core
from dma.config import Config
from dma.spool import Envelope, RecipientState

POSTMASTER = "postmaster"
NOTICE_BOUNCE = "bounce"
NOTICE_POSTMASTER = "postmaster"


def _rfc822_date(t: float) -> str:
    from dma.message import _format_date

    return _format_date(t)


def _diagnostic(reply: str) -> str:
    kind = "smtp" if reply[:3].isdigit() else "x-dma"
    return f"{kind}; {' '.join(reply.split())}"


def _final_recipient(rcpt: str, config: Config) -> str:
    return rcpt if "@" in rcpt else f"{rcpt}@{config.mailname}"


def render(env: Envelope, msg: _core.MessageFile, states: Sequence[RecipientState],
           config: Config, *, delayed: bool = False, now: float | None = None,
           notice_to_postmaster: bool = False) -> Iterator[bytes]:
    """The report as chunks of bytes (LF line endings, as the spool stores them)."""
    now = time.time() if now is None else now
    boundary = f"{env.id}/{config.mailname}"
    to = f"{POSTMASTER}@{config.mailname}" if notice_to_postmaster else env.sender
    if delayed:
        subject = "Delayed Mail (still being retried)"
        lead = ("This is the mail system at host {h}.\n\n"
                "Your message could not be delivered yet to the recipients below. The mail\n"
                "system will keep trying; you do not need to send it again.\n")
    else:
        subject = "Undelivered Mail Returned to Sender"
        lead = ("This is the mail system at host {h}.\n\n"
                "Your message could not be delivered to one or more recipients. The reasons\n"
                "are given below.\n")
    human = [lead.format(h=config.mailname), "\n"]
    for st in states:
        human.append(f"<{_final_recipient(st.recipient, config)}>: {st.reply or st.status}\n")
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{config.mailname}>\n"
        f"To: <{to}>\n"
        f"Subject: {subject}\n"
        f"Date: {_rfc822_date(now)}\n"
        f"Auto-Submitted: auto-replied\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\n"
        f"\tboundary=\"{boundary}\"\n"
        f"\n"
        f"This is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        f"Content-Description: Notification\n"
        f"Content-Type: text/plain; charset=utf-8\n"
        f"Content-Transfer-Encoding: 8bit\n\n"
        + "".join(human)
        + f"\n--{boundary}\n"
        f"Content-Description: Delivery report\n"
        f"Content-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; {config.mailname}\n"
        f"X-Dma-Queue-ID: {env.id}\n"
        f"Arrival-Date: {_rfc822_date(env.created)}\n"
    )
    yield head.encode()
    for st in states:
        action = "delayed" if delayed else "failed"
        status = st.dsn or ("4.0.0" if delayed else "5.0.0")
        block = (f"\nFinal-Recipient: rfc822; {_final_recipient(st.recipient, config)}\n"
                 f"Action: {action}\nStatus: {status}\n")
        if st.relay and not st.relay.startswith(("mbox:", "maildir:")):
            block += f"Remote-MTA: dns; {st.relay.split('[', 1)[0]}\n"
        if st.reply:
            block += f"Diagnostic-Code: {_diagnostic(st.reply)}\n"
        if st.last_attempt:
            block += f"Last-Attempt-Date: {_rfc822_date(st.last_attempt)}\n"
        if delayed:
            block += f"Will-Retry-Until: {_rfc822_date(env.created + config.lifetime)}\n"
        yield block.encode()
    if config.fullbounce:
        yield (f"\n--{boundary}\nContent-Description: Undelivered Message\n"
               f"Content-Type: message/rfc822\n\n").encode()
        last = b"\n"
        for chunk in msg.cursor("raw"):
            if chunk:
                last = chunk[-1:]
            yield chunk
        if last != b"\n":
            yield b"\n"
    else:
        yield (f"\n--{boundary}\nContent-Description: Undelivered Message Headers\n"
               f"Content-Type: text/rfc822-headers\n\n").encode()
        head_block = msg.read_head(1 << 20)
        yield head_block.rstrip(b"\n") + b"\n"
    yield f"\n--{boundary}--\n".encode()


def send(env: Envelope, msg: _core.MessageFile, states: Sequence[RecipientState],
         config: Config, *, delayed: bool = False) -> str:
    """Spool the notice; returns its queue id.  A sender that cannot receive it (an address
    refused at submission) makes it go to the postmaster instead.  Raises what submission
    raises otherwise (the caller then keeps the original message and tries again later)."""
    from dma.errors import DataError

    if env.sender:
        try:
            return _submit(env, msg, states, config, env.sender, NOTICE_BOUNCE, delayed)
        except DataError:
            pass
    return _submit(env, msg, states, config, POSTMASTER, NOTICE_POSTMASTER, delayed)


def _submit(env: Envelope, msg: _core.MessageFile, states: Sequence[RecipientState],
            config: Config, rcpt: str, notice: str, delayed: bool) -> str:
    from dma.submit import Request, Submitter, submit_chunks

    request = Request(recipients=(rcpt,), sender="<>", dot_ends=False)
    report = render(env, msg, states, config, delayed=delayed,
                    notice_to_postmaster=notice == NOTICE_POSTMASTER)
    return submit_chunks(report, request, config, notice=notice,
                         submitter=Submitter("MAILER-DAEMON", os.getuid()))
