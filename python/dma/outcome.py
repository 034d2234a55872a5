"""The result of one delivery attempt for one recipient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class Outcome:
    recipient: str
    status: Status
    reply: str = ""
    """What a person reads: the server's words or our reason."""
    dsn: str = ""
    """Enhanced status code (RFC 3463), e.g. ``5.1.1``."""
    relay: str = ""
    """Where it went: ``host[ip]:port`` or ``mbox:/var/mail/root``."""
