"""The queue as an operator meets it: ``dma queue list/show/hold/release/delete/flush/run``,
``mailq``, retry timing and damaged queue files, through the installed executable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import DmaSite

pytestmark = pytest.mark.usefixtures("root_only")

DEAD_DNS = "RESOLVER 127.0.0.1:9\nCONNECT_TIMEOUT 1\n"


def queue_one(site: DmaSite, *rcpts: str, subject: str = "q") -> str:
    before = set(site.queue_ids())
    r = site.run("-bq", "-f", "root@mail.test", *rcpts,
                 input=f"Subject: {subject}\n\nbody\n".encode())
    assert r.returncode == 0, r.stderr
    (qid,) = set(site.queue_ids()) - before
    return qid


def listing(site: DmaSite) -> dict:  # type: ignore[type-arg]
    r = site.run("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_list_json_and_show(site: DmaSite) -> None:
    assert listing(site) == {"count": 0, "size": 0, "messages": []}
    qid = queue_one(site, "root", "daemon")
    doc = listing(site)
    (m,) = doc["messages"]
    assert m["id"] == qid and m["sender"] == "root@mail.test" and not m["held"]
    assert [r["recipient"] for r in m["recipients"]] == ["root", "daemon"]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in m["recipients"])
    shown = site.run("queue", "show", qid)
    assert shown.returncode == 0, shown.stderr
    assert b"sender: <root@mail.test>" in shown.stdout and b"Subject: q" in shown.stdout
    missing = site.run("queue", "show", "NOSUCHID")
    assert missing.returncode != 0 and b"no message NOSUCHID" in missing.stderr


def test_hold_release_delete(site: DmaSite) -> None:
    held = queue_one(site, "root", subject="held")
    gone = queue_one(site, "root", subject="gone")
    assert site.run("queue", "hold", held).returncode == 0
    assert site.run("queue", "delete", gone).returncode == 0
    assert b"on hold" in site.run(prog="mailq").stdout
    assert site.run("-q").returncode == 0
    assert not site.mailbox().exists()  # held: not delivered; deleted: gone
    assert listing(site)["messages"][0]["held"] is True
    assert site.run("queue", "release", held).returncode == 0
    assert site.run("queue", "flush").returncode == 0
    mbox = site.mailbox().read_bytes()
    assert b"Subject: held" in mbox and b"Subject: gone" not in mbox
    assert listing(site)["count"] == 0


def test_retry_waits_for_backoff(site: DmaSite) -> None:
    site.write_conf(DEAD_DNS + "RETRY_MIN 2s\nRETRY_MAX 4s\n")
    qid = queue_one(site, "someone@example.org")
    assert site.run("queue", "run").returncode == 0  # never tried: due now
    rcpt = listing(site)["messages"][0]["recipients"][0]
    assert rcpt["status"] == "deferred" and rcpt["attempts"] == 1
    assert rcpt["next_attempt"] == pytest.approx(rcpt["last_attempt"] + 2, abs=0.01)
    assert "4.4.3" == rcpt["dsn"]
    assert site.run("queue", "run").returncode == 0  # not due yet: untouched
    assert listing(site)["messages"][0]["recipients"][0]["attempts"] == 1
    time.sleep(2.1)
    assert site.run("queue", "run").returncode == 0
    rcpt = listing(site)["messages"][0]["recipients"][0]
    assert rcpt["attempts"] == 2
    assert rcpt["next_attempt"] == pytest.approx(rcpt["last_attempt"] + 4, abs=0.01)
    # -q ignores retry times, as C dma and Postfix do
    assert site.run("-q").returncode == 0
    assert listing(site)["messages"][0]["recipients"][0]["attempts"] == 3
    mailq = site.run(prog="mailq").stdout
    assert qid.encode() in mailq and b"deferred after 3 attempts; next try" in mailq


def test_damaged_queue_file_is_refused_not_delivered(site: DmaSite) -> None:
    bad = queue_one(site, "root", subject="bad")
    good = queue_one(site, "root", subject="good")
    path = Path(site.spool, "queue", bad)
    data = bytearray(path.read_bytes())
    data[data.index(b"body")] ^= 0x20  # one flipped bit in the message text
    path.write_bytes(bytes(data))
    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    mbox = site.mailbox().read_bytes()
    assert b"Subject: good" in mbox and b"Subject: bad" not in mbox
    assert site.queue_ids() == [bad]
    log = (site.root / "dma.log").read_text()
    assert f"{bad}: refusing to deliver a damaged queue file" in log
    # truncated by hand: listed as unreadable, never delivered
    path.write_bytes(bytes(data[: len(data) // 2]))
    assert b"unreadable" in site.run(prog="mailq").stdout
    assert site.run("-q").returncode == 0
    assert site.mailbox().read_bytes() == mbox
    assert good not in site.queue_ids()


def test_delay_warning_sent_once(site: DmaSite) -> None:
    site.write_conf(DEAD_DNS + "DELAY_WARNING 1s\n")
    queue_one(site, "someone@example.org", subject="slow")
    time.sleep(1.1)
    assert site.run("-q").returncode == 0
    assert site.run("-q").returncode == 0
    mbox = site.mailbox().read_bytes()
    assert mbox.count(b"Subject: Delayed Mail (still being retried)") == 1
    assert b"Action: delayed" in mbox and b"Will-Retry-Until:" in mbox
    assert len(site.queue_ids()) == 1
