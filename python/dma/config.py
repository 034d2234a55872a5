"""dma.conf: C dma's format, read once into an immutable Config.

The file is read the way C dma's ``conf.c: parse_conf`` reads it, so an existing
``/etc/dma/dma.conf`` means the same thing here:

* everything from the first ``#`` to the end of the line is discarded (values cannot
  contain ``#``);
* the keyword runs up to the first space or tab; a line whose first character is a space
  or a tab therefore has an empty keyword and is ignored, exactly as C dma ignores it;
* keywords are case-sensitive, an unknown keyword is an error;
* string keywords need a value, boolean keywords must not have one;
* when a keyword is repeated the last one wins;
* ``NULLCLIENT`` without ``SMARTHOST`` is an error once the whole file has been read.

One deliberate difference: the whitespace around a value is stripped (C dma keeps it
as part of the value, where it only ever causes bugs, e.g. ``SMARTHOST host `` with a
trailing space that makes every DNS lookup fail).  Values are checked more strictly
than C dma's ``atoi``: ``PORT abc`` is an error here instead of port 0.

Extensions have new directive names (C dma rejects them, so no file that C dma accepts
changes meaning): MAILSPOOL, MAILBOXFORMAT, RESOLVER, CAFILE, TLS_NOVERIFY, MX_TLS, the
*_TIMEOUT directives, MAX_PARALLEL, RETRY_MIN, RETRY_MAX, LIFETIME, DELAY_WARNING and
LOGFILE.

Every error is a :class:`~dma.errors.ConfigError` rendered ``FILE:LINE: what is wrong``.
This module is on the ``sendmail`` start-up path: it imports nothing heavy.
"""

from __future__ import annotations

import os

from dma.errors import ConfigError
from dma.record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

DEFAULT_PATH = "/etc/dma/dma.conf"

MX_TLS_POLICIES = ("none", "may", "encrypt", "verify")
MAILBOX_FORMATS = ("mbox", "maildir")

_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_HEX = frozenset("0123456789abcdefABCDEF")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class Config(Frozen):
    """The configuration: immutable (attributes are read-only), compared and hashed by
    value; :meth:`replace` makes a changed copy.

    A plain class rather than a dataclass: ``dataclasses`` costs milliseconds of every
    ``sendmail`` start.  test_config checks that ``__init__`` matches the fields."""

    __slots__ = (
        "path", "smarthost", "port", "aliases", "spooldir", "authpath", "certfile",
        "securetransfer", "starttls", "opportunistic_tls", "verifycert", "fingerprint",
        "insecure", "defer", "fullbounce", "mailname", "masquerade_user", "masquerade_host",
        "nullclient", "mailspool", "mailbox_format", "resolver", "cafile", "tls_noverify",
        "mx_tls", "connect_timeout", "greeting_timeout", "mail_timeout", "rcpt_timeout",
        "data_timeout", "datablock_timeout", "dot_timeout", "max_parallel", "retry_min",
        "retry_max", "lifetime", "delay_warning", "logfile",
    )

    path: str | None
    """The file this was read from (None: defaults only, no file)."""
    smarthost: str | None
    port: int
    aliases: str
    spooldir: str
    authpath: str | None
    certfile: str | None
    securetransfer: bool
    starttls: bool
    opportunistic_tls: bool
    verifycert: bool
    fingerprint: bytes | None
    """SHA-256 of the peer's leaf certificate (32 bytes)."""
    insecure: bool
    defer: bool
    fullbounce: bool
    mailname: str
    """Resolved host identity (MAILNAME literal, first line of a MAILNAME file, or hostname)."""
    masquerade_user: str | None
    masquerade_host: str | None
    nullclient: bool
    # Extensions (not in C dma)
    mailspool: str
    mailbox_format: str
    """``mbox`` or ``maildir`` (MAILBOXFORMAT directive)."""
    resolver: tuple[str, int] | None
    """DNS server to ask (IP address, port) instead of /etc/resolv.conf (RESOLVER)."""
    cafile: str | None
    """PEM bundle of CA certificates used instead of the system store (CAFILE)."""
    tls_noverify: bool
    """Do not verify the smarthost's certificate (TLS_NOVERIFY); verified by default."""
    mx_tls: str
    """TLS policy for direct MX delivery: ``none``, ``may``, ``encrypt`` or ``verify``."""
    connect_timeout: float
    greeting_timeout: float
    mail_timeout: float
    rcpt_timeout: float
    data_timeout: float
    datablock_timeout: float
    dot_timeout: float
    max_parallel: int
    """Most deliveries a queue run makes at the same time."""
    retry_min: float
    """First retry interval in seconds; doubles up to ``retry_max``."""
    retry_max: float
    lifetime: float
    """Seconds after which an undeliverable message is bounced."""
    delay_warning: float | None
    """Seconds after which the sender is told about a delay (None: never)."""
    logfile: str | None
    """Log file used when there is no syslog (None: ``<SPOOLDIR>/dma.log``)."""

    def __init__(
        self,
        path: str | None = None,
        smarthost: str | None = None,
        port: int = 25,
        aliases: str = "/etc/aliases",
        spooldir: str = "/var/spool/dma",
        authpath: str | None = None,
        certfile: str | None = None,
        securetransfer: bool = False,
        starttls: bool = False,
        opportunistic_tls: bool = False,
        verifycert: bool = False,
        fingerprint: bytes | None = None,
        insecure: bool = False,
        defer: bool = False,
        fullbounce: bool = False,
        mailname: str = "localhost",
        masquerade_user: str | None = None,
        masquerade_host: str | None = None,
        nullclient: bool = False,
        mailspool: str = "/var/mail",
        mailbox_format: str = "mbox",
        resolver: tuple[str, int] | None = None,
        cafile: str | None = None,
        tls_noverify: bool = False,
        mx_tls: str = "may",
        connect_timeout: float = 30.0,
        greeting_timeout: float = 300.0,
        mail_timeout: float = 300.0,
        rcpt_timeout: float = 300.0,
        data_timeout: float = 120.0,
        datablock_timeout: float = 180.0,
        dot_timeout: float = 600.0,
        max_parallel: int = 8,
        retry_min: float = 300.0,
        retry_max: float = 10800.0,
        lifetime: float = 432000.0,
        delay_warning: float | None = None,
        logfile: str | None = None,
    ) -> None:
        _set = object.__setattr__
        _set(self, "path", path)
        _set(self, "smarthost", smarthost)
        _set(self, "port", port)
        _set(self, "aliases", aliases)
        _set(self, "spooldir", spooldir)
        _set(self, "authpath", authpath)
        _set(self, "certfile", certfile)
        _set(self, "securetransfer", securetransfer)
        _set(self, "starttls", starttls)
        _set(self, "opportunistic_tls", opportunistic_tls)
        _set(self, "verifycert", verifycert)
        _set(self, "fingerprint", fingerprint)
        _set(self, "insecure", insecure)
        _set(self, "defer", defer)
        _set(self, "fullbounce", fullbounce)
        _set(self, "mailname", mailname)
        _set(self, "masquerade_user", masquerade_user)
        _set(self, "masquerade_host", masquerade_host)
        _set(self, "nullclient", nullclient)
        _set(self, "mailspool", mailspool)
        _set(self, "mailbox_format", mailbox_format)
        _set(self, "resolver", resolver)
        _set(self, "cafile", cafile)
        _set(self, "tls_noverify", tls_noverify)
        _set(self, "mx_tls", mx_tls)
        _set(self, "connect_timeout", connect_timeout)
        _set(self, "greeting_timeout", greeting_timeout)
        _set(self, "mail_timeout", mail_timeout)
        _set(self, "rcpt_timeout", rcpt_timeout)
        _set(self, "data_timeout", data_timeout)
        _set(self, "datablock_timeout", datablock_timeout)
        _set(self, "dot_timeout", dot_timeout)
        _set(self, "max_parallel", max_parallel)
        _set(self, "retry_min", retry_min)
        _set(self, "retry_max", retry_max)
        _set(self, "lifetime", lifetime)
        _set(self, "delay_warning", delay_warning)
        _set(self, "logfile", logfile)

    @property
    def local_domains(self) -> frozenset[str]:
        """The domains that mean "this host", lower-case: the mail name, ``localhost``
        and the system host name."""
        return frozenset({self.mailname.lower(), "localhost", system_hostname().lower()})

    @property
    def log_path(self) -> str:
        """Where log lines go when there is no syslog."""
        return self.logfile or os.path.join(self.spooldir, "dma.log")


_DEFAULTS = Config()


def _sanitise_hostname(name: str) -> str:
    """C dma's rule: keep the name up to the first character outside [A-Za-z0-9_.-]."""
    for i, ch in enumerate(name):
        if ch not in _HOSTNAME_CHARS:
            return name[:i]
    return name


def system_hostname() -> str:
    """gethostname() sanitised like C dma's ``systemhostname``; never empty."""
    try:
        name = os.uname().nodename
    except OSError:  # pragma: no cover - uname does not fail on Linux
        name = ""
    return _sanitise_hostname(name[:255]) or "unknown-hostname"


def resolve_mailname(value: str | None) -> str:
    """C dma's ``hostname()``: a literal name, the first line of an absolute file name
    (sanitised; an unreadable or empty file falls back to the host name), or the host
    name when unset."""
    if not value:
        return system_hostname()
    if not value.startswith("/"):
        return value
    try:
        with open(value, "rb") as f:
            first = f.readline(255)
    except OSError:
        return system_hostname()
    return _sanitise_hostname(first.decode("ascii", "replace")) or system_hostname()


# --- value parsers: each takes (keyword, value) and returns the field value ---------------


class _Bad(Exception):
    """A value is wrong; the parser adds file and line."""


def _string(key: str, value: str) -> str:
    return value


def _abs_path(key: str, value: str) -> str:
    if not value.startswith("/"):
        raise _Bad(f"{key} needs an absolute path, got {value!r}")
    return value


def _port(key: str, value: str) -> int:
    if value.isascii() and value.isdigit() and 1 <= int(value) <= 65535:
        return int(value)
    raise _Bad(f"{key} needs a number from 1 to 65535, got {value!r}")


def _positive_int(key: str, value: str) -> int:
    if value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    raise _Bad(f"{key} needs a whole number of at least 1, got {value!r}")


def parse_duration(text: str) -> float | None:
    """``90``, ``90s``, ``1.5m``, ``3h``, ``5d``, ``1w`` -> seconds; None when malformed."""
    factor = 1.0
    number = text
    if text and text[-1] in _DURATION_UNITS:
        factor = _DURATION_UNITS[text[-1]]
        number = text[:-1]
    if (not number or not number.isascii() or number.count(".") > 1
            or number[0] == "." or number[-1] == "."
            or not number.replace(".", "").isdigit()):
        return None
    return float(number) * factor


def _duration(key: str, value: str) -> float:
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        raise _Bad(f"{key} needs a duration greater than zero such as 90, 90s, 5m, 3h, 5d"
                   f" or 1w, got {value!r}")
    return seconds


def _fingerprint(key: str, value: str) -> bytes:
    if len(value) != 64 or not _HEX.issuperset(value):
        raise _Bad(f"{key} needs the SHA-256 of the certificate as exactly 64 hex digits,"
                   f" got {value!r}")
    return bytes.fromhex(value)


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(key: str, value: str) -> str:
        if value.lower() in choices:
            return value.lower()
        raise _Bad(f"{key} needs one of {', '.join(choices)}, got {value!r}")

    return parse


def _resolver(key: str, value: str) -> tuple[str, int]:
    import ipaddress  # only when RESOLVER is used

    host, port = value, "53"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise _Bad(f"{key} has an unclosed '[' in {value!r}")
        host, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise _Bad(f"{key} needs [address]:port, got {value!r}")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise _Bad(f"{key} needs a port from 1 to 65535, got {value!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _Bad(f"{key} needs an IP address (host[:port], [IPv6]:port),"
                   f" got {value!r}") from None
    return str(address), int(port)


# keyword -> (field, parser); parser None means a boolean (no value allowed)
_DIRECTIVES: dict[str, tuple[str, Callable[[str, str], Any] | None]] = {
    "SMARTHOST": ("smarthost", _string),
    "PORT": ("port", _port),
    "ALIASES": ("aliases", _string),
    "SPOOLDIR": ("spooldir", _string),
    "AUTHPATH": ("authpath", _string),
    "CERTFILE": ("certfile", _string),
    "SECURETRANSFER": ("securetransfer", None),
    "STARTTLS": ("starttls", None),
    "OPPORTUNISTIC_TLS": ("opportunistic_tls", None),
    "VERIFYCERT": ("verifycert", None),
    "FINGERPRINT": ("fingerprint", _fingerprint),
    "INSECURE": ("insecure", None),
    "DEFER": ("defer", None),
    "FULLBOUNCE": ("fullbounce", None),
    "MAILNAME": ("mailname", _string),
    "MASQUERADE": ("masquerade", _string),
    "NULLCLIENT": ("nullclient", None),
    # extensions
    "MAILSPOOL": ("mailspool", _abs_path),
    "MAILBOXFORMAT": ("mailbox_format", _choice(MAILBOX_FORMATS)),
    "RESOLVER": ("resolver", _resolver),
    "CAFILE": ("cafile", _abs_path),
    "TLS_NOVERIFY": ("tls_noverify", None),
    "MX_TLS": ("mx_tls", _choice(MX_TLS_POLICIES)),
    "CONNECT_TIMEOUT": ("connect_timeout", _duration),
    "GREETING_TIMEOUT": ("greeting_timeout", _duration),
    "MAIL_TIMEOUT": ("mail_timeout", _duration),
    "RCPT_TIMEOUT": ("rcpt_timeout", _duration),
    "DATA_TIMEOUT": ("data_timeout", _duration),
    "DATABLOCK_TIMEOUT": ("datablock_timeout", _duration),
    "DOT_TIMEOUT": ("dot_timeout", _duration),
    "MAX_PARALLEL": ("max_parallel", _positive_int),
    "RETRY_MIN": ("retry_min", _duration),
    "RETRY_MAX": ("retry_max", _duration),
    "LIFETIME": ("lifetime", _duration),
    "DELAY_WARNING": ("delay_warning", _duration),
    "LOGFILE": ("logfile", _abs_path),
}

DIRECTIVES: frozenset[str] = frozenset(_DIRECTIVES)
"""Every keyword dma.conf accepts."""


def parse(text: str, path: str = "dma.conf") -> Config:
    """Parses the contents of a dma.conf; ``path`` is only used in messages and
    ``Config.path``.  MAILNAME is resolved (a file name is read)."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0]
        if "\0" in line:
            raise ConfigError("the line contains a NUL byte", path, lineno)
        if not line.strip() or line[0] in " \t":
            continue  # blank, or C dma's empty keyword: the line is ignored
        cut = min((i for i in (line.find(" "), line.find("\t")) if i >= 0), default=len(line))
        key, value = line[:cut].rstrip("\r\v\f"), line[cut:].strip()
        entry = _DIRECTIVES.get(key)
        if entry is None:
            hint = f" (did you mean '{key.upper()}'?)" if key.upper() in _DIRECTIVES else ""
            raise ConfigError(f"unknown directive {key!r}{hint}", path, lineno)
        field, parser = entry
        if parser is None:
            if value:
                raise ConfigError(f"{key} takes no value", path, lineno)
            values[field] = True
        else:
            if not value:
                raise ConfigError(f"{key} needs a value", path, lineno)
            try:
                values[field] = parser(key, value)
            except _Bad as e:
                raise ConfigError(str(e), path, lineno) from None
        lines[key] = lineno

    masquerade = values.pop("masquerade", None)
    if masquerade is not None:
        # C dma: split at the last '@'; an empty part is unset
        user, at, host = masquerade.rpartition("@")
        values["masquerade_user"] = user or None
        values["masquerade_host"] = host or None
    if values.get("nullclient") and not values.get("smarthost"):
        raise ConfigError("NULLCLIENT needs SMARTHOST", path, lines["NULLCLIENT"])
    if values.get("verifycert") and values.get("tls_noverify"):
        raise ConfigError("TLS_NOVERIFY contradicts VERIFYCERT; remove one of them",
                          path, max(lines["VERIFYCERT"], lines["TLS_NOVERIFY"]))
    retry_min = values.get("retry_min", _DEFAULTS.retry_min)
    retry_max = values.get("retry_max", _DEFAULTS.retry_max)
    if retry_max < retry_min:
        which = "RETRY_MAX" if "RETRY_MAX" in lines else "RETRY_MIN"
        raise ConfigError(f"RETRY_MAX ({retry_max:g}s) is shorter than RETRY_MIN"
                          f" ({retry_min:g}s)", path, lines[which])
    values["mailname"] = resolve_mailname(values.get("mailname"))
    return Config(path=path, **values)


def default_path(env: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """The file to read and whether it was named explicitly (``$DMA_CONF``)."""
    named = env.get("DMA_CONF")
    if named:
        return named, True
    return DEFAULT_PATH, False


def load(path: str | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Reads dma.conf: ``path`` if given, else ``$DMA_CONF``, else /etc/dma/dma.conf.

    A missing default file means all defaults (as in C dma); a file named explicitly
    (argument or ``$DMA_CONF``) must exist.  Errors are ConfigError naming the file.
    """
    explicit = path is not None
    if path is None:
        path, explicit = default_path(env)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        if explicit:
            raise ConfigError(f"cannot read: {e.strerror}", path) from None
        return Config(mailname=resolve_mailname(None))
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ConfigError("the line is not valid UTF-8", path, lineno) from None
    return parse(text, path)
