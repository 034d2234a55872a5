"""auth.conf: SMTP AUTH credentials per host, in C dma's format.

One entry a line, ``user|host:password``.  The login ends at the first ``|``; the host ends at
the first ``:``, ``|``, space or tab; the password is the rest of the line.  Lines starting
with ``#`` are comments, blank lines are skipped, a trailing ``\\r`` (CRLF files) is removed
(C dma keeps it in the password).  When several lines name the same host the last one wins.
A line without a login, host or separator is a :class:`~dma.errors.ConfigError` naming the
file and line.

The host is matched against the name dma connects to: the SMARTHOST string or the MX host
name from DNS (exactly first, then ignoring case and a trailing dot).
"""

from __future__ import annotations

import grp
import os
import stat

from .errors import ConfigError
from .record import Frozen

_HOST_END = (":", "|", " ", "\t")


class Credentials(Frozen):
    __slots__ = ("user", "password")

    user: str
    password: str

    def __init__(self, user: str, password: str) -> None:
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "password", password)

    def __repr__(self) -> str:  # never print a password by accident
        return f"Credentials(user={self.user!r}, password='***')"


class AuthTable:
    """host -> (user, password), read from auth.conf."""

    def __init__(self, entries: dict[str, Credentials] | None = None, *,
                 path: str | None = None, insecure_permissions: bool = False) -> None:
        self._entries: dict[str, Credentials] = dict(entries or {})
        self._folded = {_fold(h): c for h, c in self._entries.items()}
        self.path = path
        self.insecure_permissions = insecure_permissions
        """True when the file is readable by others, or by a group other than root's or
        mail's; the caller logs a warning."""

    def get(self, host: str) -> Credentials | None:
        found = self._entries.get(host)
        if found is None:
            found = self._folded.get(_fold(host))
        return found

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and self.get(host) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def hosts(self) -> list[str]:
        return list(self._entries)

    def __repr__(self) -> str:
        return f"AuthTable(path={self.path!r}, hosts={self.hosts()!r})"


def _fold(host: str) -> str:
    return host.rstrip(".").lower()


def parse(text: str, path: str = "auth.conf") -> dict[str, Credentials]:
    """Parses auth.conf text; raises ConfigError(path:line) on a bad line."""
    entries: dict[str, Credentials] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("#") or not line.strip():
            continue
        user, bar, rest = line.partition("|")
        if not bar:
            raise ConfigError("syntax error: expected user|host:password", path, lineno)
        cut = min((i for i in (rest.find(c) for c in _HOST_END) if i >= 0), default=-1)
        if cut < 0:
            raise ConfigError("syntax error: no password separator after the host "
                              "(user|host:password)", path, lineno)
        host, password = rest[:cut], rest[cut + 1:]
        if not user:
            raise ConfigError("syntax error: empty user name", path, lineno)
        if not host:
            raise ConfigError("syntax error: empty host name", path, lineno)
        entries[host] = Credentials(user, password)  # the last line for a host wins
    return entries


def _insecure(st: os.stat_result) -> bool:
    if st.st_mode & stat.S_IROTH:
        return True
    if st.st_mode & stat.S_IRGRP and st.st_gid != 0:
        try:
            mail_gid: int | None = grp.getgrnam("mail").gr_gid
        except KeyError:
            mail_gid = None
        return st.st_gid != mail_gid
    return False


def load(path: str) -> AuthTable:
    """Reads auth.conf.  An unreadable or malformed file is a ConfigError."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read auth file: {e.strerror or e}", path) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError("not valid UTF-8", path, line) from e
    return AuthTable(parse(text, path), path=path, insecure_permissions=_insecure(st))
