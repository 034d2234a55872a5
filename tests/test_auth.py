"""auth.conf parsing and SMTP AUTH against real servers: PLAIN, LOGIN, CRAM-MD5, failures,
and never a password in cleartext (unless INSECURE)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dma.auth import AuthTable, Credentials, load, parse
from dma.config import Config
from dma.errors import ConfigError
from dma.log import Log
from dma.outcome import Outcome
from dma.route import Destination, Host
from dma.smtp import deliver
from smtpd import AioSink, Behaviour, Certs, ScriptedServer, over_data, spool_message


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


# -- auth.conf ------------------------------------------------------------------------------


def test_parse_formats() -> None:
    text = ("# comment\n"
            "\n"
            "alice|smtp.example.org:s3cret\n"
            "bob|pipe.example.org|pw|with|bars\n"
            "carol|space.example.org pass word\n"
            "dave|tab.example.org\ttab:pw\n"
            "erin|crlf.example.org:pw\r\n"
            "   \n"
            "frank|empty.example.org:\n"
            "#alice|smtp.example.org:commented\n")
    e = parse(text, "auth.conf")
    assert e == {
        "smtp.example.org": Credentials("alice", "s3cret"),
        "pipe.example.org": Credentials("bob", "pw|with|bars"),
        "space.example.org": Credentials("carol", "pass word"),
        "tab.example.org": Credentials("dave", "tab:pw"),
        "crlf.example.org": Credentials("erin", "pw"),
        "empty.example.org": Credentials("frank", ""),
    }


def test_last_line_for_a_host_wins() -> None:
    e = parse("a|h:1\nb|h:2\n", "f")
    assert e["h"] == Credentials("b", "2")


@pytest.mark.parametrize("line,lineno", [("nobar", 2), ("user|hostonly", 2), ("|h:pw", 2),
                                         ("user|:pw", 2)])
def test_parse_errors_name_file_and_line(line: str, lineno: int) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(f"ok|h:pw\n{line}\n", "/etc/dma/auth.conf")
    assert str(ei.value).startswith(f"/etc/dma/auth.conf:{lineno}: ")
    assert ei.value.line == lineno


def test_credentials_repr_hides_password() -> None:
    assert "s3cret" not in repr(Credentials("u", "s3cret"))
    assert "s3cret" not in repr(AuthTable({"h": Credentials("u", "s3cret")}))


def test_lookup() -> None:
    t = AuthTable({"Smtp.Example.org": Credentials("u", "p")})
    assert t.get("Smtp.Example.org") == Credentials("u", "p")
    assert t.get("smtp.example.org.") == Credentials("u", "p")
    assert t.get("other") is None
    assert "smtp.example.org" in t and len(t) == 1


def test_load_and_permissions(tmp_path: Path) -> None:
    p = tmp_path / "auth.conf"
    p.write_text("u|h:p\n")
    os.chmod(p, 0o600)
    t = load(str(p))
    assert t.get("h") == Credentials("u", "p") and not t.insecure_permissions
    os.chmod(p, 0o644)
    assert load(str(p)).insecure_permissions
    if os.geteuid() == 0:
        os.chmod(p, 0o640)
        os.chown(p, 0, 0)
        assert not load(str(p)).insecure_permissions
        os.chown(p, 0, 4242)  # some other group may read it
        assert load(str(p)).insecure_permissions


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read auth file"):
        load(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_bytes(b"u|h:p\nu|h2:\xff\n")
    with pytest.raises(ConfigError, match=r"bad:2: "):
        load(str(bad))


# -- AUTH in the SMTP client ---------------------------------------------------------------


def config(certs: Certs | None, **kw: Any) -> Config:
    base: dict[str, Any] = dict(mailname="client.test", connect_timeout=5.0,
                                greeting_timeout=10.0, mail_timeout=10.0, rcpt_timeout=10.0,
                                data_timeout=10.0, datablock_timeout=10.0, dot_timeout=10.0)
    if certs is not None:
        base.update(cafile=str(certs.cafile), securetransfer=True, starttls=True)
    base.update(kw)
    return Config(**base)


USERS = {"alice": "s3cret pass"}
TABLE = AuthTable({"localhost": Credentials("alice", "s3cret pass")})


def run(tmp: Path, srv: ScriptedServer | AioSink, cfg: Config,
        auth: AuthTable | None = TABLE, body: bytes = b"Subject: auth\n\nhi\n") -> list[Outcome]:
    msg = spool_message(tmp, body)
    h = Host("localhost", srv.port, (srv.host,))
    return deliver(msg, "s@client.test", ["a@x.test"], [h],
                   Destination("smarthost", "localhost", ("a@x.test",)), cfg, auth,
                   Log(use_syslog=False, fallback_path=os.devnull))


@pytest.mark.parametrize("mechs,used", [(("CRAM-MD5", "PLAIN", "LOGIN"), "CRAM-MD5"),
                                        (("LOGIN", "PLAIN"), "PLAIN"),
                                        (("LOGIN",), "LOGIN"),
                                        (("PLAIN",), "PLAIN"),
                                        (("CRAM-MD5",), "CRAM-MD5")])
def test_auth_success(tmp_path: Path, certs: Certs, mechs: tuple[str, ...], used: str) -> None:
    body = b"Subject: auth\n\n.authenticated\n"
    beh = Behaviour(starttls=certs.server_context(), auth_users=USERS, auth_mechanisms=mechs)
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs), body=body)
    assert outs[0].status == "delivered", outs
    (sess,) = srv.sessions
    assert sess.auth_attempts == [(used, "alice", True)]
    assert not sess.auth_in_cleartext
    txn = sess.transactions[0]
    assert txn.auth_user == "alice" and txn.tls and txn.data == over_data(body)


def test_auth_implicit_tls(tmp_path: Path, certs: Certs) -> None:
    beh = Behaviour(implicit_tls=certs.server_context(), auth_users=USERS)
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs, starttls=False))
    assert outs[0].status == "delivered", outs
    assert srv.transactions[0].auth_user == "alice"


def test_auth_failure_defers_and_sends_nothing(tmp_path: Path, certs: Certs) -> None:
    beh = Behaviour(starttls=certs.server_context(), auth_users={"alice": "other"})
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs))
    assert (outs[0].status, outs[0].dsn) == ("deferred", "4.7.0")
    assert outs[0].reply.startswith("authentication failed for alice at localhost: 535 5.7.8")
    (sess,) = srv.sessions
    assert not any(c.upper().startswith(b"MAIL") for c in sess.commands)
    # every offered mechanism was tried, strongest first
    assert [m for m, _, _ in sess.auth_attempts] == ["CRAM-MD5", "PLAIN", "LOGIN"]


def test_auth_advertised_but_always_failing(tmp_path: Path, certs: Certs) -> None:
    beh = Behaviour(starttls=certs.server_context(), auth_users=USERS, auth_always_fail=True,
                    auth_fail_reply=b"454 4.7.0 Temporary authentication failure\r\n")
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs))
    assert outs[0].status == "deferred"
    assert "authentication failed for alice at localhost: 454 4.7.0" in outs[0].reply
    assert not srv.transactions


def test_no_auth_offered_never_sends_unauthenticated(tmp_path: Path, certs: Certs) -> None:
    with ScriptedServer(Behaviour(starttls=certs.server_context())) as srv:
        outs = run(tmp_path, srv, config(certs))
    assert outs[0].status == "deferred"
    assert "authentication failed for alice at localhost" in outs[0].reply
    assert "does not offer AUTH" in outs[0].reply
    assert not srv.transactions


def test_no_common_mechanism(tmp_path: Path, certs: Certs) -> None:
    beh = Behaviour(starttls=certs.server_context(), auth_users=USERS,
                    auth_mechanisms=("GSSAPI", "XOAUTH2"))
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs))
    assert outs[0].status == "deferred" and "GSSAPI" in outs[0].reply
    assert not srv.transactions


def test_refuses_cleartext_auth(tmp_path: Path) -> None:
    with ScriptedServer(Behaviour(auth_users=USERS)) as srv:
        outs = run(tmp_path, srv, config(None))
    assert (outs[0].status, outs[0].dsn) == ("deferred", "4.7.0")
    assert outs[0].reply == "authentication requires TLS for alice at localhost"
    (sess,) = srv.sessions
    assert not sess.auth_attempts and not sess.transactions
    assert not any(c.upper().startswith(b"AUTH") for c in sess.commands)


def test_insecure_allows_cleartext_auth(tmp_path: Path) -> None:
    with ScriptedServer(Behaviour(auth_users=USERS)) as srv:
        outs = run(tmp_path, srv, config(None, insecure=True))
    assert outs[0].status == "delivered", outs
    assert srv.sessions[0].auth_in_cleartext
    assert srv.transactions[0].auth_user == "alice"


def test_opportunistic_tls_refused_never_auths_in_cleartext(tmp_path: Path, certs: Certs) -> None:
    beh = Behaviour(starttls=certs.server_context(), auth_users=USERS,
                    starttls_reply=b"454 4.7.0 TLS not available\r\n")
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs, opportunistic_tls=True))
    assert outs[0].status == "deferred"
    assert outs[0].reply == "authentication requires TLS for alice at localhost"
    (sess,) = srv.sessions
    assert not sess.auth_attempts and not sess.auth_in_cleartext and not sess.transactions


def test_opportunistic_tls_not_offered_never_auths_in_cleartext(tmp_path: Path,
                                                                 certs: Certs) -> None:
    with ScriptedServer(Behaviour(auth_users=USERS)) as srv:
        outs = run(tmp_path, srv, config(certs, opportunistic_tls=True))
    assert outs[0].status == "deferred" and "requires TLS" in outs[0].reply
    assert not srv.sessions[0].auth_attempts


def test_no_credentials_no_auth(tmp_path: Path, certs: Certs) -> None:
    beh = Behaviour(starttls=certs.server_context(), auth_users=USERS)
    with ScriptedServer(beh) as srv:
        outs = run(tmp_path, srv, config(certs),
                   auth=AuthTable({"elsewhere": Credentials("x", "y")}))
    assert outs[0].status == "delivered"
    assert not srv.sessions[0].auth_attempts


@pytest.mark.parametrize("ok", [True, False])
def test_aiosmtpd_auth(tmp_path: Path, certs: Certs, ok: bool) -> None:
    users = USERS if ok else {"alice": "nope"}
    with AioSink(tls_context=certs.server_context(), require_starttls=True, users=users) as sink:
        outs = run(tmp_path, sink, config(certs))
    if ok:
        assert outs[0].status == "delivered", outs
        assert sink.messages[0].auth_user == "alice" and sink.messages[0].tls
    else:
        assert outs[0].status == "deferred"
        assert "authentication failed for alice at localhost: 535" in outs[0].reply
        assert not sink.messages
