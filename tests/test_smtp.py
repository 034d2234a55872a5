"""dma.smtp against real SMTP servers on loopback (tests/smtpd.py): byte-exact round trips
over DATA and BDAT, PIPELINING, SIZE/8BITMIME/SMTPUTF8, per-recipient outcomes, and peers
that misbehave."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dma.config import Config
from dma.log import Log
from dma.outcome import Outcome
from dma.route import Destination, Host
from dma.smtp import Connection, DeliveryError, deliver, wire_size
from smtpd import AioSink, Behaviour, ScriptedServer, closed_port, crlf, over_data, spool_message

MB = 1 << 20


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """Every test ends within two minutes, whatever a server does."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError("test took longer than 120 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def config(**kw: Any) -> Config:
    base: dict[str, Any] = dict(mailname="client.test", connect_timeout=5.0,
                                greeting_timeout=10.0, mail_timeout=10.0, rcpt_timeout=10.0,
                                data_timeout=10.0, datablock_timeout=10.0, dot_timeout=10.0)
    base.update(kw)
    return Config(**base)


def host(srv: ScriptedServer | AioSink, name: str = "localhost") -> Host:
    return Host(name, srv.port, (srv.host,))


def run(msg: Any, rcpts: list[str], hosts: list[Host], cfg: Config | None = None,
        log: Log | None = None, sender: str = "sender@client.test",
        kind: str = "smarthost") -> list[Outcome]:
    dest = Destination(kind, hosts[0].name if hosts else "nowhere", tuple(rcpts))
    return deliver(msg, sender, rcpts, hosts, dest, cfg or config(), None,
                   log or Log(use_syslog=False, fallback_path=os.devnull), queue_id="Q1")


def statuses(outs: list[Outcome]) -> dict[str, str]:
    return {o.recipient: o.status for o in outs}


def sample_body(size: int, seed: int = 1) -> bytes:
    """Mail-like text of exactly ``size`` bytes, full of lines that need care."""
    rnd = random.Random(seed)
    specials = [b".", b"..", b".leading dot", b"From me", b">From x", b"", b"\0nul\0", b" ",
                b"x" * 1200, b"\t.tab"]
    out = bytearray(b"Subject: test\n\n")
    while len(out) < size:
        if rnd.random() < 0.3:
            out += rnd.choice(specials) + b"\n"
        else:
            out += bytes(rnd.randrange(32, 127) for _ in range(rnd.randrange(0, 90))) + b"\n"
    return bytes(out[:size])


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


# -- byte-exact round trips ---------------------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("size", [0, 1, MB, 10 * MB], ids=["0B", "1B", "1MB", "10MB"])
def test_round_trip_sizes(tmp: Path, size: int, chunking: bool) -> None:
    body = sample_body(size) if size > 1 else b"x" * size
    msg = spool_message(tmp, body)
    with ScriptedServer(Behaviour(chunking=chunking)) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert statuses(outs) == {"a@x.test": "delivered", "b@x.test": "delivered"}
    (txn,) = srv.transactions
    assert txn.via == ("BDAT" if chunking else "DATA")
    assert txn.rcpts == ["a@x.test", "b@x.test"]
    assert txn.data == (crlf(body) if chunking else over_data(body))
    assert txn.bare_lf == 0


BODIES = {
    "dots": b".\n..\n...\n.x\n\n.\n",
    "dot-only-last": b"a\n.",
    "from-lines": b"From a\nFrom b\n>From c\n",
    "no-final-newline": b"Subject: x\n\nno newline at the end",
    "nul": b"a\0b\n\0\n\0",
    "crlf-input": b"Subject: x\r\n\r\nline\r\n.dot\r\n",
    "bare-cr": b"a\rb\n\r\n",
    "long-line": b"Subject: long\n\n" + b"y" * 5000 + b"\n",
    "eight-bit": "Subject: café\n\nnaïve ünïcødé\n".encode(),
    "only-newlines": b"\n\n\n",
}


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("name", list(BODIES))
def test_round_trip_special(tmp: Path, name: str, chunking: bool) -> None:
    body = BODIES[name]
    msg = spool_message(tmp, body)
    with ScriptedServer(Behaviour(chunking=chunking)) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert outs[0].status == "delivered", outs
    (txn,) = srv.transactions
    assert txn.data == (crlf(body) if chunking else over_data(body))


def test_round_trip_aiosmtpd(tmp: Path) -> None:
    body = sample_body(200_000).replace(b"x" * 1200, b"x" * 900)  # aiosmtpd: 1000-byte lines
    msg = spool_message(tmp, body)
    with AioSink() as sink:
        outs = run(msg, ["a@x.test", "b@y.test"], [host(sink)])
    assert statuses(outs) == {"a@x.test": "delivered", "b@y.test": "delivered"}
    (got,) = sink.messages
    assert got.content == over_data(body)
    assert got.rcpt_tos == ["a@x.test", "b@y.test"]
    assert got.mail_from == "sender@client.test"


def test_round_trip_ipv6(tmp: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    body = sample_body(50_000)
    msg = spool_message(tmp, body)
    try:
        srv = ScriptedServer(Behaviour(), host="::1")
    except OSError:
        pytest.skip("no ::1")
    with srv:
        outs = run(msg, ["a@x.test"], [Host("localhost", srv.port, ("::1",))])
    assert outs[0].status == "delivered"
    assert outs[0].relay == f"localhost[::1]:{srv.port}"
    assert srv.transactions[0].data == over_data(body)


_body_strategy = st.binary(max_size=3000) | st.lists(
    st.sampled_from([b".", b"..", b"\n", b"\r\n", b"\r", b"From ", b"a", b"\0", b".\r\n",
                     b"\n.\n", "é".encode()]), max_size=200).map(b"".join)


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_hypothesis_round_trip(tmp_path_factory: pytest.TempPathFactory, chunking: bool) -> None:
    """Random bodies through one reused connection into the real server."""
    srv = ScriptedServer(Behaviour(chunking=chunking)).start()
    conn = Connection(host(srv), config())
    conn.open()
    counter = iter(range(10**9))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=_body_strategy)
    def check(body: bytes) -> None:
        n = next(counter)
        msg = spool_message(tmp_path_factory.mktemp("h"), body, name=f"m{n}")
        before = len(srv.transactions)
        (out,) = conn.send(msg, "s@client.test", ["r@x.test"])
        assert out.status == "delivered", out
        txn = srv.transactions[before]
        assert txn.data == (crlf(body) if chunking else over_data(body))

    try:
        check()
    finally:
        conn.close()
        srv.stop()
    assert len(srv.sessions) == 1  # one connection for every example


# -- the transaction: PIPELINING, SIZE, 8BITMIME, SMTPUTF8 -----------------------------------


def test_pipelining_one_batch(tmp: Path) -> None:
    msg = spool_message(tmp, b"Subject: p\n\nbody\n")
    rcpts = [f"r{i}@x.test" for i in range(20)]
    with ScriptedServer(Behaviour(pipelining=True)) as srv:
        outs = run(msg, rcpts, [host(srv)])
    assert all(o.status == "delivered" for o in outs)
    (sess,) = srv.sessions
    batch = sess.batches[sess.batch_of(b"MAIL")]
    assert [c.split(b":")[0] for c in batch] == [b"MAIL FROM"] + [b"RCPT TO"] * 20 + [b"DATA"]


def test_pipelining_many_recipients_in_bounded_batches(tmp: Path) -> None:
    body = b"Subject: many\n\nbody\n"
    msg = spool_message(tmp, body)
    rcpts = [f"r{i:03d}@x.test" for i in range(250)]
    with ScriptedServer(Behaviour(pipelining=True)) as srv:
        outs = run(msg, rcpts, [host(srv)])
    assert all(o.status == "delivered" for o in outs)
    (sess,) = srv.sessions
    (txn,) = sess.transactions
    assert txn.rcpts == rcpts and txn.data == over_data(body)
    sizes = [len(b) for b in sess.batches if b[0][:4] in (b"MAIL", b"RCPT")]
    assert sizes == [100, 100, 52]


def test_pipelining_bdat_envelope_one_batch(tmp: Path) -> None:
    msg = spool_message(tmp, b"Subject: p\n\nbody\n")
    with ScriptedServer(Behaviour(pipelining=True, chunking=True)) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert all(o.status == "delivered" for o in outs)
    (sess,) = srv.sessions
    batch = sess.batches[sess.batch_of(b"MAIL")]
    assert [c[:4] for c in batch] == [b"MAIL", b"RCPT", b"RCPT"]


def test_no_pipelining_one_command_at_a_time(tmp: Path) -> None:
    msg = spool_message(tmp, b"Subject: p\n\nbody\n")
    with ScriptedServer(Behaviour(pipelining=False)) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert all(o.status == "delivered" for o in outs)
    (sess,) = srv.sessions
    for verb in (b"MAIL", b"RCPT", b"DATA"):
        assert len(sess.batches[sess.batch_of(verb)]) == 1


def test_size_parameter_is_the_wire_size(tmp: Path) -> None:
    body = sample_body(30_000)
    msg = spool_message(tmp, body)
    assert wire_size(msg) == len(crlf(body))
    with ScriptedServer(Behaviour(size=10 * MB)) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert outs[0].status == "delivered"
    assert f"SIZE={len(crlf(body))}" in srv.transactions[0].mail_params


def test_size_limit_gives_up_early(tmp: Path) -> None:
    msg = spool_message(tmp, sample_body(20_000))
    with ScriptedServer(Behaviour(size=10_000)) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert [(o.status, o.dsn) for o in outs] == [("failed", "5.3.4")] * 2
    assert "exceeds size limit 10000" in outs[0].reply
    assert not any(c.startswith(b"MAIL") for c in srv.sessions[0].commands)


def test_body_8bitmime(tmp: Path) -> None:
    with ScriptedServer(Behaviour()) as srv:
        run(spool_message(tmp, "Subject: x\n\ncafé\n".encode(), "a"), ["a@x.test"], [host(srv)])
        run(spool_message(tmp, b"Subject: x\n\nascii\n", "b"), ["a@x.test"], [host(srv)])
    eight, seven = srv.transactions
    assert "BODY=8BITMIME" in eight.mail_params
    assert "BODY=8BITMIME" not in seven.mail_params


def test_smtputf8(tmp: Path) -> None:
    msg = spool_message(tmp, b"Subject: x\n\nbody\n")
    rcpts = ["jos\u00e9@x.test", "plain@x.test", "user@b\u00fccher.example"]
    with ScriptedServer(Behaviour(smtputf8=True)) as srv:
        outs = run(msg, rcpts, [host(srv)])
    assert all(o.status == "delivered" for o in outs)
    (txn,) = srv.transactions
    assert "SMTPUTF8" in txn.mail_params
    assert txn.rcpts == ["jos\u00e9@x.test", "plain@x.test", "user@xn--bcher-kva.example"]

    with ScriptedServer(Behaviour(smtputf8=False)) as srv:
        outs = run(msg, rcpts, [host(srv)])
    assert [(o.status, o.dsn) for o in outs] == [
        ("failed", "5.6.7"), ("delivered", "2.0.0"), ("delivered", "2.0.0")]
    assert "needs SMTPUTF8" in outs[0].reply
    (txn,) = srv.transactions
    assert "SMTPUTF8" not in txn.mail_params
    assert txn.rcpts == ["plain@x.test", "user@xn--bcher-kva.example"]


def test_mixed_rcpt_replies(tmp: Path) -> None:
    body = b"Subject: mixed\n\nhello\n"
    msg = spool_message(tmp, body)

    def rcpt(addr: str) -> bytes:
        if addr.startswith("busy"):
            return b"450 4.2.0 <busy@x.test>: mailbox busy\r\n"
        if addr.startswith("gone"):
            return b"550 5.1.1 <gone@x.test>: Recipient address rejected: unknown\r\n"
        return b"250 2.1.5 Ok\r\n"

    for pipelining in (True, False):
        with ScriptedServer(Behaviour(rcpt_reply=rcpt, pipelining=pipelining)) as srv:
            outs = run(msg, ["ok@x.test", "busy@x.test", "gone@x.test", "ok2@x.test"],
                       [host(srv)])
        by = {o.recipient: o for o in outs}
        assert by["ok@x.test"].status == by["ok2@x.test"].status == "delivered"
        assert by["ok@x.test"].reply.startswith("250 2.0.0")
        assert (by["busy@x.test"].status, by["busy@x.test"].dsn) == ("deferred", "4.2.0")
        assert "mailbox busy" in by["busy@x.test"].reply
        assert "RCPT TO" in by["busy@x.test"].reply
        assert (by["gone@x.test"].status, by["gone@x.test"].dsn) == ("failed", "5.1.1")
        assert by["gone@x.test"].relay == f"localhost[127.0.0.1]:{srv.port}"
        (txn,) = srv.transactions
        assert txn.rcpts == ["ok@x.test", "ok2@x.test"]
        assert txn.data == over_data(body)


@pytest.mark.parametrize("pipelining", [True, False])
def test_all_rcpts_rejected(tmp: Path, pipelining: bool) -> None:
    msg = spool_message(tmp, b"x\n")
    beh = Behaviour(pipelining=pipelining, rcpt_reply=lambda a: b"550 5.1.1 no such user\r\n")
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert [o.status for o in outs] == ["failed", "failed"]
    assert not srv.transactions


@pytest.mark.parametrize("reply,status", [(b"550 5.7.1 sender rejected\r\n", "failed"),
                                          (b"451 4.3.0 try later\r\n", "deferred")])
@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_from_rejected(tmp: Path, reply: bytes, status: str, pipelining: bool) -> None:
    msg = spool_message(tmp, b"x\n")
    with ScriptedServer(Behaviour(mail_reply=reply, pipelining=pipelining)) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert [o.status for o in outs] == [status, status]
    assert reply.decode().strip() in outs[0].reply
    assert "MAIL FROM" in outs[0].reply


@pytest.mark.parametrize("reply,status", [(b"554 5.6.0 content rejected\r\n", "failed"),
                                          (b"452 4.3.1 insufficient storage\r\n", "deferred")])
@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_final_reply(tmp: Path, reply: bytes, status: str, chunking: bool) -> None:
    msg = spool_message(tmp, b"x\n")
    with ScriptedServer(Behaviour(final_reply=reply, chunking=chunking)) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert outs[0].status == status
    assert outs[0].dsn == reply[4:9].decode()


def test_data_command_rejected(tmp: Path) -> None:
    msg = spool_message(tmp, b"x\n")
    with ScriptedServer(Behaviour(data_reply=b"554 5.3.0 no data today\r\n")) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert (outs[0].status, outs[0].dsn) == ("failed", "5.3.0")
    assert "DATA" in outs[0].reply


def test_helo_fallback(tmp: Path) -> None:
    body = b"Subject: helo\n\nold server\n"
    msg = spool_message(tmp, body)
    with ScriptedServer(Behaviour(ehlo_ok=False)) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert outs[0].status == "delivered"
    cmds = srv.sessions[0].commands
    assert cmds[0] == b"EHLO client.test" and cmds[1] == b"HELO client.test"
    assert srv.transactions[0].data == over_data(body)


def test_connection_reuse_and_rset(tmp: Path) -> None:
    def rcpt(addr: str) -> bytes:
        return b"550 5.1.1 nope\r\n" if addr.startswith("bad") else b"250 2.1.5 Ok\r\n"

    with ScriptedServer(Behaviour(rcpt_reply=rcpt)) as srv:
        with Connection(host(srv), config()) as conn:
            conn.open()
            m1 = spool_message(tmp, b"one\n", "one")
            m2 = spool_message(tmp, b"two\n", "two")
            assert conn.send(m1, "s@c.test", ["a@x.test"])[0].status == "delivered"
            assert conn.send(m2, "s@c.test", ["bad@x.test"])[0].status == "failed"
            assert conn.send(m2, "s@c.test", ["b@x.test"])[0].status == "delivered"
    assert len(srv.sessions) == 1
    cmds = [c.split(b" ")[0] for c in srv.sessions[0].commands]
    assert cmds.count(b"RSET") == 1
    assert cmds.index(b"RSET") > cmds.index(b"RCPT")
    assert [t.data for t in srv.transactions] == [b"one\r\n", b"two\r\n"]
    assert cmds[-1] == b"QUIT"


def test_log_line(tmp: Path) -> None:
    logfile = tmp / "dma.log"
    log = Log(use_syslog=False, fallback_path=str(logfile))
    msg = spool_message(tmp, b"Subject: x\n\nhi\n")

    def rcpt(addr: str) -> bytes:
        return b"450 4.2.0 later\r\n" if addr.startswith("b") else b"250 2.1.5 Ok\r\n"

    with ScriptedServer(Behaviour(rcpt_reply=rcpt)) as srv:
        run(msg, ["a@x.test", "b@x.test"], [host(srv)], log=log)
    text = logfile.read_text()
    assert "Q1: to=<a@x.test>,<b@x.test>" in text
    assert f"relay=localhost[127.0.0.1]:{srv.port}" in text
    assert "tls=no TLS" in text and f"size={msg.size}" in text and "delay=" in text
    assert "delivered <a@x.test> (250 2.0.0" in text and "deferred <b@x.test> (450 4.2.0" in text


# -- hosts, addresses, and misbehaving peers ------------------------------------------------


def test_connection_refused_then_next_host(tmp: Path) -> None:
    body = b"Subject: x\n\nnext host\n"
    msg = spool_message(tmp, body)
    dead = Host("dead.test", closed_port(), ("127.0.0.1",))
    outs = run(msg, ["a@x.test"], [dead])
    assert (outs[0].status, outs[0].dsn) == ("deferred", "4.4.1")
    assert "connect to dead.test[127.0.0.1]" in outs[0].reply
    assert "refused" in outs[0].reply.lower()
    with ScriptedServer() as srv:
        outs = run(msg, ["a@x.test"], [dead, host(srv)], kind="mx")
    assert outs[0].status == "delivered"
    assert srv.transactions[0].data == over_data(body)


def test_each_address_of_a_host(tmp: Path) -> None:
    msg = spool_message(tmp, b"x\n")
    with ScriptedServer() as srv:
        # ::1 (or nothing) on that port refuses; 127.0.0.1 answers.
        outs = run(msg, ["a@x.test"], [Host("localhost", srv.port, ("::1", "127.0.0.1"))])
    assert outs[0].status == "delivered"
    assert outs[0].relay == f"localhost[127.0.0.1]:{srv.port}"


@pytest.mark.parametrize("greeting", [b"554 5.3.2 go away\r\n", b"421 4.3.2 busy\r\n"])
def test_bad_greeting(tmp: Path, greeting: bytes) -> None:
    msg = spool_message(tmp, b"x\n")
    with ScriptedServer(Behaviour(greeting=greeting)) as bad:
        outs = run(msg, ["a@x.test"], [host(bad)])
        # The last (only) host's 5xx greeting defers too: another attempt may find it fixed.
        assert (outs[0].status, outs[0].dsn) == ("deferred", "4.3.2")
        assert greeting.decode().strip() in outs[0].reply
        assert "refused to talk to us" in outs[0].reply
        with ScriptedServer() as good:
            outs = run(msg, ["a@x.test"], [host(bad, "bad.test"), host(good)])
    assert outs[0].status == "delivered"
    assert outs[0].relay.startswith("localhost[")


def test_deferred_recipients_move_to_next_host(tmp: Path) -> None:
    msg = spool_message(tmp, b"x\n")
    beh1 = Behaviour(rcpt_reply=lambda a: b"451 4.3.0 later\r\n" if a[0] == "b" else
                     b"250 2.1.5 Ok\r\n")
    with ScriptedServer(beh1) as one, ScriptedServer() as two:
        outs = run(msg, ["a@x.test", "b@x.test", "c@x.test"], [host(one, "mx1"), host(two, "mx2")],
                   kind="mx")
    assert statuses(outs) == dict.fromkeys(["a@x.test", "b@x.test", "c@x.test"], "delivered")
    assert one.transactions[0].rcpts == ["a@x.test", "c@x.test"]
    assert two.transactions[0].rcpts == ["b@x.test"]
    assert {o.recipient: o.relay.split("[")[0] for o in outs} == {
        "a@x.test": "mx1", "b@x.test": "mx2", "c@x.test": "mx1"}


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_drop_mid_data(tmp: Path, chunking: bool) -> None:
    msg = spool_message(tmp, sample_body(3 * MB))
    beh = Behaviour(chunking=chunking, drop_after_data_bytes=200_000)
    t0 = time.monotonic()
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert time.monotonic() - t0 < 10
    assert [o.status for o in outs] == ["deferred", "deferred"]
    assert outs[0].dsn == "4.4.2"
    assert f"lost connection with localhost[127.0.0.1]:{srv.port} while sending" in outs[0].reply
    assert not srv.transactions


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_server_stops_reading_mid_data(tmp: Path, chunking: bool) -> None:
    """A peer that stops reading: each block write is bounded by datablock_timeout.
    CPU is the delivering thread's own (thread_time): the server shares this process."""
    msg = spool_message(tmp, b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 400_000)  # 40 MB
    beh = Behaviour(chunking=chunking, stall_after_data_bytes=1 * MB)
    with ScriptedServer(beh) as srv:
        t0, cpu0 = time.monotonic(), time.thread_time()
        outs = run(msg, ["a@x.test"], [host(srv)], cfg=config(datablock_timeout=1.0))
        elapsed, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    assert outs[0].status == "deferred"
    assert "timed out while sending message body" in outs[0].reply
    assert elapsed < 8 and cpu < 2
    assert not srv.transactions


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_stall_after_final_dot(tmp: Path, chunking: bool) -> None:
    msg = spool_message(tmp, b"Subject: x\n\nstall\n")
    with ScriptedServer(Behaviour(chunking=chunking, stall_after_dot=15)) as srv:
        t0, cpu0 = time.monotonic(), time.thread_time()
        outs = run(msg, ["a@x.test"], [host(srv)], cfg=config(dot_timeout=1.0))
        elapsed, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    assert outs[0].status == "deferred"
    assert "timed out while sending end of data" in outs[0].reply
    assert 0.9 < elapsed < 6
    assert cpu < 0.5  # waiting, not spinning


@pytest.mark.parametrize("where", ["GREETING", "EHLO", "MAIL", "RCPT", "DATA", "DOT"])
def test_garbage_reply(tmp: Path, where: str) -> None:
    msg = spool_message(tmp, b"x\n")
    beh = Behaviour(raw={where: b"\x00\xffHELLO? this is not SMTP\r\n"})
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert outs[0].status == "deferred"
    assert "protocol error" in outs[0].reply and "unexpected reply" in outs[0].reply
    assert not srv.transactions or where == "DOT"


@pytest.mark.parametrize("where", ["GREETING", "EHLO", "RCPT", "DOT"])
def test_ten_megabyte_reply_line(tmp: Path, where: str) -> None:
    msg = spool_message(tmp, b"x\n")
    beh = Behaviour(raw={where: b"250 " + b"A" * (10 * MB) + b"\r\n"})
    t0, cpu0 = time.monotonic(), time.thread_time()
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert time.monotonic() - t0 < 10 and time.thread_time() - cpu0 < 2
    assert outs[0].status == "deferred"
    assert "reply line longer than 8192 bytes" in outs[0].reply


def test_endless_multiline_reply(tmp: Path) -> None:
    msg = spool_message(tmp, b"x\n")
    beh = Behaviour(raw={"EHLO": b"250-x\r\n" * 100_000 + b"250 end\r\n"})
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test"], [host(srv)])
    assert outs[0].status == "deferred" and "lines" in outs[0].reply


@pytest.mark.parametrize("where", ["GREETING", "EHLO", "MAIL", "RCPT", "DATA"])
def test_server_closes(tmp: Path, where: str) -> None:
    msg = spool_message(tmp, b"x\n")
    beh = Behaviour(raw={where: b""}, close_after=frozenset({where}))
    t0, cpu0 = time.monotonic(), time.thread_time()
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert time.monotonic() - t0 < 5 and time.thread_time() - cpu0 < 1
    assert [o.status for o in outs] == ["deferred", "deferred"]
    assert "lost connection with" in outs[0].reply


def test_greeting_timeout(tmp: Path) -> None:
    msg = spool_message(tmp, b"x\n")
    with ScriptedServer(Behaviour(greeting_delay=10)) as srv:
        t0 = time.monotonic()
        outs = run(msg, ["a@x.test"], [host(srv)], cfg=config(greeting_timeout=0.5))
    assert time.monotonic() - t0 < 4
    assert outs[0].status == "deferred"
    assert "timed out while receiving the initial server greeting" in outs[0].reply


def test_trickling_server_is_bounded(tmp: Path) -> None:
    """A server that sends one byte at a time never extends the reply deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(200):
                if stop.wait(0.1):
                    break
                try:
                    conn.sendall(b"2")
                except OSError:
                    break

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    msg = spool_message(tmp, b"x\n")
    t0 = time.monotonic()
    outs = run(msg, ["a@x.test"], [Host("trickle", port, ("127.0.0.1",))],
               cfg=config(greeting_timeout=1.0))
    stop.set()
    t.join(5)
    listener.close()
    assert time.monotonic() - t0 < 4
    assert outs[0].status == "deferred" and "timed out" in outs[0].reply


def test_421_mid_transaction(tmp: Path) -> None:
    msg = spool_message(tmp, b"x\n")
    beh = Behaviour(raw={"RCPT": b"421 4.4.2 shutting down\r\n"}, close_after=frozenset({"RCPT"}),
                    pipelining=False)
    with ScriptedServer(beh) as srv:
        outs = run(msg, ["a@x.test", "b@x.test"], [host(srv)])
    assert [o.status for o in outs] == ["deferred", "deferred"]
    assert "421 4.4.2 shutting down" in outs[0].reply


def test_no_hosts(tmp: Path) -> None:
    outs = run(spool_message(tmp, b"x\n"), ["a@x.test"], [])
    assert outs[0].status == "deferred"


def test_open_raises_delivery_error() -> None:
    conn = Connection(Host("dead.test", closed_port(), ("127.0.0.1",)), config())
    with pytest.raises(DeliveryError) as ei:
        conn.open()
    assert ei.value.status == "deferred" and ei.value.dsn == "4.4.1"
    conn.close()
    conn.close()  # idempotent, never raises


def test_parallel_deliveries_share_one_file(tmp: Path) -> None:
    """Many threads read the same queue file through their own cursors."""
    body = sample_body(2 * MB, seed=7)
    msg = spool_message(tmp, body)
    servers = [ScriptedServer(Behaviour(chunking=i % 2 == 1)).start() for i in range(6)]
    results: list[list[Outcome]] = [[] for _ in servers]

    def one(i: int) -> None:
        results[i] = run(msg, [f"r{i}@x{i}.test"], [host(servers[i])])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for s in servers:
            s.stop()
    for i, srv in enumerate(servers):
        assert results[i][0].status == "delivered"
        assert srv.transactions[0].data == (crlf(body) if i % 2 else over_data(body))


def _seed_body() -> bytes:
    """The seed test's input: ``dd if=/dev/urandom bs=1k count=100 | base64``."""
    import base64

    raw = base64.encodebytes(os.urandom(100 * 1024))
    return b"Subject: seed\n\n" + raw


@pytest.mark.parametrize("n", [2, 10, 50])
def test_seed_one_smarthost(tmp: Path, n: int) -> None:
    body = _seed_body()
    msg = spool_message(tmp, body)
    rcpts = [f"r{i}@d{i}.test" for i in range(n)]
    with ScriptedServer(Behaviour(chunking=n == 10)) as srv:
        outs = run(msg, rcpts, [host(srv)])
    assert all(o.status == "delivered" for o in outs)
    (txn,) = srv.transactions
    assert txn.rcpts == rcpts
    assert txn.data == (crlf(body) if n == 10 else over_data(body))


@pytest.mark.parametrize("n", [2, 10])
def test_seed_forked_processes(tmp: Path, n: int) -> None:
    """N processes forked after the message file is opened, each delivering its recipient
    through its own cursor at the same time: every copy identical."""
    body = _seed_body()
    msg = spool_message(tmp, body)
    servers = [ScriptedServer(Behaviour(chunking=i % 2 == 1)).start() for i in range(n)]
    pids = []
    try:
        for i, srv in enumerate(servers):
            pid = os.fork()
            if pid == 0:  # child: deliver, report through the exit status, never return
                code = 1
                try:
                    signal.alarm(0)
                    outs = run(msg, [f"r{i}@d{i}.test"], [host(srv)])
                    code = 0 if outs[0].status == "delivered" else 2
                finally:
                    os._exit(code)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for srv in servers:
            srv.stop()
    for i, srv in enumerate(servers):
        (txn,) = srv.transactions
        assert txn.data == (crlf(body) if i % 2 else over_data(body))
