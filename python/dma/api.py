"""The library interface behind ``import dma``: the same rules and errors as ``sendmail``,
as typed exceptions instead of exit codes."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from email.message import Message
    from typing import BinaryIO

    from dma.config import Config

    MessageInput = Message | bytes | bytearray | memoryview | BinaryIO
else:
    def __getattr__(name: str) -> object:
        # ``MessageInput`` at run time needs ``typing``, which ``import dma`` (and so every
        # ``sendmail`` start) does not import.
        if name == "MessageInput":
            from typing import BinaryIO, Union

            value = Union["Message", bytes, bytearray, memoryview, BinaryIO]
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_config(path: str | None = None) -> Config:
    """Read dma.conf (``path``, else ``$DMA_CONF``, else /etc/dma/dma.conf)."""
    from dma import config

    return config.load(path)


def send(message: MessageInput, recipients: Iterable[str] | None = None,
         sender: str | None = None, config: Config | str | None = None, *,
         full_name: str = "", deliver: bool = True) -> str:
    """Spool ``message`` durably and return its queue id.

    ``message`` is an ``email.message.Message``, bytes, or a binary file object.
    ``recipients=None`` takes them from the To/Cc/Bcc headers (``sendmail -t``); Bcc is
    removed either way.  ``sender=None`` uses ``$EMAIL`` or the current user.  ``config`` is a
    path to dma.conf or a loaded :class:`dma.config.Config`; by default the system one.
    A lone ``.`` line is message text (``sendmail -i``).  With ``deliver`` (the default) the
    first delivery attempt starts in a separate process unless the configuration says DEFER.
    """
    from dma.config import Config
    from dma.submit import Request, submit, submit_chunks

    cfg = config if isinstance(config, Config) else load_config(config)
    request = Request(recipients=tuple(recipients or ()), sender=sender, full_name=full_name,
                      from_headers=recipients is None, dot_ends=False)
    data: bytes | BinaryIO
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    elif hasattr(message, "as_bytes"):
        data = message.as_bytes()
    else:
        data = message
    fileno = None
    if not isinstance(data, bytes):
        try:
            fileno = data.fileno()
        except (AttributeError, OSError, ValueError):
            fileno = None
    if fileno is not None:
        qid = submit(fileno, request, cfg)
    elif isinstance(data, bytes):
        qid = submit_chunks((data,), request, cfg)
    else:
        source = data
        qid = submit_chunks(iter(lambda: source.read(1 << 20), b""), request, cfg)
    if deliver and not cfg.defer:
        _start_delivery(qid, cfg, config)
    return qid


def _start_delivery(qid: str, cfg: Config, given: Config | str | None) -> None:
    """A detached ``dma -qI ID`` when the configuration has a file it can read again;
    a Config built in code is delivered in this process instead (it cannot be passed on)."""
    if isinstance(given, str) or cfg.path is not None or given is None:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "dma.cli", f"-qI{qid}"]
        if cfg.path is not None:
            cmd[3:3] = ["-C", cfg.path]
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        return
    from dma import queue
    from dma.log import Log
    from dma.spool import Spool

    log = Log("dma", fallback_path=cfg.log_path)
    queue.deliver_message(Spool(cfg.spooldir), qid, cfg, log, fresh=True)
