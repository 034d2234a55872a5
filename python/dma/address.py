"""Envelope addresses: RFC 5321 mailboxes (with RFC 6531 UTF-8 local parts).

``parse_mailbox`` checks one address as given to ``sendmail`` (``-f``, recipients) and
returns an :class:`Address`; ``parse_header_addresses`` pulls the addresses out of a
To/Cc/Bcc value for ``sendmail -t``.  Every refusal is an
:class:`~dma.errors.AddressError` naming the address (control characters shown escaped)
and what is wrong with it.

This module is on the ``sendmail`` start-up path: ``ipaddress`` is imported only for
address literals and the ``idna`` codec only for non-ASCII domains.
"""

from __future__ import annotations

from dma.errors import AddressError
from dma.record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

MAX_LOCAL = 64
"""Octets in a local part (RFC 5321 4.5.3.1.1), counted in its quoted form."""
MAX_ADDRESS = 254
"""Octets in a whole address (RFC 5321 path limit of 256 less the angle brackets)."""
MAX_DOMAIN = 255
MAX_LABEL = 63

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ATEXT = frozenset(_ALNUM + "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset(_ALNUM + "-")
_IDEOGRAPHIC_DOTS = ("\u3002", "\uff0e", "\uff61")  # treated as "." (RFC 3490 3.1)


class Address(Frozen):
    """A mailbox: ``local`` is the local part unquoted (``john doe`` for
    ``"john doe"@example.org``); ``domain`` is None for a bare local user name, else the
    domain as given (``Bücher.example``) or an address literal with its brackets
    (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).  Build it with :func:`parse_mailbox`.

    Immutable, compared and hashed by value.  A plain class rather than a dataclass:
    ``dataclasses`` costs milliseconds of every ``sendmail`` start."""

    __slots__ = ("local", "domain")

    local: str
    domain: str | None

    def __init__(self, local: str, domain: str | None = None) -> None:
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "domain", domain)

    def __str__(self) -> str:
        local = quote_local(self.local)
        return local if self.domain is None else f"{local}@{self.domain}"

    @property
    def is_local(self) -> bool:
        """A bare user name without ``@domain``."""
        return self.domain is None

    @property
    def domain_ascii(self) -> str | None:
        """The domain for DNS and SMTP: lower-case IDNA (``xn--bcher-kva.example``);
        an address literal unchanged; None for a bare local name."""
        domain = self.domain
        if domain is None or domain.startswith("["):
            return domain
        if domain.isascii():
            return domain.lower()
        return ".".join(_label_ascii(label) for label in domain.split(".")).lower()

    @property
    def address_ascii(self) -> str:
        """The address with its domain in ASCII form (the local part unchanged)."""
        local = quote_local(self.local)
        return local if self.domain is None else f"{local}@{self.domain_ascii}"

    @property
    def needs_smtputf8(self) -> bool:
        """The local part is not ASCII, so only an SMTPUTF8 server can take it."""
        return not self.local.isascii()

    @property
    def literal_ip(self) -> str | None:
        """The IP address of an address-literal domain (``[IPv6:::1]`` -> ``::1``)."""
        domain = self.domain
        if domain is None or not domain.startswith("["):
            return None
        inner = domain[1:-1]
        return inner[5:] if inner[:5].lower() == "ipv6:" else inner


def _is_dot_atom(local: str) -> bool:
    if not local or local[0] == "." or local[-1] == "." or ".." in local:
        return False
    return all(ch in _ATEXT or ch == "." or ch > "\x7f" for ch in local)


def quote_local(local: str) -> str:
    """The local part as written in an address: as is when it is a dot-atom, else a
    quoted string with ``\\`` and ``"`` escaped."""
    if _is_dot_atom(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label_ascii(label: str) -> str:
    return label if label.isascii() else label.encode("idna").decode("ascii")


def _fail(text: str, reason: str) -> NoReturn:
    shown = text if len(text) <= 100 else text[:100] + "..."
    raise AddressError(f"invalid address {shown!r}: {reason}")


def _check_printable(text: str) -> None:
    if text.isprintable():
        return
    for ch in text:
        if not ch.isprintable():
            if ch in "\r\n":
                _fail(text, "contains a line break")
            if ch == "\0":
                _fail(text, "contains a NUL character")
            if ch == "\t":
                _fail(text, "contains a tab")
            if ch < "\xa0":
                _fail(text, f"contains the control character {ch!r}")
            _fail(text, f"contains the non-printable character {ch!r}")


def _quoted_local(text: str, s: str) -> tuple[str, int]:
    """Parses the quoted string at the start of ``s``; returns its content and the
    index just past the closing quote."""
    out: list[str] = []
    i, n = 1, len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            if i + 1 >= n:
                break
            out.append(s[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    _fail(text, "unbalanced quotes")


def _check_dot_atom(text: str, local: str) -> None:
    if not local:
        _fail(text, "empty local part")
    for ch in local:
        if ch in _ATEXT or ch == "." or ch > "\x7f":
            continue
        if ch == " ":
            _fail(text, "space outside quotes")
        if ch == '"':
            if local.count('"') % 2:
                _fail(text, "unbalanced quotes")
            _fail(text, "quotes must enclose the whole local part")
        if ch in "<>":
            _fail(text, "unbalanced angle brackets")
        if ch in "()":
            _fail(text, "comments are not allowed in an envelope address")
        _fail(text, f"character {ch!r} must be quoted in the local part")
    if local[0] == ".":
        _fail(text, "local part starts with a dot")
    if local[-1] == ".":
        _fail(text, "local part ends with a dot")
    if ".." in local:
        _fail(text, "two dots in a row in the local part")


def _check_literal(text: str, domain: str) -> None:
    import ipaddress  # only for address literals

    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        ip = inner[5:]
        try:
            if "%" in ip:
                raise ValueError(ip)
            ipaddress.IPv6Address(ip)
        except ValueError:
            _fail(text, f"{ip!r} is not an IPv6 address")
    elif ":" in inner:
        _fail(text, "unsupported address literal (expected [IPv4] or [IPv6:address])")
    else:
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            _fail(text, f"{inner!r} is not an IPv4 address")


def _check_domain(text: str, domain: str) -> str:
    """Checks a domain (or address literal); returns it with ideographic dots as '.'."""
    if not domain:
        _fail(text, "missing domain after '@'")
    if domain[0] == "[":
        if domain[-1] != "]" or "]" in domain[:-1]:
            _fail(text, "unbalanced brackets in the address literal")
        _check_literal(text, domain)
        return domain
    if not domain.isascii():
        for dot in _IDEOGRAPHIC_DOTS:
            domain = domain.replace(dot, ".")
    if domain[0] == ".":
        _fail(text, "domain starts with a dot")
    if domain[-1] == ".":
        _fail(text, "domain ends with a dot")
    total = -1
    for label in domain.split("."):
        if not label:
            _fail(text, "two dots in a row in the domain")
        for ch in label:
            if ch in _LDH or ch > "\x7f":
                continue
            if ch == "@":
                _fail(text, "more than one '@' (quote the local part if it contains one)")
            if ch in "[]":
                _fail(text, "unbalanced brackets in the domain")
            if ch in "<>":
                _fail(text, "unbalanced angle brackets")
            if ch == " ":
                _fail(text, "space in the domain")
            _fail(text, f"character {ch!r} is not allowed in a domain")
        try:
            ascii_label = _label_ascii(label)
        except UnicodeError:
            _fail(text, f"domain label {label!r} cannot be encoded as IDNA")
        if len(ascii_label) > MAX_LABEL:
            _fail(text, f"domain label {label[:20]!r}... is longer than {MAX_LABEL} characters")
        if ascii_label[0] == "-" or ascii_label[-1] == "-":
            _fail(text, f"domain label {label!r} starts or ends with a hyphen")
        total += len(ascii_label) + 1
    if total > MAX_DOMAIN:
        _fail(text, f"domain is longer than {MAX_DOMAIN} characters")
    return domain


def _strip_route(text: str, s: str) -> str:
    """Drops an RFC 5321 source route (``@a,@b:user@c`` -> ``user@c``), which servers
    must accept and ignore, after checking its syntax."""
    colon = s.find(":")
    if colon < 0:
        _fail(text, "missing local part before '@'")
    for hop in s[:colon].split(","):
        if not hop.startswith("@"):
            _fail(text, "malformed source route")
        _check_domain(text, hop[1:])
    return s[colon + 1:]


def parse_mailbox(text: str, *, allow_local: bool = True) -> Address:
    """Parses one envelope address: ``local@domain``, optionally in ``<...>``; a bare
    local name when ``allow_local``.  The null sender ``<>`` is not a mailbox (callers
    handle it before calling this).  Raises AddressError."""
    _check_printable(text)
    s = text
    if s.startswith("<"):
        if len(s) < 2 or not s.endswith(">"):
            _fail(text, "unbalanced angle brackets")
        s = s[1:-1]
        if s.startswith("@"):
            s = _strip_route(text, s)
    elif s.endswith(">"):
        if "<" in s:
            _fail(text, "text before '<' (give only the address, without a name)")
        _fail(text, "unbalanced angle brackets")
    if not s:
        _fail(text, "empty address")
    domain: str | None
    if s[0] == '"':
        local, end = _quoted_local(text, s)
        if not local:
            _fail(text, "empty local part")
        rest = s[end:]
        if not rest:
            domain = None
        elif rest[0] == "@":
            domain = rest[1:]
        else:
            _fail(text, "text after the closing quote of the local part")
    else:
        local, at, domain_text = s.partition("@")
        _check_dot_atom(text, local)
        domain = domain_text if at else None
    if domain is None:
        if not allow_local:
            _fail(text, "no domain (expected user@domain)")
    else:
        domain = _check_domain(text, domain)
    address = Address(local, domain)
    local_len = len(quote_local(local).encode("utf-8", "surrogatepass"))
    if local_len > MAX_LOCAL:
        _fail(text, f"local part is {local_len} octets long, more than {MAX_LOCAL}")
    total = len(str(address).encode("utf-8", "surrogatepass"))
    if total > MAX_ADDRESS:
        _fail(text, f"address is {total} octets long, more than {MAX_ADDRESS}")
    return address


# --- header addresses (sendmail -t) ---------------------------------------------------

_SPECIALS = "<>:;,@.]"
_WORD_KINDS = ("atom", "qs", "dl")


def _unfold(value: str) -> str:
    lines = value.replace("\r\n", "\n").replace("\r", " ").split("\n")
    out = lines[0]
    for line in lines[1:]:
        out += line if line[:1] in (" ", "\t") else " " + line
    return out


def _tokenize(value: str) -> list[tuple[str, str]]:
    """RFC 5322 lexical tokens: (kind, text) with kind atom, qs (quoted string, quotes
    kept), dl (domain literal), ws (whitespace or a comment) or the special itself."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch in " \t":
            while i < n and value[i] in " \t":
                i += 1
            tokens.append(("ws", " "))
        elif ch == "(":
            depth = 0
            while i < n:
                c = value[i]
                if c == "\\":
                    i += 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= n:
                raise AddressError(f"invalid address list {value!r}: unbalanced parentheses")
            i += 1
            tokens.append(("ws", " "))
        elif ch in "\"[":
            close = '"' if ch == '"' else "]"
            j = i + 1
            while j < n and value[j] != close:
                j += 2 if value[j] == "\\" else 1
            if j >= n:
                what = "quotes" if ch == '"' else "brackets"
                raise AddressError(f"invalid address list {value!r}: unbalanced {what}")
            tokens.append(("qs" if ch == '"' else "dl", value[i:j + 1]))
            i = j + 1
        elif ch in _SPECIALS:
            tokens.append((ch, ch))
            i += 1
        else:
            j = i
            while j < n and value[j] not in _SPECIALS and value[j] not in ' \t("[':
                j += 1
            tokens.append(("atom", value[i:j]))
            i = j
    return tokens


def _spec_text(value: str, tokens: list[tuple[str, str]]) -> str:
    """Joins the tokens of an addr-spec, dropping whitespace around '.' and '@'; two
    words separated only by whitespace are an error (a missing comma)."""
    words: list[tuple[str, str]] = []
    for token in tokens:  # a comment next to a space is one separator
        if not (token[0] == "ws" and words and words[-1][0] == "ws"):
            words.append(token)
    while words and words[0][0] == "ws":
        words.pop(0)
    while words and words[-1][0] == "ws":
        words.pop()
    out: list[str] = []
    for k, (kind, text) in enumerate(words):
        if kind == "ws":
            if words[k - 1][0] in _WORD_KINDS and words[k + 1][0] in _WORD_KINDS:
                shown = "".join(t for _, t in words)
                raise AddressError(
                    f"invalid address {shown!r} in {value!r}: words separated by a space"
                    " (a missing ',' between addresses, or a name without <address>?)")
            continue
        out.append(text)
    return "".join(out)


def parse_header_addresses(value: str) -> list[Address]:
    """The addresses in a To/Cc/Bcc header value (possibly folded): ``a@b``,
    ``Name <a@b>``, ``"Name, Q" <a@b> (comment)``, groups ``team: a@b, c@d;``, and bare
    local names.  Each one is checked with :func:`parse_mailbox`; an empty group
    (``undisclosed-recipients:;``) gives nothing.  Raises AddressError."""
    text = _unfold(value)
    tokens = _tokenize(text)
    result: list[Address] = []
    element: list[tuple[str, str]] = []
    angle: list[tuple[str, str]] | None = None
    in_angle = in_group = False

    def finish() -> None:
        nonlocal angle
        if angle is not None:
            result.append(parse_mailbox("<" + _spec_text(text, angle) + ">"))
        else:
            spec = _spec_text(text, element)
            if spec:
                result.append(parse_mailbox(spec))
        element.clear()
        angle = None

    for token in tokens:
        kind = token[0]
        if in_angle:
            assert angle is not None
            if kind == ">":
                in_angle = False
            elif kind == "<":
                raise AddressError(f"invalid address list {text!r}: unbalanced angle brackets")
            else:
                angle.append(token)
        elif kind == "<":
            if angle is not None:
                raise AddressError(f"invalid address list {text!r}: two <addresses>"
                                   " without a ',' between them")
            in_angle, angle = True, []
        elif kind == ">":
            raise AddressError(f"invalid address list {text!r}: unbalanced angle brackets")
        elif kind == ":" and not in_group and angle is None:
            in_group = True  # what came before was the group's name
            element.clear()
        elif kind == "," or (kind == ";" and in_group):
            finish()
            in_group = in_group and kind == ","
        elif kind == ";":
            raise AddressError(f"invalid address list {text!r}: ';' outside a group")
        elif angle is not None:
            if kind != "ws":
                raise AddressError(f"invalid address list {text!r}: text after '>'"
                                   " (a missing ','?)")
        else:
            element.append(token)
    if in_angle:
        raise AddressError(f"invalid address list {text!r}: unbalanced angle brackets")
    finish()
    return result
