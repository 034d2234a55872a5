"""The result of one delivery attempt for one recipient."""

from __future__ import annotations

from dma.record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    Status = Literal["delivered", "deferred", "failed"]


class Outcome(Frozen):
    """Immutable (attributes are read-only), compared and hashed by value."""

    __slots__ = ("recipient", "status", "reply", "dsn", "relay")

    recipient: str
    status: Status
    reply: str
    """What a person reads: the server's words or our reason."""
    dsn: str
    """Enhanced status code (RFC 3463), e.g. ``5.1.1``."""
    relay: str
    """Where it went: ``host[ip]:port`` or ``mbox:/var/mail/root``."""

    def __init__(self, recipient: str, status: Status, reply: str = "", dsn: str = "",
                 relay: str = "") -> None:
        _set = object.__setattr__
        _set(self, "recipient", recipient)
        _set(self, "status", status)
        _set(self, "reply", reply)
        _set(self, "dsn", dsn)
        _set(self, "relay", relay)


if not TYPE_CHECKING:
    def __getattr__(name: str) -> object:
        # ``Status`` for code that imports it at run time (queue, local, smtp): a Literal
        # needs ``typing``, which the ``sendmail`` start-up path does not import.
        if name == "Status":
            from typing import Literal

            status = Literal["delivered", "deferred", "failed"]
            globals()["Status"] = status
            return status
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
