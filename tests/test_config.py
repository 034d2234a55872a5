"""dma.conf parsing: C dma's rules, the extensions, and every error path."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dma import config
from dma.config import Config, load, parse, parse_duration
from dma.errors import EX_CONFIG, ConfigError

HOST = config.system_hostname()
FP_HEX = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF"


def in_child_without_root(fn: Callable[[], object]) -> str:
    """Runs ``fn`` in a forked child that is not root (root can read any file) and
    returns ``str(result)`` or ``TypeName: message`` of what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = str(fn())
        except BaseException as e:  # noqa: BLE001
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode()


def write(tmp_path: Path, text: str, name: str = "dma.conf") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def conf(tmp_path: Path, text: str) -> Config:
    return load(write(tmp_path, text), env={})


def error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    return info.value


# --- which file ------------------------------------------------------------------------


def test_explicit_path_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, "SMARTHOST relay.example\n")
    c = load(path, env={"DMA_CONF": "/nonexistent"})
    assert c.smarthost == "relay.example"
    assert c.path == path


def test_dma_conf_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "PORT 2525\n")
    c = load(env={"DMA_CONF": path})
    assert c.port == 2525 and c.path == path


def test_empty_dma_conf_means_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", "/nonexistent/dma.conf")
    assert config.default_path({"DMA_CONF": ""}) == ("/nonexistent/dma.conf", False)
    assert load(env={"DMA_CONF": ""}).path is None


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", "/nonexistent/dma.conf")
    c = load(env={})
    assert c.path is None
    assert c.mailname == HOST
    assert c.replace(mailname="localhost") == Config()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load(missing, env={})
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"
    assert info.value.path == missing and info.value.line is None
    assert info.value.exit_code == EX_CONFIG


def test_missing_file_named_by_dma_conf_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError, match="nope.conf: cannot read"):
        load(env={"DMA_CONF": missing})


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path), env={})
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "DEFER\n")
    os.chmod(path, 0)
    assert in_child_without_root(lambda: load(path, env={})) == (
        f"ConfigError: {path}: cannot read: Permission denied")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "dma.conf"
    p.write_bytes(b"DEFER\nSMARTHOST h\xffst\n")
    with pytest.raises(ConfigError) as info:
        load(str(p), env={})
    assert str(info.value) == f"{p}:2: the line is not valid UTF-8"


# --- C dma's line rules ----------------------------------------------------------------


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    c = conf(tmp_path, "")
    assert c == Config().replace(path=c.path, mailname=HOST)


def test_comments_and_blank_lines(tmp_path: Path) -> None:
    c = conf(tmp_path, "# a comment\n\n   \nSMARTHOST relay.example # trailing comment\n"
                       "DEFER# glued comment\n#PORT 1\n")
    assert c.smarthost == "relay.example"
    assert c.defer is True
    assert c.port == 25


def test_hash_cuts_a_value(tmp_path: Path) -> None:
    assert conf(tmp_path, "SMARTHOST relay#example\n").smarthost == "relay"


def test_line_starting_with_whitespace_is_ignored_like_c_dma(tmp_path: Path) -> None:
    c = conf(tmp_path, "  SMARTHOST relay.example\n\tBOGUS directive\n")
    assert c.smarthost is None


def test_value_whitespace_is_stripped(tmp_path: Path) -> None:
    c = conf(tmp_path, "SMARTHOST   relay.example  \t \nSPOOLDIR\t/var/spool/x \n")
    assert c.smarthost == "relay.example"
    assert c.spooldir == "/var/spool/x"


def test_crlf_line_endings(tmp_path: Path) -> None:
    c = conf(tmp_path, "SMARTHOST relay.example\r\nDEFER\r\n\r\nPORT 587\r\n")
    assert (c.smarthost, c.defer, c.port) == ("relay.example", True, 587)


def test_tab_separates_keyword(tmp_path: Path) -> None:
    assert conf(tmp_path, "PORT\t465\n").port == 465


def test_last_occurrence_wins(tmp_path: Path) -> None:
    assert conf(tmp_path, "SMARTHOST a.example\nSMARTHOST b.example\n").smarthost == "b.example"


def test_boolean_repeated_is_fine(tmp_path: Path) -> None:
    assert conf(tmp_path, "DEFER\nDEFER\n").defer is True


def test_unknown_directive(tmp_path: Path) -> None:
    e = error(tmp_path, "DEFER\nFOO bar\n")
    assert str(e) == f"{tmp_path / 'dma.conf'}:2: unknown directive 'FOO'"
    assert e.line == 2 and e.path == str(tmp_path / "dma.conf")


def test_keywords_are_case_sensitive(tmp_path: Path) -> None:
    e = error(tmp_path, "smarthost relay.example\n")
    assert str(e).endswith(":1: unknown directive 'smarthost' (did you mean 'SMARTHOST'?)")


def test_commented_secure_placeholder_uncommented(tmp_path: Path) -> None:
    # C dma's sample ships "#SECURE"; uncommenting it is a syntax error there too
    assert "unknown directive 'SECURE'" in str(error(tmp_path, "SECURE\n"))


@pytest.mark.parametrize("key", ["SMARTHOST", "PORT", "ALIASES", "SPOOLDIR", "AUTHPATH",
                                 "CERTFILE", "MAILNAME", "MASQUERADE", "FINGERPRINT",
                                 "MAILSPOOL", "MAILBOXFORMAT", "RESOLVER", "CAFILE", "MX_TLS",
                                 "CONNECT_TIMEOUT", "MAX_PARALLEL", "RETRY_MIN", "LIFETIME",
                                 "DELAY_WARNING", "LOGFILE"])
@pytest.mark.parametrize("tail", ["", "   ", " # comment"])
def test_string_directive_needs_a_value(tmp_path: Path, key: str, tail: str) -> None:
    assert str(error(tmp_path, f"{key}{tail}\n")).endswith(f":1: {key} needs a value")


@pytest.mark.parametrize("key", ["SECURETRANSFER", "STARTTLS", "OPPORTUNISTIC_TLS",
                                 "VERIFYCERT", "INSECURE", "DEFER", "FULLBOUNCE",
                                 "NULLCLIENT", "TLS_NOVERIFY"])
def test_boolean_directive_takes_no_value(tmp_path: Path, key: str) -> None:
    assert str(error(tmp_path, f"{key} yes\n")).endswith(f":1: {key} takes no value")


@pytest.mark.parametrize("key,field", [
    ("SECURETRANSFER", "securetransfer"), ("STARTTLS", "starttls"),
    ("OPPORTUNISTIC_TLS", "opportunistic_tls"), ("VERIFYCERT", "verifycert"),
    ("INSECURE", "insecure"), ("DEFER", "defer"), ("FULLBOUNCE", "fullbounce"),
    ("TLS_NOVERIFY", "tls_noverify")])
def test_boolean_directives(tmp_path: Path, key: str, field: str) -> None:
    assert getattr(conf(tmp_path, f"{key}   \n"), field) is True
    assert getattr(Config(), field) is False


def test_nul_byte_is_an_error(tmp_path: Path) -> None:
    assert str(error(tmp_path, "DEFER\nSMARTHOST a\0b\n")).endswith(
        ":2: the line contains a NUL byte")


def test_full_c_dma_file(tmp_path: Path) -> None:
    c = conf(tmp_path, f"""\
# C dma's sample, filled in
SMARTHOST mail.example.org
PORT 587
ALIASES /etc/mail/aliases
SPOOLDIR /var/spool/dma2
AUTHPATH /etc/dma/auth.conf
CERTFILE /etc/dma/cert.pem
SECURETRANSFER
STARTTLS
OPPORTUNISTIC_TLS
VERIFYCERT
FINGERPRINT {FP_HEX}
INSECURE
DEFER
FULLBOUNCE
MAILNAME mail.example.org
MASQUERADE john@example.net
NULLCLIENT
""")
    assert c.smarthost == "mail.example.org"
    assert c.port == 587
    assert c.aliases == "/etc/mail/aliases"
    assert c.spooldir == "/var/spool/dma2"
    assert c.authpath == "/etc/dma/auth.conf"
    assert c.certfile == "/etc/dma/cert.pem"
    assert c.securetransfer and c.starttls and c.opportunistic_tls and c.verifycert
    assert c.fingerprint == bytes.fromhex(FP_HEX)
    assert c.insecure and c.defer and c.fullbounce and c.nullclient
    assert c.mailname == "mail.example.org"
    assert (c.masquerade_user, c.masquerade_host) == ("john", "example.net")


# --- PORT -----------------------------------------------------------------------------


@pytest.mark.parametrize("value,port", [("1", 1), ("25", 25), ("0587", 587), ("65535", 65535)])
def test_port(tmp_path: Path, value: str, port: int) -> None:
    assert conf(tmp_path, f"PORT {value}\n").port == port


@pytest.mark.parametrize("value", ["abc", "0", "65536", "-1", "+25", "25x", "2 5", "25.0",
                                   "\u0662\u0665"])
def test_bad_port(tmp_path: Path, value: str) -> None:
    e = error(tmp_path, f"PORT {value}\n")
    assert str(e).endswith(f":1: PORT needs a number from 1 to 65535, got {value!r}")


# --- FINGERPRINT ----------------------------------------------------------------------


def test_fingerprint_mixed_case(tmp_path: Path) -> None:
    fp = conf(tmp_path, f"FINGERPRINT {FP_HEX}\n").fingerprint
    assert fp is not None and len(fp) == 32 and fp.hex() == FP_HEX.lower()


@pytest.mark.parametrize("value", [FP_HEX[:-1], FP_HEX + "0", "g" * 64,
                                   ":".join(FP_HEX[i:i + 2] for i in range(0, 64, 2)),
                                   FP_HEX[:30] + " " + FP_HEX[31:]])
def test_bad_fingerprint(tmp_path: Path, value: str) -> None:
    e = error(tmp_path, f"FINGERPRINT {value}\n")
    assert "FINGERPRINT needs the SHA-256 of the certificate as exactly 64 hex digits" in str(e)
    assert e.line == 1


def test_empty_fingerprint(tmp_path: Path) -> None:
    # C dma crashes here (strlen(NULL))
    assert str(error(tmp_path, "FINGERPRINT\n")).endswith(":1: FINGERPRINT needs a value")


# --- MAILNAME -------------------------------------------------------------------------


def test_mailname_literal_kept_as_is(tmp_path: Path) -> None:
    assert conf(tmp_path, "MAILNAME Mail.Example.ORG\n").mailname == "Mail.Example.ORG"


def test_mailname_default_is_sanitised_hostname(tmp_path: Path) -> None:
    assert conf(tmp_path, "DEFER\n").mailname == HOST
    assert HOST and all(ch.isalnum() or ch in "_.-" for ch in HOST)


def test_mailname_from_file(tmp_path: Path) -> None:
    (tmp_path / "mailname").write_text("mx.example.org\nsecond.line\n")
    c = conf(tmp_path, f"MAILNAME {tmp_path / 'mailname'}\n")
    assert c.mailname == "mx.example.org"


def test_mailname_file_is_sanitised(tmp_path: Path) -> None:
    (tmp_path / "mailname").write_text("mx.example.org extra words\n")
    assert conf(tmp_path, f"MAILNAME {tmp_path / 'mailname'}\n").mailname == "mx.example.org"
    (tmp_path / "mailname").write_text("mx_1-a.example\r\n")
    assert conf(tmp_path, f"MAILNAME {tmp_path / 'mailname'}\n").mailname == "mx_1-a.example"


@pytest.mark.parametrize("content", ["", "\n", " leading.space\n", "!bang\n", "\u00e9t\u00e9\n"])
def test_mailname_file_unusable_falls_back_to_hostname(tmp_path: Path, content: str) -> None:
    (tmp_path / "mailname").write_text(content)
    assert conf(tmp_path, f"MAILNAME {tmp_path / 'mailname'}\n").mailname == HOST


def test_mailname_file_missing_falls_back_to_hostname(tmp_path: Path) -> None:
    assert conf(tmp_path, f"MAILNAME {tmp_path / 'missing'}\n").mailname == HOST


def test_mailname_file_is_directory_falls_back(tmp_path: Path) -> None:
    assert conf(tmp_path, f"MAILNAME {tmp_path}\n").mailname == HOST


def test_sanitise_hostname_rules() -> None:
    assert config._sanitise_hostname("host.example") == "host.example"
    assert config._sanitise_hostname("host.example\n") == "host.example"
    assert config._sanitise_hostname("a b") == "a"
    assert config._sanitise_hostname("h\u00f6st") == "h"
    assert config.resolve_mailname("literal with space") == "literal with space"
    assert config.resolve_mailname(None) == HOST
    assert config.resolve_mailname("") == HOST


# --- MASQUERADE -----------------------------------------------------------------------


@pytest.mark.parametrize("value,user,host", [
    ("john@", "john", None),
    ("example.net", None, "example.net"),
    ("john@example.net", "john", "example.net"),
    ("@example.net", None, "example.net"),
    ("@", None, None),
    ("a@b@example.net", "a@b", "example.net"),  # C dma splits at the last '@'
])
def test_masquerade(tmp_path: Path, value: str, user: str | None, host: str | None) -> None:
    c = conf(tmp_path, f"MASQUERADE {value}\n")
    assert (c.masquerade_user, c.masquerade_host) == (user, host)


# --- NULLCLIENT -----------------------------------------------------------------------


def test_nullclient_with_smarthost(tmp_path: Path) -> None:
    c = conf(tmp_path, "NULLCLIENT\nSMARTHOST relay.example\n")
    assert c.nullclient and c.smarthost == "relay.example"


def test_nullclient_without_smarthost(tmp_path: Path) -> None:
    e = error(tmp_path, "DEFER\nNULLCLIENT\n")
    assert str(e) == f"{tmp_path / 'dma.conf'}:2: NULLCLIENT needs SMARTHOST"


# --- extensions -----------------------------------------------------------------------


def test_extension_defaults() -> None:
    c = Config()
    assert c.mailspool == "/var/mail" and c.mailbox_format == "mbox"
    assert c.resolver is None and c.cafile is None and not c.tls_noverify
    assert c.mx_tls == "may"
    assert (c.connect_timeout, c.greeting_timeout, c.mail_timeout, c.rcpt_timeout,
            c.data_timeout, c.datablock_timeout, c.dot_timeout) == (
        30, 300, 300, 300, 120, 180, 600)
    assert c.max_parallel == 8
    assert (c.retry_min, c.retry_max, c.lifetime) == (300, 3 * 3600, 5 * 86400)
    assert c.delay_warning is None and c.logfile is None


def test_mailspool_and_format(tmp_path: Path) -> None:
    c = conf(tmp_path, "MAILSPOOL /srv/mail\nMAILBOXFORMAT Maildir\n")
    assert (c.mailspool, c.mailbox_format) == ("/srv/mail", "maildir")


def test_bad_mailbox_format(tmp_path: Path) -> None:
    assert str(error(tmp_path, "MAILBOXFORMAT mh\n")).endswith(
        ":1: MAILBOXFORMAT needs one of mbox, maildir, got 'mh'")


@pytest.mark.parametrize("key", ["MAILSPOOL", "CAFILE", "LOGFILE"])
def test_extension_paths_must_be_absolute(tmp_path: Path, key: str) -> None:
    assert str(error(tmp_path, f"{key} relative/path\n")).endswith(
        f":1: {key} needs an absolute path, got 'relative/path'")


def test_cafile_and_logfile(tmp_path: Path) -> None:
    c = conf(tmp_path, "CAFILE /etc/dma/ca.pem\nLOGFILE /var/log/dma.log\n")
    assert (c.cafile, c.logfile) == ("/etc/dma/ca.pem", "/var/log/dma.log")
    assert c.log_path == "/var/log/dma.log"
    assert Config(spooldir="/sp").log_path == "/sp/dma.log"


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)),
    ("[::1]", ("::1", 53)),
    ("::1", ("::1", 53)),
    ("2001:DB8::1", ("2001:db8::1", 53)),
])
def test_resolver(tmp_path: Path, value: str, expected: tuple[str, int]) -> None:
    assert conf(tmp_path, f"RESOLVER {value}\n").resolver == expected


@pytest.mark.parametrize("value,why", [
    ("dns.example", "needs an IP address"),
    ("dns.example:53", "needs an IP address"),
    ("127.0.0.1:0", "needs a port from 1 to 65535"),
    ("127.0.0.1:99999", "needs a port from 1 to 65535"),
    ("127.0.0.1:x", "needs a port from 1 to 65535"),
    ("[::1", "has an unclosed '['"),
    ("[::1]5353", "needs [address]:port"),
    ("[::1]:", "needs a port from 1 to 65535"),
    ("[127.0.0.256]:53", "needs an IP address"),
])
def test_bad_resolver(tmp_path: Path, value: str, why: str) -> None:
    e = error(tmp_path, f"RESOLVER {value}\n")
    assert f":1: RESOLVER {why}" in str(e) and repr(value) in str(e)


@pytest.mark.parametrize("value", ["none", "may", "encrypt", "verify", "VERIFY"])
def test_mx_tls(tmp_path: Path, value: str) -> None:
    assert conf(tmp_path, f"MX_TLS {value}\n").mx_tls == value.lower()


def test_bad_mx_tls(tmp_path: Path) -> None:
    assert str(error(tmp_path, "MX_TLS dane\n")).endswith(
        ":1: MX_TLS needs one of none, may, encrypt, verify, got 'dane'")


def test_tls_noverify_contradicts_verifycert(tmp_path: Path) -> None:
    e = error(tmp_path, "VERIFYCERT\nDEFER\nTLS_NOVERIFY\n")
    assert str(e).endswith(":3: TLS_NOVERIFY contradicts VERIFYCERT; remove one of them")


@pytest.mark.parametrize("key,field", [
    ("CONNECT_TIMEOUT", "connect_timeout"), ("GREETING_TIMEOUT", "greeting_timeout"),
    ("MAIL_TIMEOUT", "mail_timeout"), ("RCPT_TIMEOUT", "rcpt_timeout"),
    ("DATA_TIMEOUT", "data_timeout"), ("DATABLOCK_TIMEOUT", "datablock_timeout"),
    ("DOT_TIMEOUT", "dot_timeout"), ("RETRY_MIN", "retry_min"), ("LIFETIME", "lifetime"),
    ("DELAY_WARNING", "delay_warning")])
def test_duration_directives(tmp_path: Path, key: str, field: str) -> None:
    assert getattr(conf(tmp_path, f"{key} 90\n"), field) == 90.0
    assert getattr(conf(tmp_path, f"{key} 2m\n"), field) == 120.0
    assert isinstance(getattr(conf(tmp_path, f"{key} 2m\n"), field), float)


@pytest.mark.parametrize("key", ["CONNECT_TIMEOUT", "RETRY_MIN", "RETRY_MAX", "LIFETIME",
                                 "DELAY_WARNING", "DOT_TIMEOUT"])
@pytest.mark.parametrize("value", ["0", "0s", "-5", "5x", "m", "1.m", ".5", "1e3", "inf",
                                   "5 m"])
def test_bad_durations(tmp_path: Path, key: str, value: str) -> None:
    e = error(tmp_path, f"{key} {value}\n")
    assert str(e).endswith(f":1: {key} needs a duration greater than zero such as 90, 90s,"
                           f" 5m, 3h, 5d or 1w, got {value!r}")


@pytest.mark.parametrize("text,seconds", [
    ("90", 90), ("90s", 90), ("5m", 300), ("3h", 10800), ("5d", 432000), ("1w", 604800),
    ("1.5m", 90), ("0", 0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", "s", "m", "h", "d", "w"]))
def test_parse_duration_property(n: int, unit: str) -> None:
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(f"{n}{unit}") == n * factor


def test_retry_and_lifetime(tmp_path: Path) -> None:
    c = conf(tmp_path, "RETRY_MIN 1m\nRETRY_MAX 1h\nLIFETIME 1w\nDELAY_WARNING 4h\n")
    assert (c.retry_min, c.retry_max, c.lifetime, c.delay_warning) == (60, 3600, 604800, 14400)


def test_retry_max_below_retry_min(tmp_path: Path) -> None:
    e = error(tmp_path, "RETRY_MIN 10m\nRETRY_MAX 5m\n")
    assert str(e).endswith(":2: RETRY_MAX (300s) is shorter than RETRY_MIN (600s)")
    e = error(tmp_path, "RETRY_MIN 4h\n")  # above the default RETRY_MAX of 3h
    assert str(e).endswith(":1: RETRY_MAX (10800s) is shorter than RETRY_MIN (14400s)")


def test_max_parallel(tmp_path: Path) -> None:
    assert conf(tmp_path, "MAX_PARALLEL 1\n").max_parallel == 1
    assert conf(tmp_path, "MAX_PARALLEL 32\n").max_parallel == 32


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_max_parallel(tmp_path: Path, value: str) -> None:
    assert str(error(tmp_path, f"MAX_PARALLEL {value}\n")).endswith(
        f":1: MAX_PARALLEL needs a whole number of at least 1, got {value!r}")


# --- Config itself --------------------------------------------------------------------


def test_config_is_frozen() -> None:
    c = Config()
    with pytest.raises(AttributeError, match="cannot assign to field 'port'"):
        c.port = 2
    with pytest.raises(AttributeError):
        c.no_such_field = 2  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        del c.port
    assert c.port == 25


def test_handwritten_init_matches_fields() -> None:
    params = list(inspect.signature(Config.__init__).parameters.values())[1:]
    names = list(Config.__slots__)
    assert [p.name for p in params] == names == list(Config.__annotations__)
    assert [p.annotation for p in params] == [Config.__annotations__[n] for n in names]
    c = Config()
    assert [p.default for p in params] == [getattr(c, n) for n in names]
    defaults: list[Any] = [p.default for p in params]
    assert Config(*defaults) == c
    assert Config(*defaults).replace(port=2) == Config(port=2)
    assert c.replace() == c and c.replace() is not c
    with pytest.raises(TypeError):
        c.replace(no_such_field=1)


def test_config_pickles_and_copies() -> None:
    import copy
    import pickle

    c = Config(port=2, resolver=("127.0.0.1", 53), fingerprint=b"x" * 32)
    assert pickle.loads(pickle.dumps(c)) == c
    assert copy.copy(c) == c == copy.deepcopy(c)


def test_config_equality_and_hash() -> None:
    assert Config(port=2) == Config(port=2) != Config(port=3)
    assert hash(Config(port=2)) == hash(Config(port=2))
    assert "port=2" in repr(Config(port=2))


def test_every_directive_maps_to_a_field() -> None:
    names = set(Config.__slots__)
    for key, (field, _parser) in config._DIRECTIVES.items():
        assert field in names or key == "MASQUERADE"


def test_local_domains() -> None:
    c = Config(mailname="Mail.Example.ORG")
    assert c.local_domains == {"mail.example.org", "localhost", HOST.lower()}
    assert all(d == d.lower() for d in c.local_domains)


def test_load_is_independent_of_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "PORT 26\n")
    monkeypatch.chdir(tmp_path)
    assert load("dma.conf", env={}).port == 26


def test_parse_text_directly() -> None:
    c = parse("SMARTHOST relay.example\nMAILNAME me.example\n", "/x/dma.conf")
    assert (c.path, c.smarthost, c.mailname) == ("/x/dma.conf", "relay.example", "me.example")
    with pytest.raises(ConfigError, match=r"^/x/dma.conf:1: unknown directive 'X'$"):
        parse("X\n", "/x/dma.conf")
