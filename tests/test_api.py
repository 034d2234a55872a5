"""``import dma``: the library interface, with real spool files and real mailboxes."""

from __future__ import annotations

import io
import os
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

import dma
from conftest import DmaSite
from dma.spool import Spool


def test_send_email_message_bytes_and_files(site: DmaSite, root_only: None) -> None:
    cfg = dma.load_config(str(site.conf))
    m = EmailMessage()
    m["To"] = "root"
    m["Bcc"] = "daemon"
    m["Subject"] = "from the library"
    m.set_content("line one\n.\nline three\n")
    q1 = dma.send(m, config=cfg, deliver=False)
    q2 = dma.send(b"Subject: bytes\n\nraw\n", recipients=["root"], config=str(site.conf),
                  deliver=False)
    src = site.root / "msg.eml"
    src.write_bytes(b"Subject: file\n\nfrom a file\n")
    with open(src, "rb") as f:
        q3 = dma.send(f, recipients=["root"], config=cfg, deliver=False)
    q4 = dma.send(io.BytesIO(b"Subject: bio\n\n" + b"b" * 3_000_000), recipients=["root"],
                  config=cfg, deliver=False)
    assert sorted([q1, q2, q3, q4]) == site.queue_ids()
    spool = Spool(str(site.spool))
    _, env = spool.open(q1)
    assert env.recipients == ("root", "daemon")
    msg, _ = spool.open(q1)
    raw = b"".join(msg.cursor("raw"))
    assert b"Bcc" not in raw and b"line one\n.\nline three\n" in raw
    msg, _ = spool.open(q4)
    assert msg.size > 3_000_000


def test_send_delivers_in_background(site: DmaSite, root_only: None) -> None:
    qid = dma.send(b"Subject: bg\n\nhello\n", recipients=["root"], config=str(site.conf))
    data = site.wait_mailbox("root")
    assert f"id {qid}".encode() in data
    deadline = time.monotonic() + 10
    while site.queue_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.queue_ids() == []


def test_typed_errors(site: DmaSite) -> None:
    cfg = dma.load_config(str(site.conf))
    with pytest.raises(dma.AddressError) as e:
        dma.send(b"\nx\n", recipients=["a@@b"], config=cfg)
    assert e.value.exit_code == 65
    with pytest.raises(dma.UnknownUserError, match="no-such-user-xyz"):
        dma.send(b"\nx\n", recipients=["no-such-user-xyz"], config=cfg)
    with pytest.raises(dma.NoRecipientsError):
        dma.send(b"Subject: none\n\nx\n", config=cfg)
    bad = site.root / "bad.conf"
    bad.write_text("NOPE\n")
    with pytest.raises(dma.ConfigError, match="bad.conf:1"):
        dma.send(b"\nx\n", recipients=["root"], config=str(bad))
    assert site.queue_ids() == []
    assert not (Path(site.spool) / "tmp").exists() or os.listdir(site.spool / "tmp") == []
