"""Where dma's log lines go: syslog (facility mail) when a syslog socket exists, else a
file a person can find (``<SPOOLDIR>/dma.log``), and stderr too when verbose (``-v``).

A logging failure never fails a delivery: every write is best effort.
A ``Log`` is created by the CLI (or ``dma.send``) and passed down; there is no global logger.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import sys
import time

_SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog")
_REOPEN_AFTER = 1.0


class Log:
    def __init__(self, ident: str = "dma", *, verbose: bool = False,
                 fallback_path: str | None = None, use_syslog: bool | None = None) -> None:
        self.ident = ident
        self.verbose = verbose
        self.fallback_path = fallback_path
        if use_syslog is None:
            use_syslog = any(os.path.exists(p) for p in _SYSLOG_SOCKETS)
        self._fd = (-1, 0.0)
        self._pid = os.getpid()
        self._lock = _thread.allocate_lock()  # threads delivering in parallel share the file
        self._syslog = None
        if use_syslog:
            try:
                import syslog

                syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)
                self._syslog = syslog
            except Exception:  # noqa: BLE001 - logging must never fail the caller
                self._syslog = None

    def _file(self) -> int:
        """The log file, opened again when the last opening is over a second old: a queue
        run writes a line per message without reopening, and a rotated file is let go of
        soon."""
        now = time.monotonic()
        fd, since = self._fd
        if fd >= 0 and now - since < _REOPEN_AFTER and os.getpid() == self._pid:
            return fd
        if fd >= 0:
            os.close(fd)
        assert self.fallback_path is not None
        fd = os.open(self.fallback_path,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        if fd < 3:
            # Started with stdin, stdout or stderr closed: a descriptor kept open must not
            # take their place (the message is read from fd 0).
            low, fd = fd, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(low)
        self._fd, self._pid = (fd, now), os.getpid()
        return fd

    @property
    def destination(self) -> str:
        """Says where the lines go, for messages that point a person at the log."""
        if self._syslog is not None:
            return "syslog (facility mail)"
        return self.fallback_path or "stderr"

    def _emit(self, level: str, msg: str) -> None:
        line = msg.replace("\n", " ").replace("\r", " ")
        try:
            if self._syslog is not None:
                prio = {"info": self._syslog.LOG_INFO, "warning": self._syslog.LOG_WARNING,
                        "error": self._syslog.LOG_ERR}.get(level, self._syslog.LOG_INFO)
                self._syslog.syslog(prio, line)
            elif self.fallback_path:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                text = f"{stamp} {self.ident}[{os.getpid()}]: {level}: {line}\n"
                # One write with O_APPEND: lines of concurrent processes never interleave.
                with self._lock:
                    os.write(self._file(), text.encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001
            pass
        if self.verbose or (self._syslog is None and not self.fallback_path):
            try:
                sys.stderr.write(f"{self.ident}: {line}\n")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass

    def info(self, msg: str) -> None:
        self._emit("info", msg)

    def warning(self, msg: str) -> None:
        self._emit("warning", msg)

    def error(self, msg: str) -> None:
        self._emit("error", msg)
