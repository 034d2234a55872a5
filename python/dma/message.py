"""The header block of a submitted message: what dma adds, removes and reads from it.

The Rust spool writer hands us the head of the input (everything up to the first empty line,
LF line endings); we return the head to write instead.  Rules, as C dma and sendmail:

* a ``From `` / ``>From `` line at the very start (an mbox separator) is dropped;
* ``Received:`` is always prepended;
* ``Date:``, ``Message-ID:`` and ``From:`` are added when missing (at the end of the header
  section), also for CRLF input and for messages without a header/body separator;
* ``Bcc:`` is always removed; with ``-t`` To/Cc/Bcc are returned as recipients.

Parsing is done by hand: ``email.parser`` costs ~20 ms of start-up on every ``sendmail`` call.
"""

from __future__ import annotations

import time

from dma.record import Frozen, Record

_ADDRESS_FIELDS = (b"to", b"cc", b"bcc")


# The classes below are plain classes rather than dataclasses: ``dataclasses`` costs
# milliseconds of every ``sendmail`` start.  They keep the dataclass behaviour (keyword
# arguments, equality by value, repr; Identity is immutable).


class Header(Record):
    __slots__ = ("name", "raw")

    name: bytes
    """As written (case kept)."""
    raw: bytes
    """The whole field including continuation lines and the final LF."""

    def __init__(self, name: bytes, raw: bytes) -> None:
        self.name = name
        self.raw = raw

    @property
    def key(self) -> bytes:
        return self.name.strip().lower()

    @property
    def value(self) -> str:
        """The unfolded value, decoded leniently (UTF-8, invalid bytes replaced)."""
        body = self.raw.split(b":", 1)[1]
        unfolded = b" ".join(part.strip() for part in body.split(b"\n") if part.strip())
        return unfolded.decode("utf-8", "replace")


class Head(Record):
    __slots__ = ("headers", "rest", "has_separator")

    headers: list[Header]
    rest: bytes
    """What follows the header section: the separating empty line and any body bytes."""
    has_separator: bool

    def __init__(self, headers: list[Header] | None = None, rest: bytes = b"",
                 has_separator: bool = False) -> None:
        self.headers = [] if headers is None else headers
        self.rest = rest
        self.has_separator = has_separator

    def has(self, key: bytes) -> bool:
        return any(h.key == key for h in self.headers)

    def values(self, keys: tuple[bytes, ...]) -> list[str]:
        return [h.value for h in self.headers if h.key in keys]


def _field_name(line: bytes) -> bytes | None:
    """The field name if ``line`` starts a header field (RFC 5322 ftext, obsolete WSP
    before the colon tolerated), else None."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")
    if not name or any(c < 33 or c > 126 for c in name):
        return None
    return line[:colon]


def parse_head(head: bytes) -> Head:
    """Split the head block into header fields and what follows them."""
    if head.startswith(b"From ") or head.startswith(b">From "):
        nl = head.find(b"\n")
        head = b"" if nl < 0 else head[nl + 1:]
    result = Head()
    pos = 0
    n = len(head)
    while pos < n:
        nl = head.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        line = head[pos:end]
        if line in (b"\n", b"\r\n"):
            result.has_separator = True
            break
        if line[:1] in (b" ", b"\t") and result.headers:
            result.headers[-1].raw += line
            pos = end
            continue
        name = _field_name(line)
        if name is None:
            break
        if not line.endswith(b"\n"):
            # A header block cut at EOF without a newline: complete the line.
            line += b"\n"
        result.headers.append(Header(name, line))
        pos = end
    result.rest = head[pos:]
    return result


class Identity(Frozen):
    """Who submitted and how to name them in the headers we add."""

    __slots__ = ("sender", "user", "uid", "full_name", "mailname", "version")

    sender: str
    """Envelope sender; "" for the null sender."""
    user: str
    uid: int
    full_name: str
    mailname: str
    version: str

    def __init__(self, sender: str, user: str, uid: int, full_name: str = "",
                 mailname: str = "localhost", version: str = "") -> None:
        _set = object.__setattr__
        _set(self, "sender", sender)
        _set(self, "user", user)
        _set(self, "uid", uid)
        _set(self, "full_name", full_name)
        _set(self, "mailname", mailname)
        _set(self, "version", version)


def _format_date(now: float) -> str:
    """RFC 5322 date in local time, independent of the locale."""
    t = time.localtime(now)
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
              "Dec")
    off = t.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return (f"{days[t.tm_wday]}, {t.tm_mday:02d} {months[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}")


_SPECIALS = set('()<>[]:;@\\,."')


def _display_name(name: str) -> str:
    """A display name as a header phrase: RFC 2047-encoded when not ASCII, quoted when it
    contains specials."""
    name = " ".join(name.split())
    if not name.isascii():
        import base64

        return "=?utf-8?b?" + base64.b64encode(name.encode()).decode() + "?="
    if any(c in _SPECIALS for c in name):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return name


def rewrite(head: Head, ident: Identity, queue_id: str, now: float) -> bytes:
    """The head to spool: Received first, Bcc gone, missing Date/Message-ID/From added."""
    date = _format_date(now)
    who = ident.sender or "<>"
    out = [
        (f"Received: from {ident.user} (uid {ident.uid})\n"
         f"\t(envelope-from <{ident.sender}>)\n"
         f"\tid {queue_id}\n"
         f"\tby {ident.mailname} (dma {ident.version});\n"
         f"\t{date}\n").encode()
    ]
    out.extend(h.raw for h in head.headers if h.key != b"bcc")
    if not head.has(b"date"):
        out.append(f"Date: {date}\n".encode())
    if not head.has(b"message-id"):
        out.append(f"Message-ID: <{queue_id}@{ident.mailname}>\n".encode())
    if not head.has(b"from"):
        if ident.full_name:
            out.append(f"From: {_display_name(ident.full_name)} <{who}>\n".encode())
        else:
            out.append(f"From: {who}\n".encode())
    if head.has_separator:
        out.append(head.rest)
    elif head.rest:
        # Body text straight after the headers (or no headers at all): the empty line
        # that separates them is added so the body is not read as a header.
        out.append(b"\n")
        out.append(head.rest)
    return b"".join(out)


def header_recipients(head: Head) -> list[str]:
    """Raw To/Cc/Bcc values for ``-t`` (Resent-* fields are ignored, as C dma does)."""
    return head.values(_ADDRESS_FIELDS)
