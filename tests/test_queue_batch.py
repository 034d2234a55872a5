"""A queue run sends the messages that share a destination back to back over one session,
pipelined (one round trip per message), and still gives every message its own outcome:
the real ``dma -q`` against a real SMTP server on loopback."""

from __future__ import annotations

import os
import time

import dma
from conftest import DmaSite
from dma.spool import Spool
from smtpd import Behaviour, ScriptedServer, Transaction, closed_port, over_data

SENDER = "sender@example.net"


def _body(i: int, size: int = 0) -> bytes:
    text = (f"Subject: message {i}\n\nmarker-{i:04d}\n.a line to dot-stuff\n.\n"
            f"{'x' * 1200}\nend of {i}\n").encode()
    while len(text) < size:
        text += b"filler line of the large message %d\n" % len(text)
    return text


def _fill(site: DmaSite, bodies: list[bytes], rcpt: str = "rcpt@example.org") -> list[str]:
    ids = [dma.send(b, recipients=[rcpt], sender=SENDER, config=str(site.conf), deliver=False)
           for b in bodies]
    assert set(ids) <= set(site.queue_ids())
    return ids


def _received_body(t: Transaction) -> bytes:
    return t.data.split(b"\r\n\r\n", 1)[1]


def _by_marker(server: ScriptedServer) -> dict[int, list[Transaction]]:
    found: dict[int, list[Transaction]] = {}
    for t in server.transactions:
        if not t.mail_from:
            continue  # a bounce
        i = int(t.data.split(b"marker-", 1)[1][:4]) if b"marker-" in t.data else -1
        found.setdefault(i, []).append(t)
    return found


def _smarthost(site: DmaSite, server: ScriptedServer) -> None:
    site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {server.port}\n")


def test_one_session_one_round_trip_per_message(site: DmaSite) -> None:
    bodies = [_body(i, 300_000 if i == 7 else 0) for i in range(25)]
    with ScriptedServer(Behaviour()) as server:
        _smarthost(site, server)
        _fill(site, bodies)
        r = site.run("-q")
        assert r.returncode == 0, r.stderr
        server.wait_closed()
    assert site.queue_ids() == []
    (sess,) = server.sessions
    got = _by_marker(server)
    assert sorted(got) == list(range(25))
    for i, body in enumerate(bodies):
        (t,) = got[i]
        assert t.rcpts == ["rcpt@example.org"] and t.mail_from == SENDER
        assert _received_body(t) == over_data(body).split(b"\r\n\r\n", 1)[1]
    # The next message's MAIL, RCPT and DATA travel with the previous message's end of
    # data -- except after the large message, which is streamed on its own.
    pipelined = [tail.startswith(b"MAIL FROM:") for tail in sess.after_data]
    assert pipelined == [True] * 6 + [False, False] + [True] * 16 + [False]
    log = (site.root / "dma.log").read_text()
    assert log.count("status=delivered") == 25


def test_each_message_keeps_its_own_outcome(site: DmaSite) -> None:
    def rcpt(addr: str) -> bytes:
        return b"550 5.1.1 no such user\r\n" if addr.startswith("gone") else b"250 2.1.5 Ok\r\n"

    def final(t: Transaction) -> bytes:
        if b"marker-0005" in t.data:
            return b"451 4.3.0 try again later\r\n"
        return b"250 2.0.0 Ok: queued\r\n"

    with ScriptedServer(Behaviour(rcpt_reply=rcpt, final_reply=final)) as server:
        _smarthost(site, server)
        ids = []
        for i in range(10):
            ids += _fill(site, [_body(i)], "gone@example.org" if i == 3 else "r@example.org")
        r = site.run("-q")
        assert r.returncode == 0, r.stderr
        server.wait_closed()
    # Message 5 stays queued with its deferral journalled; message 3 bounced to its sender.
    assert site.queue_ids() == [ids[5]]
    journal = (site.spool / "journal" / ids[5]).read_text()
    assert '"status":"deferred"' in journal and "try again later" in journal
    got = _by_marker(server)
    assert sorted(i for i in got if i >= 0) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert all(len(got[i]) == 1 for i in got if i >= 0)
    bounces = [t for t in server.transactions if t.mail_from == "" and t.rcpts == [SENDER]]
    assert len(bounces) == 1 and b"no such user" in bounces[0].data
    assert b"message 3" in bounces[0].data


def test_server_that_closes_after_each_message(site: DmaSite) -> None:
    # The commands sent along with a message's end of data get no answer: that message is
    # delivered, the next one goes over a new session in the same run.
    with ScriptedServer(Behaviour(close_after=frozenset({"DOT"}))) as server:
        _smarthost(site, server)
        _fill(site, [_body(i) for i in range(6)])
        r = site.run("-q")
        assert r.returncode == 0, r.stderr
        server.wait_closed()
    assert site.queue_ids() == []
    got = _by_marker(server)
    assert sorted(got) == list(range(6)) and all(len(v) == 1 for v in got.values())
    assert len(server.sessions) == 6


def test_connection_lost_mid_batch_defers_only_the_message_in_flight(site: DmaSite) -> None:
    bodies = [_body(i, 200_000 if i == 4 else 0) for i in range(9)]
    with ScriptedServer(Behaviour(drop_after_data_bytes=100_000)) as server:
        _smarthost(site, server)
        ids = _fill(site, bodies)
        r = site.run("-q")
        assert r.returncode == 0, r.stderr
        server.wait_closed()
    assert site.queue_ids() == [ids[4]]
    journal = (site.spool / "journal" / ids[4]).read_text()
    assert "may be sent more than once" in journal
    got = _by_marker(server)
    assert sorted(got) == [0, 1, 2, 3, 5, 6, 7, 8] and all(len(v) == 1 for v in got.values())
    assert len(server.sessions) == 2


def test_server_without_pipelining_gets_one_command_at_a_time(site: DmaSite) -> None:
    with ScriptedServer(Behaviour(pipelining=False)) as server:
        _smarthost(site, server)
        _fill(site, [_body(i) for i in range(5)])
        assert site.run("-q").returncode == 0
        server.wait_closed()
    assert site.queue_ids() == []
    (sess,) = server.sessions
    assert all(len(b) == 1 for b in sess.batches)
    assert sorted(_by_marker(server)) == list(range(5))


def test_chunking_server_gets_bdat_per_message(site: DmaSite) -> None:
    bodies = [_body(i) for i in range(5)]
    with ScriptedServer(Behaviour(chunking=True)) as server:
        _smarthost(site, server)
        _fill(site, bodies)
        assert site.run("-q").returncode == 0
        server.wait_closed()
    assert site.queue_ids() == []
    assert len(server.sessions) == 1
    got = _by_marker(server)
    for i, body in enumerate(bodies):
        (t,) = got[i]
        assert t.via == "BDAT"
        assert _received_body(t) == body.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def test_damaged_queue_file_is_skipped_and_the_rest_delivered(site: DmaSite) -> None:
    with ScriptedServer(Behaviour()) as server:
        _smarthost(site, server)
        ids = _fill(site, [_body(i) for i in range(6)])
        victim = site.spool / "queue" / ids[2]
        data = bytearray(victim.read_bytes())
        at = data.index(b"marker-0002")
        data[at] ^= 0x20
        victim.write_bytes(bytes(data))
        r = site.run("-q")
        assert r.returncode == 0, r.stderr
        server.wait_closed()
    assert site.queue_ids() == [ids[2]]
    assert sorted(_by_marker(server)) == [0, 1, 3, 4, 5]
    assert len(server.sessions) == 1
    assert "refusing to deliver a damaged queue file" in (site.root / "dma.log").read_text()


def test_unreachable_smarthost_is_tried_once_per_run(site: DmaSite) -> None:
    site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {closed_port()}\n")
    ids = _fill(site, [_body(i) for i in range(8)])
    t0 = time.monotonic()
    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    assert site.queue_ids() == sorted(ids)
    log = (site.root / "dma.log").read_text()
    assert log.count("status=deferred") == 8
    for qid in ids:
        assert '"status":"deferred"' in (site.spool / "journal" / qid).read_text()


def test_messages_to_other_destinations_are_not_batched_together(site: DmaSite) -> None:
    # A local recipient in between ends a run of smarthost messages; each part is
    # delivered, the smarthost messages over the one session.
    with ScriptedServer(Behaviour()) as server:
        _smarthost(site, server)
        ids = _fill(site, [_body(i) for i in range(3)])
        ids += _fill(site, [_body(3)], "root")
        ids += _fill(site, [_body(i) for i in range(4, 7)])
        assert len(os.listdir(site.spool / "queue")) == 7
        assert site.run("-q").returncode == 0
        server.wait_closed()
    assert site.queue_ids() == []
    assert sorted(_by_marker(server)) == [0, 1, 2, 4, 5, 6]
    assert b"marker-0003" in site.mailbox().read_bytes()


def test_size_comes_from_the_envelope_and_is_exact(site: DmaSite) -> None:
    # SIZE= is the message with CRLF line ends (before dot-stuffing and the wrapping of long
    # lines); the line count recorded at submission saves a pass over the queue file.  CRLF
    # and LF input both give the exact size.
    bodies = [_body(0), _body(1).replace(b"\n", b"\r\n"), _body(2, 400_000)]
    with ScriptedServer(Behaviour(size=0)) as server:
        _smarthost(site, server)
        expected = []
        for qid in _fill(site, bodies):
            msg, env = Spool(str(site.spool)).open(qid)
            with msg:
                assert env.lines == sum(c.count(b"\n") for c in msg.cursor("raw")) > 0
                expected.append(sum(len(c) for c in msg.cursor("crlf")))
        assert site.run("-q").returncode == 0
        server.wait_closed()
    got = _by_marker(server)
    for i in range(3):
        (t,) = got[i]
        assert t.mail_params == [f"SIZE={expected[i]}"]


def _damage(site: DmaSite, qid: str, marker: bytes) -> None:
    victim = site.spool / "queue" / qid
    data = bytearray(victim.read_bytes())
    data[data.index(marker)] ^= 0x20
    victim.write_bytes(bytes(data))


def test_a_fresh_message_damaged_before_its_first_attempt_is_never_completed(
        site: DmaSite) -> None:
    # Right after submission the file is not read once more just to check it; the copy
    # being sent is checked as it is read, and its end (the dot) never goes out.
    from dma import config as config_mod
    from dma.log import Log
    from dma.queue import deliver_message

    big = _body(1, 600_000)  # streamed, not read whole
    with ScriptedServer(Behaviour()) as server:
        _smarthost(site, server)
        cfg = config_mod.load(str(site.conf))
        log = Log(use_syslog=False, fallback_path=str(site.root / "dma.log"))
        for body in (_body(0), big):
            (qid,) = _fill(site, [body])
            _damage(site, qid, b"end of ")
            result = deliver_message(Spool(cfg.spooldir), qid, cfg, log, fresh=True)
            (o,) = result.outcomes
            assert o.status == "deferred" and "CRC mismatch" in o.reply, o
        r = site.run("-q")  # a queue run checks first and leaves them alone
        assert r.returncode == 0, r.stderr
        server.wait_closed()
    assert server.transactions == []
    assert len(site.queue_ids()) == 2
    assert (site.root / "dma.log").read_text().count("refusing to deliver a damaged") == 2


def test_a_fresh_local_copy_of_a_damaged_message_is_taken_back(site: DmaSite) -> None:
    from dma import config as config_mod
    from dma.log import Log
    from dma.queue import deliver_message

    # (The bounce to the sender waits: the smarthost is not listening.)
    site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {closed_port()}\n")
    cfg = config_mod.load(str(site.conf))
    (qid,) = _fill(site, [_body(0, 300_000)], "root")
    _damage(site, qid, b"end of ")
    result = deliver_message(Spool(cfg.spooldir), qid, cfg,
                             Log(use_syslog=False, fallback_path=str(site.root / "dma.log")),
                             fresh=True)
    (o,) = result.outcomes
    assert o.status == "failed" and "damaged" in o.reply, o
    mbox = site.mailbox()
    assert not mbox.exists() or b"marker-0000" not in mbox.read_bytes()
