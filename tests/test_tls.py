"""dma.tls and TLS in dma.smtp against real servers with trustme certificates: implicit TLS,
STARTTLS, verification (expired, self-signed, wrong name), MX_TLS levels, fingerprint pins,
client certificates, SNI."""

from __future__ import annotations

import hashlib
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dma.config import Config
from dma.log import Log
from dma.outcome import Outcome
from dma.route import Destination, Host
from dma.smtp import deliver
from dma.tls import TlsPolicy, is_ip_literal, peer_name, policy_for
from smtpd import AioSink, Behaviour, Certs, ScriptedServer, crlf, over_data, spool_message


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError("test took longer than 120 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def config(certs: Certs | None = None, **kw: Any) -> Config:
    base: dict[str, Any] = dict(mailname="client.test", connect_timeout=5.0,
                                greeting_timeout=10.0, mail_timeout=10.0, rcpt_timeout=10.0,
                                data_timeout=10.0, datablock_timeout=10.0, dot_timeout=10.0)
    if certs is not None:
        base["cafile"] = str(certs.cafile)
    base.update(kw)
    return Config(**base)


def run(tmp: Path, srv: ScriptedServer | AioSink, cfg: Config, *, kind: str = "smarthost",
        name: str = "localhost", body: bytes = b"Subject: tls\n\nsecret\n",
        log: Log | None = None) -> list[Outcome]:
    msg = spool_message(tmp, body)
    h = Host(name, srv.port, (srv.host,))
    return deliver(msg, "s@client.test", ["a@x.test"], [h], Destination(kind, name, ("a@x.test",)),
                   cfg, None, log or Log(use_syslog=False, fallback_path=os.devnull))


SMARTHOST_STARTTLS = dict(securetransfer=True, starttls=True)
# Says 220 to STARTTLS, then hangs up instead of a TLS handshake.
NOT_REALLY_TLS = Behaviour(advertise_starttls_without_context=True,
                           raw={"STARTTLS": b"220 2.0.0 go ahead\r\n"},
                           close_after=frozenset({"STARTTLS"}))


# -- policy -----------------------------------------------------------------------------


def test_policy_matrix() -> None:
    c = Config
    assert policy_for(c(), "smarthost") == TlsPolicy()
    assert policy_for(c(starttls=True), "smarthost").mode == "none"  # C dma: no effect alone
    p = policy_for(c(securetransfer=True), "smarthost")
    assert (p.mode, p.required, p.verify) == ("implicit", True, True)
    p = policy_for(c(securetransfer=True, starttls=True), "smarthost")
    assert (p.mode, p.required, p.verify) == ("starttls", True, True)
    p = policy_for(c(securetransfer=True, starttls=True, opportunistic_tls=True,
                     tls_noverify=True), "smarthost")
    assert (p.mode, p.required, p.verify) == ("starttls", False, False)
    p = policy_for(c(securetransfer=True, tls_noverify=True, verifycert=True), "smarthost")
    assert p.verify  # VERIFYCERT wins
    assert policy_for(c(mx_tls="none"), "mx").mode == "none"
    p = policy_for(c(mx_tls="may"), "mx")
    assert (p.mode, p.required, p.verify, p.fallback_plaintext) == ("starttls", False, False, True)
    p = policy_for(c(mx_tls="encrypt"), "mx")
    assert (p.required, p.verify, p.fallback_plaintext) == (True, False, False)
    p = policy_for(c(mx_tls="verify"), "mx")
    assert (p.required, p.verify) == (True, True)
    p = policy_for(c(mx_tls="may", verifycert=True), "mx")
    assert (p.required, p.verify, p.fallback_plaintext) == (False, True, False)
    p = policy_for(c(mx_tls="may", securetransfer=True, starttls=True), "mx")
    assert (p.mode, p.required) == ("starttls", True)
    fp = bytes(32)
    assert policy_for(c(fingerprint=fp, mx_tls="may"), "mx").fingerprint == fp


def test_names() -> None:
    assert peer_name("[192.0.2.1]") == "192.0.2.1"
    assert peer_name("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert peer_name("mx.example.org.") == "mx.example.org"
    assert is_ip_literal("127.0.0.1") and is_ip_literal("[::1]")
    assert not is_ip_literal("localhost")


# -- smarthost ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_implicit_tls_round_trip(tmp_path: Path, certs: Certs, chunking: bool) -> None:
    body = b"Subject: smtps\n\n" + b".dot\nFrom x\n" * 20000
    logfile = tmp_path / "log"
    beh = Behaviour(implicit_tls=certs.server_context(), chunking=chunking)
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs, securetransfer=True), body=body,
                   log=Log(use_syslog=False, fallback_path=str(logfile)))
    assert outs[0].status == "delivered", outs
    (sess,) = srv.sessions
    assert sess.tls_version in ("TLSv1.2", "TLSv1.3")
    assert sess.transactions[0].data == (crlf(body) if chunking else over_data(body))
    assert f"tls={sess.tls_version}" in logfile.read_text()


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_starttls_round_trip(tmp_path: Path, certs: Certs, chunking: bool) -> None:
    body = bytes(range(256)) * 4000
    beh = Behaviour(starttls=certs.server_context(), chunking=chunking)
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs, **SMARTHOST_STARTTLS), body=body)
    assert outs[0].status == "delivered", outs
    (sess,) = srv.sessions
    cmds = [c.split(b" ")[0].upper() for c in sess.commands]
    assert cmds[:3] == [b"EHLO", b"STARTTLS", b"EHLO"]
    txn = sess.transactions[0]
    assert txn.tls
    assert txn.data == (crlf(body) if chunking else over_data(body))


def test_starttls_aiosmtpd(tmp_path: Path, certs: Certs) -> None:
    body = b"Subject: aiosmtpd\n\n.hello\n"
    with AioSink(tls_context=certs.server_context(), require_starttls=True) as sink:
        outs = run(tmp_path, sink, config(certs, **SMARTHOST_STARTTLS), body=body)
    assert outs[0].status == "delivered", outs
    assert sink.messages[0].tls and sink.messages[0].content == over_data(body)


@pytest.mark.parametrize("which,why", [("expired", "certificate has expired"),
                                       ("self_signed", "self-signed certificate"),
                                       ("wrong_name", "Hostname mismatch")])
@pytest.mark.parametrize("implicit", [False, True], ids=["STARTTLS", "SMTPS"])
def test_smarthost_bad_certificate(tmp_path: Path, certs: Certs, which: str, why: str,
                                   implicit: bool) -> None:
    ctx = certs.server_context(which)
    beh = Behaviour(implicit_tls=ctx) if implicit else Behaviour(starttls=ctx)
    tls_cfg: dict[str, Any] = {"securetransfer": True, "starttls": not implicit}
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs, **tls_cfg))
        assert outs[0].status == "deferred"
        assert "certificate verification failed" in outs[0].reply and why in outs[0].reply
        assert not srv.transactions
        # TLS_NOVERIFY: the same server is fine.
        outs = run(tmp_path / "2", srv, config(certs, tls_noverify=True, **tls_cfg))
    assert outs[0].status == "delivered", outs
    assert len(srv.transactions) == 1


def test_smarthost_system_cas_reject_private_ca(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour(starttls=certs.server_context())) as srv:
        outs = run(tmp_path, srv, config(None, **SMARTHOST_STARTTLS))  # no CAFILE
    assert outs[0].status == "deferred" and "certificate verification failed" in outs[0].reply


def test_ip_literal_verified_without_sni(tmp_path: Path, certs: Certs) -> None:
    seen: list[str | None] = []
    ctx = certs.server_context()
    ctx.sni_callback = lambda sock, name, c: seen.append(name)
    with ScriptedServer(Behaviour(starttls=ctx)) as srv:
        outs = run(tmp_path, srv, config(certs, **SMARTHOST_STARTTLS), name="127.0.0.1")
        assert outs[0].status == "delivered", outs
        outs = run(tmp_path / "2", srv, config(certs, **SMARTHOST_STARTTLS), name="localhost")
        assert outs[0].status == "delivered", outs
    assert seen == [None, "localhost"]


@pytest.mark.parametrize("opportunistic", [False, True])
def test_starttls_refused(tmp_path: Path, certs: Certs, opportunistic: bool) -> None:
    beh = Behaviour(starttls=certs.server_context(),
                    starttls_reply=b"454 4.7.0 TLS not available due to temporary reason\r\n")
    cfg = config(certs, opportunistic_tls=opportunistic, **SMARTHOST_STARTTLS)
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, cfg)
    if opportunistic:
        assert outs[0].status == "delivered"
        assert not srv.transactions[0].tls
    else:
        assert outs[0].status == "deferred"
        assert "STARTTLS refused" in outs[0].reply and "454 4.7.0" in outs[0].reply
        assert not srv.transactions


def test_starttls_not_offered(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour()) as srv:
        outs = run(tmp_path, srv, config(certs, **SMARTHOST_STARTTLS))
        assert outs[0].status == "deferred" and "does not offer STARTTLS" in outs[0].reply
        outs = run(tmp_path / "2", srv, config(certs, opportunistic_tls=True,
                                               **SMARTHOST_STARTTLS))
    assert outs[0].status == "delivered"


def test_plain_server_with_implicit_tls_defers(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour()) as srv:
        outs = run(tmp_path, srv, config(certs, securetransfer=True, greeting_timeout=3.0))
    assert outs[0].status == "deferred" and "TLS handshake" in outs[0].reply


# -- MX_TLS ----------------------------------------------------------------------------------


def test_mx_none_ignores_starttls(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour(starttls=certs.server_context())) as srv:
        outs = run(tmp_path, srv, config(certs, mx_tls="none"), kind="mx")
    assert outs[0].status == "delivered"
    assert b"STARTTLS" not in srv.sessions[0].commands


@pytest.mark.parametrize("which", ["good", "expired", "self_signed", "wrong_name"])
def test_mx_may_and_encrypt_do_not_verify(tmp_path: Path, certs: Certs, which: str) -> None:
    for level in ("may", "encrypt"):
        with ScriptedServer(Behaviour(starttls=certs.server_context(which))) as srv:
            outs = run(tmp_path / level, srv, config(certs, mx_tls=level), kind="mx")
        assert outs[0].status == "delivered", (level, outs)
        assert srv.transactions[0].tls


def test_mx_may_falls_back_to_plaintext(tmp_path: Path, certs: Certs) -> None:
    body = b"Subject: fallback\n\nplain\n"
    beh = NOT_REALLY_TLS
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs, mx_tls="may"), kind="mx", body=body)
    assert outs[0].status == "delivered", outs
    assert len(srv.sessions) == 2
    assert b"STARTTLS" not in srv.sessions[1].commands
    assert srv.transactions[0].data == over_data(body) and not srv.transactions[0].tls


def test_mx_may_plaintext_when_not_offered(tmp_path: Path) -> None:
    with ScriptedServer(Behaviour()) as srv:
        outs = run(tmp_path, srv, config(None, mx_tls="may"), kind="mx")
    assert outs[0].status == "delivered"


def test_mx_encrypt_requires_tls(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour()) as srv:
        outs = run(tmp_path, srv, config(certs, mx_tls="encrypt"), kind="mx")
    assert outs[0].status == "deferred" and outs[0].dsn == "4.7.4"
    beh = NOT_REALLY_TLS
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path / "2", srv, config(certs, mx_tls="encrypt"), kind="mx")
    assert outs[0].status == "deferred" and "TLS handshake" in outs[0].reply
    assert len(srv.sessions) == 1  # no plaintext retry


@pytest.mark.parametrize("which,ok", [("good", True), ("wrong_name", False), ("expired", False),
                                      ("self_signed", False)])
def test_mx_verify(tmp_path: Path, certs: Certs, which: str, ok: bool) -> None:
    with ScriptedServer(Behaviour(starttls=certs.server_context(which))) as srv:
        outs = run(tmp_path, srv, config(certs, mx_tls="verify"), kind="mx")
    assert (outs[0].status == "delivered") is ok, outs
    if not ok:
        assert "certificate verification failed" in outs[0].reply
        assert len(srv.sessions) == 1


def test_verifycert_never_falls_back(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour(starttls=certs.server_context("self_signed"))) as srv:
        outs = run(tmp_path, srv, config(certs, mx_tls="may", verifycert=True), kind="mx")
    assert outs[0].status == "deferred" and "self-signed" in outs[0].reply
    assert len(srv.sessions) == 1


# -- fingerprint and client certificate ---------------------------------------------------


@pytest.mark.parametrize("kind", ["smarthost", "mx"])
def test_fingerprint(tmp_path: Path, certs: Certs, kind: str) -> None:
    good = hashlib.sha256(certs.leaf_der("good")).digest()
    tls_cfg: dict[str, Any] = dict(SMARTHOST_STARTTLS) if kind == "smarthost" else {}
    with ScriptedServer(Behaviour(starttls=certs.server_context())) as srv:
        outs = run(tmp_path, srv, config(certs, fingerprint=good, **tls_cfg), kind=kind)
        assert outs[0].status == "delivered", outs
        outs = run(tmp_path / "2", srv, config(certs, fingerprint=bytes(32), **tls_cfg), kind=kind)
    assert outs[0].status == "deferred"
    assert "certificate fingerprint mismatch for host localhost[127.0.0.1]" in outs[0].reply
    assert len(srv.transactions) == 1


def test_fingerprint_pins_a_self_signed_smarthost(tmp_path: Path, certs: Certs) -> None:
    ctx = certs.server_context("self_signed")
    der = ssl.PEM_cert_to_DER_cert(certs.other_ca.cert_pem.bytes().decode())
    with ScriptedServer(Behaviour(implicit_tls=ctx)) as srv:
        outs = run(tmp_path, srv, config(certs, securetransfer=True, tls_noverify=True,
                                         fingerprint=hashlib.sha256(der).digest()))
    assert outs[0].status == "delivered", outs


def test_client_certificate(tmp_path: Path, certs: Certs) -> None:
    ctx = certs.server_context(require_client_cert=True)
    with ScriptedServer(Behaviour(starttls=ctx)) as srv:
        outs = run(tmp_path, srv, config(certs, certfile=str(certs.client_pem),
                                         **SMARTHOST_STARTTLS))
    assert outs[0].status == "delivered", outs
    cert = srv.sessions[0].client_cert
    assert cert is not None and "dma client" in str(cert["subject"])


def test_client_certificate_missing(tmp_path: Path, certs: Certs) -> None:
    ctx = certs.server_context(require_client_cert=True)
    with ScriptedServer(Behaviour(starttls=ctx)) as srv:
        outs = run(tmp_path, srv, config(certs, **SMARTHOST_STARTTLS))
    assert outs[0].status == "deferred"
    assert not srv.transactions


def test_certfile_load_error(tmp_path: Path, certs: Certs) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    for i, path in enumerate((str(bad), str(tmp_path / "missing.pem"))):
        with ScriptedServer(Behaviour(starttls=certs.server_context())) as srv:
            outs = run(tmp_path / str(i), srv, config(certs, certfile=path,
                                                      **SMARTHOST_STARTTLS))
        assert outs[0].status == "deferred"
        assert f"cannot load client certificate CERTFILE {path}" in outs[0].reply
        assert not srv.sessions  # found out before connecting
