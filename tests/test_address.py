"""Envelope address syntax (RFC 5321 / RFC 6531) and header address lists (sendmail -t)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dma.address import (
    MAX_ADDRESS,
    MAX_LOCAL,
    Address,
    parse_header_addresses,
    parse_mailbox,
    quote_local,
)
from dma.errors import EX_DATAERR, AddressError, DataError

# --- accepted -------------------------------------------------------------------------


@pytest.mark.parametrize("text,local,domain", [
    ("user@example.org", "user", "example.org"),
    ("<user@example.org>", "user", "example.org"),
    ("first.last@example.org", "first.last", "example.org"),
    ("a+tag@example.org", "a+tag", "example.org"),
    ("!#$%&'*+-/=?^_`{|}~@example.org", "!#$%&'*+-/=?^_`{|}~", "example.org"),
    ("User@Example.ORG", "User", "Example.ORG"),
    ("u@localhost", "u", "localhost"),
    ("u@a-b.c-d.example", "u", "a-b.c-d.example"),
    ("u@123.example", "u", "123.example"),
    ("u@xn--bcher-kva.example", "u", "xn--bcher-kva.example"),
    ('"john doe"@example.org', "john doe", "example.org"),
    ('"john"@example.org', "john", "example.org"),
    ('"a\\"b"@example.org', 'a"b', "example.org"),
    ('"a\\\\b"@example.org', "a\\b", "example.org"),
    ('"a@b"@example.org', "a@b", "example.org"),
    ('".leading"@example.org', ".leading", "example.org"),
    ('"a..b"@example.org', "a..b", "example.org"),
    ("u@[192.0.2.1]", "u", "[192.0.2.1]"),
    ("u@[IPv6:2001:db8::1]", "u", "[IPv6:2001:db8::1]"),
    ("u@[ipv6:::1]", "u", "[ipv6:::1]"),
    ("u@[IPv6:::ffff:192.0.2.1]", "u", "[IPv6:::ffff:192.0.2.1]"),
    ("<@relay.example,@other.example:u@example.org>", "u", "example.org"),
    ("<@relay.example:u@example.org>", "u", "example.org"),
    ("j\u00f6rg@example.org", "j\u00f6rg", "example.org"),
    ("\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a", "\u7528\u6237", "\u4f8b\u5b50.\u5e7f\u544a"),
    ("u@b\u00fccher.example", "u", "b\u00fccher.example"),
    ("u@b\u00fccher\u3002example", "u", "b\u00fccher.example"),  # ideographic full stop
    ("root", "root", None),
    ("<root>", "root", None),
    ('"odd user"', "odd user", None),
])
def test_valid(text: str, local: str, domain: str | None) -> None:
    a = parse_mailbox(text)
    assert (a.local, a.domain) == (local, domain)


def test_str_quotes_only_when_needed() -> None:
    assert str(parse_mailbox('"john"@example.org')) == "john@example.org"
    assert str(parse_mailbox('"john doe"@example.org')) == '"john doe"@example.org'
    assert str(parse_mailbox('"a\\"b"@x.example')) == '"a\\"b"@x.example'
    assert str(parse_mailbox('"a\\\\b"@x.example')) == '"a\\\\b"@x.example'
    assert str(parse_mailbox('"a..b"@x.example')) == '"a..b"@x.example'
    assert str(parse_mailbox("<u@example.org>")) == "u@example.org"
    assert str(parse_mailbox("root")) == "root"
    assert str(Address("a b")) == '"a b"'


def test_quote_local() -> None:
    assert quote_local("plain.name") == "plain.name"
    assert quote_local("") == '""'
    assert quote_local("a b") == '"a b"'
    assert quote_local(".a") == '".a"'
    assert quote_local("a.") == '"a."'
    assert quote_local('q"\\') == '"q\\"\\\\"'
    assert quote_local("j\u00f6rg") == "j\u00f6rg"


def test_domain_ascii() -> None:
    assert parse_mailbox("u@B\u00fccher.Example").domain_ascii == "xn--bcher-kva.example"
    assert parse_mailbox("u@Example.ORG").domain_ascii == "example.org"
    assert parse_mailbox("u@[192.0.2.1]").domain_ascii == "[192.0.2.1]"
    assert parse_mailbox("root").domain_ascii is None
    assert parse_mailbox("u@b\u00fccher.example").address_ascii == "u@xn--bcher-kva.example"
    assert parse_mailbox('"a b"@b\u00fccher.example').address_ascii == (
        '"a b"@xn--bcher-kva.example')
    assert parse_mailbox("root").address_ascii == "root"


def test_needs_smtputf8() -> None:
    assert parse_mailbox("j\u00f6rg@example.org").needs_smtputf8
    assert not parse_mailbox("joerg@b\u00fccher.example").needs_smtputf8
    assert not parse_mailbox("root").needs_smtputf8


def test_literal_ip_and_is_local() -> None:
    assert parse_mailbox("u@[192.0.2.1]").literal_ip == "192.0.2.1"
    assert parse_mailbox("u@[IPv6:2001:db8::1]").literal_ip == "2001:db8::1"
    assert parse_mailbox("u@example.org").literal_ip is None
    assert parse_mailbox("root").literal_ip is None
    assert parse_mailbox("root").is_local
    assert not parse_mailbox("u@example.org").is_local


def test_address_is_frozen_and_hashable() -> None:
    a = parse_mailbox("u@example.org")
    assert a == Address("u", "example.org")
    assert len({a, Address("u", "example.org")}) == 1
    with pytest.raises(AttributeError):
        a.local = "v"  # type: ignore[misc]


def test_limits_accepted_at_the_edge() -> None:
    local = "a" * MAX_LOCAL
    assert parse_mailbox(f"{local}@example.org").local == local
    label = "b" * 63
    assert parse_mailbox(f"u@{label}.example").domain == f"{label}.example"
    # 254 octets exactly
    domain = ".".join(["c" * 61] * 4)  # 247 characters
    text = "abcdef@" + domain
    assert len(text) == MAX_ADDRESS
    assert str(parse_mailbox(text)) == text


def test_allow_local_false() -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox("root", allow_local=False)
    assert str(info.value) == "invalid address 'root': no domain (expected user@domain)"
    assert parse_mailbox("root@example.org", allow_local=False).domain == "example.org"


def test_address_error_is_a_data_error() -> None:
    with pytest.raises(DataError) as info:
        parse_mailbox("")
    assert info.value.exit_code == EX_DATAERR


# --- refused: one precise message each -------------------------------------------------


@pytest.mark.parametrize("text,reason", [
    ("", "empty address"),
    ("<>", "empty address"),
    ("user@", "missing domain after '@'"),
    ("<user@>", "missing domain after '@'"),
    ("@example.org", "empty local part"),
    ('""@example.org', "empty local part"),
    ("a..b@example.org", "two dots in a row in the local part"),
    (".a@example.org", "local part starts with a dot"),
    ("a.@example.org", "local part ends with a dot"),
    ("a b@example.org", "space outside quotes"),
    (" a@example.org", "space outside quotes"),
    ("a@example.org ", "space in the domain"),
    ("a@exa mple.org", "space in the domain"),
    ("a\r\n@example.org", "contains a line break"),
    ("a@example.org\n", "contains a line break"),
    ("a\0@example.org", "contains a NUL character"),
    ("a\t@example.org", "contains a tab"),
    ("a\x01@example.org", "contains the control character '\\x01'"),
    ("a\x7f@example.org", "contains the control character '\\x7f'"),
    ("a\x85@example.org", "contains the control character '\\x85'"),
    ('"a\x01"@example.org', "contains the control character '\\x01'"),
    ("a\u3000b@example.org", "contains the non-printable character '\\u3000'"),
    ("a@example\u2028.org", "contains the non-printable character '\\u2028'"),
    ('"abc@example.org', "unbalanced quotes"),
    ('"abc\\"@example.org', "unbalanced quotes"),
    ('a"b@example.org', "unbalanced quotes"),
    ('a"b"c@example.org', "quotes must enclose the whole local part"),
    ('"a"b@example.org', "text after the closing quote of the local part"),
    ("<a@example.org", "unbalanced angle brackets"),
    ("a@example.org>", "unbalanced angle brackets"),
    ("<", "unbalanced angle brackets"),
    ("a<b@example.org", "unbalanced angle brackets"),
    ("Name <a@example.org>", "text before '<' (give only the address, without a name)"),
    ("a(comment)@example.org", "comments are not allowed in an envelope address"),
    ("a,b@example.org", "character ',' must be quoted in the local part"),
    ("a:b@example.org", "character ':' must be quoted in the local part"),
    ("a\\b@example.org", "character '\\\\' must be quoted in the local part"),
    ("a@b@example.org", "more than one '@' (quote the local part if it contains one)"),
    ("a@.example.org", "domain starts with a dot"),
    ("a@example.org.", "domain ends with a dot"),
    ("a@example..org", "two dots in a row in the domain"),
    ("a@-example.org", "domain label '-example' starts or ends with a hyphen"),
    ("a@example-.org", "domain label 'example-' starts or ends with a hyphen"),
    ("a@exa_mple.org", "character '_' is not allowed in a domain"),
    ("a@exa!mple.org", "character '!' is not allowed in a domain"),
    ("a@[192.0.2.1", "unbalanced brackets in the address literal"),
    ("a@[192.0.2.1]x", "unbalanced brackets in the address literal"),
    ("a@192.0.2.1]", "unbalanced brackets in the domain"),
    ("a@[192.0.2]", "'192.0.2' is not an IPv4 address"),
    ("a@[192.0.2.256]", "'192.0.2.256' is not an IPv4 address"),
    ("a@[010.0.2.1]", "'010.0.2.1' is not an IPv4 address"),
    ("a@[]", "'' is not an IPv4 address"),
    ("a@[IPv6:2001:db8::g]", "'2001:db8::g' is not an IPv6 address"),
    ("a@[IPv6:fe80::1%eth0]", "'fe80::1%eth0' is not an IPv6 address"),
    ("a@[2001:db8::1]", "unsupported address literal (expected [IPv4] or [IPv6:address])"),
    ("a@[x-tag:stuff]", "unsupported address literal (expected [IPv4] or [IPv6:address])"),
    ("<@relay.example u@example.org>", "missing local part before '@'"),
    ("<@relay..example:u@example.org>", "two dots in a row in the domain"),
    ("<relay.example,@x:u@example.org>", "character ',' must be quoted in the local part"),
])
def test_invalid(text: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox(text)
    assert str(info.value) == f"invalid address {text!r}: {reason}"


def test_malformed_source_route() -> None:
    with pytest.raises(AddressError, match="malformed source route"):
        parse_mailbox("<@a.example,b.example:u@example.org>")


def test_message_escapes_control_characters() -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox("evil\r\nRCPT TO:<x@y>")
    message = str(info.value)
    assert "\r" not in message and "\n" not in message
    assert "evil\\r\\nRCPT" in message


def test_message_truncates_long_input() -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox("a" * 1000 + " b@example.org")
    assert len(str(info.value)) < 200 and "..." in str(info.value)


def test_local_part_too_long() -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox("a" * 65 + "@example.org")
    assert str(info.value).endswith(": local part is 65 octets long, more than 64")


def test_local_part_limit_counts_octets_and_quotes() -> None:
    with pytest.raises(AddressError, match="local part is 66 octets long"):
        parse_mailbox("\u00e9" * 33 + "@example.org")
    with pytest.raises(AddressError, match="local part is 65 octets long"):
        parse_mailbox('"' + "a " * 31 + 'a"@example.org')  # 63 characters + 2 quotes


def test_label_too_long() -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox("a@" + "b" * 64 + ".example")
    assert str(info.value).endswith(": domain label 'bbbbbbbbbbbbbbbbbbbb'... is longer than 63"
                                    " characters")


def test_domain_too_long() -> None:
    domain = ".".join(["c" * 63] * 4) + ".example"  # 264 characters
    with pytest.raises(AddressError, match="domain is longer than 255 characters"):
        parse_mailbox("a@" + domain)


def test_address_too_long() -> None:
    domain = ".".join(["c" * 61] * 4)  # 247 characters
    with pytest.raises(AddressError, match="address is 255 octets long, more than 254"):
        parse_mailbox("abcdefg@" + domain)


def test_idna_failure() -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox("a@" + "\u00e9" * 70 + ".example")
    assert "cannot be encoded as IDNA" in str(info.value)
    with pytest.raises(AddressError, match="cannot be encoded as IDNA"):
        parse_mailbox("a@\u05d0x.example")  # bidi rule: Hebrew letter mixed with Latin


# --- properties ---------------------------------------------------------------------------

_atext = st.sampled_from(list("abcxyzABZ019!#$%&'*+-/=?^_`{|}~") + ["\u00e9", "\u4f8b"])
_atom = st.text(_atext, min_size=1, max_size=8)
_dot_atom = st.lists(_atom, min_size=1, max_size=4).map(".".join)
_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_quoted_content = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                          max_size=30)


@given(_dot_atom, _domain)
def test_roundtrip_dot_atom(local: str, domain: str) -> None:
    text = f"{local}@{domain}"
    if len(local.encode()) > MAX_LOCAL:
        return
    a = parse_mailbox(text)
    assert (a.local, a.domain) == (local, domain)
    assert str(a) == text
    assert parse_mailbox(f"<{text}>") == a


@given(_quoted_content, _domain)
def test_roundtrip_any_local_part(local: str, domain: str) -> None:
    a = Address(local, domain)
    if len(quote_local(local)) > MAX_LOCAL:
        with pytest.raises(AddressError):
            parse_mailbox(str(a))
        return
    assert parse_mailbox(str(a)) == a


@given(st.text(max_size=40))
def test_never_crashes(text: str) -> None:
    try:
        a = parse_mailbox(text)
    except AddressError as e:
        assert "\n" not in str(e) and "\r" not in str(e)
    else:
        assert parse_mailbox(str(a)) == a
        assert a.domain_ascii is None or a.domain_ascii.isascii()


# --- header address lists (sendmail -t) -------------------------------------------------


def addrs(value: str) -> list[str]:
    return [str(a) for a in parse_header_addresses(value)]


@pytest.mark.parametrize("value,expected", [
    ("", []),
    ("   ", []),
    ("a@example.org", ["a@example.org"]),
    ("a@example.org, b@example.org", ["a@example.org", "b@example.org"]),
    ("Joe <j@example.org>", ["j@example.org"]),
    ('"Doe, J" <d@example.org>, Joe <j@example.org>', ["d@example.org", "j@example.org"]),
    ("J. R. Doe <d@example.org>", ["d@example.org"]),
    ("=?utf-8?q?J=C3=B6rg?= <j@example.org>", ["j@example.org"]),
    ("j@example.org (Joe Bloggs)", ["j@example.org"]),
    ("Joe (the (nested) one) <j@example.org> (after)", ["j@example.org"]),
    ("team: a@example.org, b@example.org;", ["a@example.org", "b@example.org"]),
    ("team: a@example.org;, c@example.org", ["a@example.org", "c@example.org"]),
    ("undisclosed-recipients:;", []),
    ("team: a@example.org", ["a@example.org"]),  # a missing ';' at the end is forgiven
    ("a@example.org,,b@example.org,", ["a@example.org", "b@example.org"]),
    ('"john doe"@example.org', ['"john doe"@example.org']),
    ("root, admin", ["root", "admin"]),
    ("M\u00fcller <m\u00fc@b\u00fc.example>", ["m\u00fc@b\u00fc.example"]),
    ("<@relay.example,@b.example:u@example.org>", ["u@example.org"]),
    ("john . doe @ example . org", ["john.doe@example.org"]),
    ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
    ("a@example.org,\r\n b@example.org", ["a@example.org", "b@example.org"]),
    ("a@example.org,\n\tb@example.org", ["a@example.org", "b@example.org"]),
    ('"folded\r\n name" <a@example.org>', ["a@example.org"]),
])
def test_header_addresses(value: str, expected: list[str]) -> None:
    assert addrs(value) == expected


@pytest.mark.parametrize("value,reason", [
    ("a@example.org b@example.org", "words separated by a space"),
    ("John Doe", "words separated by a space"),
    ("a@example.org\nb@example.org", "words separated by a space"),
    ("garbage <<", "unbalanced angle brackets"),
    ("<a@example.org", "unbalanced angle brackets"),
    ("a@example.org>", "unbalanced angle brackets"),
    ("x@y.example (unterminated", "unbalanced parentheses"),
    ('"unterminated <a@example.org>', "unbalanced quotes"),
    ("a@[192.0.2.1", "unbalanced brackets"),
    ("<a@example.org> <b@example.org>", "two <addresses> without a ',' between them"),
    ("<a@example.org> trailing", "text after '>'"),
    ("a@example.org;", "';' outside a group"),
    ("<>", "empty address"),
    ("a@b@example.org", "more than one '@'"),
    ("a..b@example.org", "two dots in a row in the local part"),
    ("Joe <a b@example.org>", "words separated by a space"),
])
def test_header_addresses_invalid(value: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_header_addresses(value)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


@given(st.lists(st.tuples(st.sampled_from(["", "Joe", '"Doe, J"', "A. B."]),
                          _dot_atom, _domain), max_size=5))
def test_header_roundtrip(entries: list[tuple[str, str, str]]) -> None:
    entries = [e for e in entries if len(e[1].encode()) <= MAX_LOCAL]
    value = ", ".join(f"{n} <{lp}@{d}>" if n else f"{lp}@{d}" for n, lp, d in entries)
    assert addrs(value) == [f"{lp}@{d}" for _, lp, d in entries]


@given(st.text(max_size=60))
def test_header_never_crashes(value: str) -> None:
    try:
        parse_header_addresses(value)
    except AddressError:
        pass
