"""Bounces end to end: RFC 3464 reports from MAILER-DAEMON with the null sender, through the
real ``dma`` executable, real spool files and real mailboxes."""

from __future__ import annotations

import email
import email.policy
import re
import time
from email.message import Message

import pytest

from conftest import DmaSite

pytestmark = pytest.mark.usefixtures("root_only")


def mbox_messages(data: bytes) -> list[tuple[bytes, Message]]:
    """(envelope sender from the From_ line, parsed message) for each message."""
    out = []
    for part in re.split(rb"(?m)^(?=From \S+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n)", data):
        if not part:
            continue
        first, _, rest = part.partition(b"\n")
        out.append((first.split()[1], email.message_from_bytes(rest, policy=email.policy.default)))
    return out


def report_parts(msg: Message) -> tuple[str, list[Message], Message]:
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, original = msg.get_payload()  # type: ignore[misc]
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return human.get_content(), blocks, original


def test_failed_local_recipient_bounces_to_sender(site: DmaSite) -> None:
    (site.mail / "daemon").symlink_to(site.root / "elsewhere")
    r = site.run("-D", "-f", "root@mail.test", "root", "daemon",
                 input=b"Subject: to two\n\nhello\n")
    assert r.returncode == 69, r.stderr  # EX_UNAVAILABLE: one recipient failed for good
    assert site.queue_ids() == []
    msgs = mbox_messages(site.mailbox("root").read_bytes())
    assert [m["Subject"] for _, m in msgs] == ["to two", "Undelivered Mail Returned to Sender"]
    env_from, bounce = msgs[1]
    assert env_from == b"MAILER-DAEMON"
    assert bounce["From"] == "Mail Delivery System <MAILER-DAEMON@mail.test>"
    assert bounce["Auto-Submitted"] == "auto-replied"
    text, blocks, original = report_parts(bounce)
    assert "daemon@mail.test" in text and "symbolic link" in text
    assert blocks[0]["Reporting-MTA"] == "dns; mail.test"
    (rcpt,) = blocks[1:]
    assert rcpt["Final-Recipient"] == "rfc822; daemon@mail.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"].startswith("5.")
    assert "symbolic link" in rcpt["Diagnostic-Code"]
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: to two" in original.get_payload()
    assert "hello" not in original.get_payload()


def test_fullbounce_carries_the_whole_message(site: DmaSite) -> None:
    site.write_conf("FULLBOUNCE\n")
    (site.mail / "daemon").symlink_to(site.root / "elsewhere")
    body = b"Subject: full\n\n" + b"line\n" * 1000 + b"no newline at end"
    site.run("-D", "-f", "root@mail.test", "daemon", input=body)
    (_, bounce), = mbox_messages(site.mailbox("root").read_bytes())
    _, _, original = report_parts(bounce)
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "full"
    assert inner.get_payload().endswith("line\nno newline at end\n")


def test_bounce_to_unknown_sender_goes_to_postmaster(site: DmaSite) -> None:
    (site.mail / "daemon").symlink_to(site.root / "elsewhere")
    r = site.run("-D", "-f", "ghost-user-xyz@mail.test", "daemon", input=b"Subject: g\n\nx\n")
    assert r.returncode == 69
    (env_from, bounce), = mbox_messages(site.mailbox("root").read_bytes())  # postmaster: root
    assert env_from == b"MAILER-DAEMON"
    assert bounce["To"] == "postmaster@mail.test"
    assert site.queue_ids() == []


def test_bounce_is_never_bounced(site: DmaSite) -> None:
    # Null sender, failing recipient: the report goes to the postmaster once ...
    (site.mail / "daemon").symlink_to(site.root / "elsewhere")
    site.run("-D", "-f", "<>", "daemon", input=b"Subject: n\n\nx\n")
    (_, notice), = mbox_messages(site.mailbox("root").read_bytes())
    assert notice["To"] == "postmaster@mail.test"
    # ... and when the postmaster cannot receive it either, it is dropped with a log line.
    site.mailbox("root").unlink()
    site.mailbox("root").symlink_to(site.root / "elsewhere")
    site.run("-D", "-f", "<>", "daemon", input=b"Subject: n2\n\nx\n")
    assert site.queue_ids() == []
    log = (site.root / "dma.log").read_text()
    assert "undeliverable notice to the postmaster dropped" in log


def test_lifetime_expiry_bounces_deferred_recipients(site: DmaSite) -> None:
    # A resolver where nothing answers: the MX lookup defers the remote recipient.
    site.write_conf("RESOLVER 127.0.0.1:9\nCONNECT_TIMEOUT 1\nLIFETIME 2s\n")
    r = site.run("-D", "-f", "root@mail.test", "someone@example.org", input=b"Subject: l\n\nx\n")
    assert r.returncode == 75, r.stderr  # EX_TEMPFAIL: still queued
    assert len(site.queue_ids()) == 1
    listing = site.run("-bp").stdout
    assert b"someone@example.org" in listing and b"deferred" in listing
    time.sleep(2.2)
    assert site.run("-q").returncode == 0
    assert site.queue_ids() == []
    (_, bounce), = mbox_messages(site.mailbox("root").read_bytes())
    text, blocks, _ = report_parts(bounce)
    assert "gave up after" in text
    assert blocks[1]["Final-Recipient"] == "rfc822; someone@example.org"
    assert blocks[1]["Status"].startswith("5.")
