"""dma's exceptions and the sysexits codes they map to.

Every failure that reaches a user carries one clear line (``str(exc)``) and the
sysexits code a sendmail caller expects (``exc.exit_code``).  The CLI prints the
line and exits with the code; library callers catch the types.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class DmaError(Exception):
    """Base of every error dma raises on purpose."""

    exit_code: int = EX_SOFTWARE


class UsageError(DmaError):
    """Bad command-line usage."""

    exit_code = EX_USAGE


class DataError(DmaError):
    """The message or an address in it is unusable."""

    exit_code = EX_DATAERR


class AddressError(DataError):
    """An address that is not a valid RFC 5321 mailbox."""


class UnknownUserError(DataError):
    """A local recipient that names no user on this host."""


class NoRecipientsError(DmaError):
    """Nothing to deliver to."""

    exit_code = EX_NOINPUT


class ConfigError(DmaError):
    """A configuration file (dma.conf, auth.conf, aliases) is wrong or unreadable."""

    exit_code = EX_CONFIG

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.line = line


class SpoolError(DmaError):
    """The spool cannot be written (permissions, missing directory)."""

    exit_code = EX_CANTCREAT


class SpoolFullError(SpoolError):
    """The spool's filesystem is full; try again later."""

    exit_code = EX_TEMPFAIL


class SpoolCorrupt(DmaError):
    """A spool file failed its integrity check (truncated, edited, not ours).

    Raised by ``dma._core`` as well, so it must keep a one-string constructor.
    """

    exit_code = EX_SOFTWARE


class TempFailError(DmaError):
    """A temporary failure: the caller should retry later."""

    exit_code = EX_TEMPFAIL
