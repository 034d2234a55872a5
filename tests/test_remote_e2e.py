"""Remote delivery end to end: the installed ``dma`` executable, a real DNS server (dnsmasq)
and real SMTP servers on loopback addresses, every received copy compared byte for byte."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DmaSite, run_measured
from dnsd import DnsServer
from smtpd import Behaviour, ScriptedServer, Transaction, serve

pytestmark = pytest.mark.usefixtures("root_only")


def body_received(t: Transaction) -> bytes:
    """The body of a received transaction, line endings back to LF."""
    head, sep, body = t.data.partition(b"\r\n\r\n")
    assert sep, t.data[:200]
    return body.replace(b"\r\n", b"\n")


def seed_body(kib: int = 100) -> bytes:
    """``dd if=/dev/urandom bs=1k count=100 | base64``"""
    return base64.encodebytes(os.urandom(kib * 1024))


@pytest.fixture
def smarthost(site: DmaSite) -> Iterator[ScriptedServer]:
    with serve(Behaviour(chunking=False)) as server:
        site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {server.port}\n")
        yield server


@pytest.mark.parametrize("n", [2, 10, 50])
def test_seed_through_smarthost(site: DmaSite, smarthost: ScriptedServer, n: int) -> None:
    body = seed_body()
    rcpts = [f"user{i}@example{i % 7}.org" for i in range(n)]
    r = site.run("-D", "-f", "root@mail.test", *rcpts, input=b"Subject: seed\n\n" + body)
    assert r.returncode == 0, r.stderr
    (t,) = smarthost.transactions  # one transaction, every recipient in it
    assert sorted(t.rcpts) == sorted(rcpts)
    assert body_received(t) == body and t.bare_lf == 0
    assert site.queue_ids() == []


@pytest.mark.parametrize("size", [0, 1, 1 << 20, 10 << 20])
def test_sizes_and_awkward_bodies(site: DmaSite, smarthost: ScriptedServer, size: int) -> None:
    pattern = b".leading dot\n..two\nFrom the start\n>From quoted\n.\nx" * (size // 50 + 1)
    body = pattern[:size]
    r = site.run("-D", "-i", "-f", "root@mail.test", "a@example.org",
                 input=b"Subject: s\n\n" + body)
    assert r.returncode == 0, r.stderr
    (t,) = smarthost.transactions
    expected = body if not body or body.endswith(b"\n") else body + b"\n"
    assert body_received(t) == expected


def test_long_lines_kept_exact_with_chunking(site: DmaSite) -> None:
    body = b"short\n" + b"L" * 5000 + b"\n" + b"M" * 999 + b"\nend"
    with serve(Behaviour(chunking=True)) as server:
        site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {server.port}\n")
        r = site.run("-D", "-f", "root@mail.test", "a@example.org",
                     input=b"Subject: long\n\n" + body)
        assert r.returncode == 0, r.stderr
        (t,) = server.transactions
    assert t.via == "BDAT"
    assert t.data.endswith(b"\r\n\r\n" + body.replace(b"\n", b"\r\n"))


@pytest.mark.parametrize("ndomains,per_domain", [(2, 1), (5, 2), (10, 5)],
                         ids=["2-rcpts", "10-rcpts", "50-rcpts"])
def test_mx_delivery_to_several_domains(site: DmaSite, ndomains: int, per_domain: int) -> None:
    domains = [f"d{i}.test" for i in range(ndomains)]
    first = {2: 2, 5: 12, 10: 22}[ndomains]  # distinct addresses for each case
    servers = [ScriptedServer(Behaviour(), host=f"127.0.0.{first + i}", port=25).start()
               for i in range(len(domains))]
    try:
        mx = {d: [(10, f"mx.{d}")] for d in domains}
        hosts = {f"mx.{d}": [f"127.0.0.{first + i}"] for i, d in enumerate(domains)}
        with DnsServer(mx=mx, hosts=hosts) as dns:
            site.write_conf(f"RESOLVER {dns.resolver[0]}:{dns.resolver[1]}\n")
            rcpts = [f"u{j}@{d}" for d in domains for j in range(per_domain)]
            body = seed_body(20)
            r = site.run("-D", "-f", "root@mail.test", *rcpts, input=b"Subject: mx\n\n" + body)
            assert r.returncode == 0, r.stderr
        for d, server in zip(domains, servers, strict=True):
            (t,) = server.transactions
            assert sorted(t.rcpts) == sorted(f"u{j}@{d}" for j in range(per_domain))
            assert body_received(t) == body
    finally:
        for s in servers:
            s.stop()


def test_per_recipient_outcomes_and_bounce(site: DmaSite) -> None:
    def rcpt_reply(addr: str) -> bytes:
        if addr.startswith("later"):
            return b"450 4.2.0 mailbox busy\r\n"
        if addr.startswith("never"):
            return b"550 5.1.1 no such user here\r\n"
        return b"250 2.1.5 Ok\r\n"

    with serve(Behaviour(rcpt_reply=rcpt_reply)) as server:
        site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {server.port}\n")
        r = site.run("-D", "-f", "root@mail.test", "ok@example.org", "later@example.org",
                     "never@example.org", input=b"Subject: mixed\n\nx\n")
        assert r.returncode == 75, r.stderr  # someone deferred: still queued
        (t,) = server.transactions
        assert t.rcpts == ["ok@example.org"]
        doc = json.loads(site.run("queue", "list", "--json").stdout)
        states = {x["recipient"]: x for x in doc["messages"][0]["recipients"]}
        assert states["ok@example.org"]["status"] == "delivered"
        assert states["later@example.org"]["status"] == "deferred"
        assert "450 4.2.0 mailbox busy" in states["later@example.org"]["last_reply"]
        assert states["never@example.org"]["status"] == "failed"
        # no bounce yet: the message is not finished while someone is deferred
        assert not site.mailbox().exists()
        server.behaviour.rcpt_reply = None
        assert site.run("-q").returncode == 0
        assert server.transactions[-1].rcpts == ["later@example.org"]
    assert site.queue_ids() == []
    bounce = site.mailbox().read_bytes()
    assert b"Final-Recipient: rfc822; never@example.org" in bounce
    assert b"550 5.1.1 no such user here" in bounce
    assert b"later@example.org" not in bounce.split(b"Content-Type: text/rfc822-headers")[0]


def test_refused_connection_defers_without_loss(site: DmaSite) -> None:
    with serve(Behaviour()) as server:
        port = server.port
    site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {port}\n")
    r = site.run("-D", "-f", "root@mail.test", "a@example.org", input=b"Subject: r\n\nx\n")
    assert r.returncode == 75
    assert len(site.queue_ids()) == 1
    mailq = site.run(prog="mailq").stdout
    assert b"deferred" in mailq and b"a@example.org" in mailq


def test_null_mx_and_nxdomain_bounce(site: DmaSite) -> None:
    with DnsServer(null_mx=["nullmx.test"], hosts={"other.test": ["127.0.0.9"]}) as dns:
        site.write_conf(f"RESOLVER {dns.resolver[0]}:{dns.resolver[1]}\n")
        r = site.run("-D", "-f", "root@mail.test", "a@nullmx.test", "b@nowhere.test",
                     input=b"Subject: n\n\nx\n")
    assert r.returncode == 69, r.stderr
    bounce = site.mailbox().read_bytes()
    assert b"Status: 5.1.10" in bounce and b"null MX" in bounce
    assert b"Final-Recipient: rfc822; b@nowhere.test" in bounce and b"Status: 5.1.2" in bounce


def test_hundred_megabytes_through_smarthost(site: DmaSite, smarthost: ScriptedServer,
                                             tmp_path: Path) -> None:
    src = tmp_path / "big.eml"
    line = b"V" * 76 + b"\n"
    with open(src, "wb") as f:
        f.write(b"Subject: big\n\n")
        block = line * 13_000
        for _ in range(100 * (1 << 20) // len(block)):
            f.write(block)
    exe = __import__("shutil").which("dma")
    assert exe
    with open(src, "rb") as stdin:
        code, peak_mb, err = run_measured([exe, "-D", "-f", "root@mail.test", "a@example.org",
                                           "b@example.net"], stdin=stdin.fileno(),
                                          env=site.env())
    assert code == 0, err
    print(f"100 MB through a smarthost, peak RSS {peak_mb:.1f} MB")
    assert peak_mb < 80
    (t,) = smarthost.transactions
    assert len(body_received(t)) == src.stat().st_size - len(b"Subject: big\n\n")


def test_queue_run_reuses_one_connection(site: DmaSite, smarthost: ScriptedServer) -> None:
    bodies = [f"message {i}\n".encode() * (i + 1) for i in range(20)]
    for i, body in enumerate(bodies):
        r = site.run("-bq", "-f", "root@mail.test", f"r{i}@example.org",
                     input=b"Subject: many\n\n" + body)
        assert r.returncode == 0, r.stderr
    assert site.run("-q").returncode == 0
    assert site.queue_ids() == []
    assert len(smarthost.sessions) == 1
    got = sorted(body_received(t) for t in smarthost.transactions)
    assert got == sorted(bodies)


def test_long_lines_wrapped_over_data(site: DmaSite, smarthost: ScriptedServer) -> None:
    """Without CHUNKING, lines over 998 octets are broken as Postfix does (CRLF SPACE)."""
    body = b"short\n" + b"L" * 2500 + b"\n.dot\n"
    r = site.run("-D", "-f", "root@mail.test", "a@example.org",
                 input=b"Subject: wrap\n\n" + body)
    assert r.returncode == 0, r.stderr
    (t,) = smarthost.transactions
    assert t.via == "DATA"
    lines = t.data.split(b"\r\n")
    assert max(len(x) for x in lines) <= 998
    assert body_received(t).replace(b"\n ", b"") == body
