"""dma: a mail transfer agent for one host, usable as a library.

    import dma
    queue_id = dma.send(message, recipients=["root"])

``send`` spools the message durably (it survives a crash the moment ``send`` returns) and
starts its delivery in a separate process, exactly as the ``sendmail`` command does.
Failures raise :class:`DmaError` subclasses (see :mod:`dma.errors`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from dma.api import load_config, send  # noqa: E402
from dma.errors import (  # noqa: E402
    AddressError,
    ConfigError,
    DataError,
    DmaError,
    NoRecipientsError,
    SpoolCorrupt,
    SpoolError,
    SpoolFullError,
    TempFailError,
    UnknownUserError,
    UsageError,
)

__all__ = [
    "AddressError", "ConfigError", "DataError", "DmaError", "NoRecipientsError",
    "SpoolCorrupt", "SpoolError", "SpoolFullError", "TempFailError", "UnknownUserError",
    "UsageError", "__version__", "load_config", "send",
]
