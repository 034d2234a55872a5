"""The on-disk queue: ids, directories, the commit of new messages, envelopes, the delivery
journal, per-message locks, and the read-only listing behind ``mailq``.

Layout and crash behaviour are described in docs/internals.md.  In short:

* ``tmp/ID``      a message being written; a crash leaves only this debris, which
                  :meth:`Spool.clean_debris` removes once its writer's lock is gone.
* ``queue/ID``    a committed message (message bytes, envelope, footer), written by
                  ``_core.SpoolWriter.commit`` with fsync + no-replace rename + directory fsync.
* ``journal/ID``  one JSON line per delivery result, appended with one ``write``; a crash
                  loses at most the lines of deliveries in flight (a possible duplicate,
                  never a loss).
* ``hold/ID``     a message put on hold by the administrator (moved by rename; not
                  delivered until released).

Only this module knows the paths; everything above it speaks queue ids.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from dma import _core
from dma.errors import SpoolCorrupt, SpoolError, SpoolFullError
from dma.record import Frozen, Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

    from dma.outcome import Outcome

ENVELOPE_VERSION = 1
DEBRIS_AGE = 86400.0
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


# ``json`` is imported where it is read (mailq, delivery): its import costs milliseconds of
# every ``sendmail`` start, and the envelope, the one JSON document written on that path,
# is encoded by hand (``_json_str``, byte for byte what ``json.dumps`` gives).
# The classes are plain classes rather than dataclasses for the same reason; they keep the
# dataclass behaviour (keyword arguments, equality by value, repr; Envelope is immutable).

_JSON_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)}
_JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\b"): "\\b",
                      ord("\f"): "\\f", ord("\n"): "\\n", ord("\r"): "\\r",
                      ord("\t"): "\\t"})
_INF = float("inf")


def _json_str(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``."""
    return '"' + text.translate(_JSON_ESCAPES) + '"'


def _json_number(value: float) -> str:
    """``json.dumps(value)`` for an int, a bool or a float."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if value != value:
        return "NaN"
    if value in (_INF, -_INF):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


class Envelope(Frozen):
    __slots__ = ("id", "sender", "recipients", "created", "uid", "user", "size", "eight_bit",
                 "notice", "lines")

    id: str
    sender: str
    """The envelope sender; "" is the null sender of bounces."""
    recipients: tuple[str, ...]
    """Local user names (no ``@``) and remote addresses, after alias expansion."""
    created: float
    uid: int
    user: str
    size: int
    eight_bit: bool
    notice: str
    """"bounce" or "postmaster" for delivery notices dma generated itself."""
    lines: int
    """Line ends in the message (what SMTP's SIZE= adds to its size), -1 when unknown (a
    file from a version that did not record it)."""

    def __init__(self, id: str, sender: str, recipients: tuple[str, ...], created: float,
                 uid: int, user: str, size: int = 0, eight_bit: bool = False,
                 notice: str = "", lines: int = -1) -> None:
        _set = object.__setattr__
        _set(self, "id", id)
        _set(self, "sender", sender)
        _set(self, "recipients", recipients)
        _set(self, "created", created)
        _set(self, "uid", uid)
        _set(self, "user", user)
        _set(self, "size", size)
        _set(self, "eight_bit", eight_bit)
        _set(self, "notice", notice)
        _set(self, "lines", lines)

    def to_bytes(self) -> bytes:
        # json.dumps({"v": ENVELOPE_VERSION, "id": ..., "8bit": ...[, "notice": ...]},
        #            ensure_ascii=False, separators=(",", ":")), without importing json.
        parts = [
            '{"v":', _json_number(ENVELOPE_VERSION), ',"id":', _json_str(self.id),
            ',"sender":', _json_str(self.sender),
            ',"recipients":[', ",".join([_json_str(r) for r in self.recipients]),
            '],"created":', _json_number(self.created), ',"uid":', _json_number(self.uid),
            ',"user":', _json_str(self.user), ',"size":', _json_number(self.size),
            ',"8bit":', _json_number(self.eight_bit),
        ]
        if self.notice:
            parts += [',"notice":', _json_str(self.notice)]
        if self.lines >= 0:
            parts += [',"lines":', _json_number(self.lines)]
        parts.append("}")
        return "".join(parts).encode()

    @classmethod
    def from_bytes(cls, data: bytes, path: str) -> Envelope:
        import json

        try:
            doc = json.loads(data)
            if doc.get("v") != ENVELOPE_VERSION:
                raise SpoolCorrupt(f"{path}: envelope version {doc.get('v')!r} is not supported")
            return cls(
                id=str(doc["id"]), sender=str(doc["sender"]),
                recipients=tuple(str(r) for r in doc["recipients"]),
                created=float(doc["created"]), uid=int(doc["uid"]), user=str(doc["user"]),
                size=int(doc.get("size", 0)), eight_bit=bool(doc.get("8bit", False)),
                notice=str(doc.get("notice", "")), lines=int(doc.get("lines", -1)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SpoolCorrupt(f"{path}: unreadable envelope ({e})") from None


class RecipientState(Record):
    __slots__ = ("recipient", "status", "attempts", "reply", "dsn", "relay", "last_attempt")

    recipient: str
    status: str
    """pending, delivered, deferred or failed."""
    attempts: int
    reply: str
    dsn: str
    relay: str
    last_attempt: float | None

    def __init__(self, recipient: str, status: str = "pending", attempts: int = 0,
                 reply: str = "", dsn: str = "", relay: str = "",
                 last_attempt: float | None = None) -> None:
        self.recipient = recipient
        self.status = status
        self.attempts = attempts
        self.reply = reply
        self.dsn = dsn
        self.relay = relay
        self.last_attempt = last_attempt


class QueueEntry(Record):
    """What ``mailq`` shows of one message; read without locks."""

    __slots__ = ("id", "envelope", "size", "mtime", "states", "error", "held")

    id: str
    envelope: Envelope | None
    size: int
    mtime: float
    states: dict[str, RecipientState]
    error: str
    """Set when the queue file could not be read (corrupt, vanished)."""
    held: bool

    def __init__(self, id: str, envelope: Envelope | None, size: int, mtime: float,
                 states: dict[str, RecipientState] | None = None, error: str = "",
                 held: bool = False) -> None:
        self.id = id
        self.envelope = envelope
        self.size = size
        self.mtime = mtime
        self.states = {} if states is None else states
        self.error = error
        self.held = held


def new_id(now: float | None = None) -> str:
    """Time-ordered, unique ids: microseconds since the epoch + 20 random bits."""
    t = int((time.time() if now is None else now) * 1_000_000)
    return f"{t:013X}{int.from_bytes(os.urandom(3), 'big') & 0xFFFFF:05X}"


def _valid_id(qid: str) -> bool:
    return 0 < len(qid) <= 64 and qid.isalnum() and qid.isascii()


class Spool:
    def __init__(self, root: str) -> None:
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")
        self.queue_dir = os.path.join(root, "queue")
        self.journal_dir = os.path.join(root, "journal")
        self.hold_dir = os.path.join(root, "hold")
        self.incoming_dir = os.path.join(root, "incoming")

    # -- writing -----------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the spool directories if missing (mode 0700: the spool holds others' mail)."""
        for d in (self.root, self.tmp_dir, self.queue_dir, self.journal_dir, self.hold_dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise spool_error(e, f"cannot create spool directory {d}") from None

    def new_writer(self, fd: int, *, dot_ends: bool) -> tuple[str, _core.SpoolWriter]:
        """A fresh queue id and a writer streaming the input on ``fd`` into ``tmp/ID``."""
        self.ensure()
        return _new_writer(self.tmp_dir, fd, dot_ends, "cannot create a spool file in",
                           "queue id")

    def must_drop(self) -> bool:
        """True for a submitter who may not write the queue but may drop messages into
        ``incoming/`` (mode 1733, made by ``dma setup``) for the queue runner to pick up."""
        return not os.access(self.queue_dir, os.W_OK | os.X_OK) and \
            os.access(self.incoming_dir, os.W_OK | os.X_OK)

    def new_drop(self, fd: int, *, dot_ends: bool) -> tuple[str, _core.SpoolWriter]:
        """A writer creating ``incoming/ID`` at its final name; committed in place."""
        return _new_writer(self.incoming_dir, fd, dot_ends, "cannot drop a message into",
                           "name")

    def commit_drop(self, writer: _core.SpoolWriter, request: bytes) -> None:
        try:
            writer.commit(request, None)
        except OSError as e:
            writer.abort()
            raise spool_error(e, "cannot commit the message to the drop directory") from None

    def drops(self) -> list[str]:
        try:
            names = os.listdir(self.incoming_dir)
        except (FileNotFoundError, PermissionError):
            return []
        return sorted(n for n in names if _valid_id(n))

    def commit(self, writer: _core.SpoolWriter, envelope: Envelope) -> None:
        """Make the message durable under its id; after this returns it survives a crash."""
        try:
            writer.commit(envelope.to_bytes(), os.path.join(self.queue_dir, envelope.id))
        except OSError as e:
            writer.abort()
            raise spool_error(e, "cannot commit the message to the spool") from None

    # -- reading -------------------------------------------------------------------------

    def ids(self, *, held: bool = False) -> list[str]:
        try:
            names = os.listdir(self.hold_dir if held else self.queue_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _valid_id(n))

    def path(self, qid: str, *, held: bool = False) -> str:
        if not _valid_id(qid):
            raise SpoolError(f"invalid queue id {qid!r}")
        return os.path.join(self.hold_dir if held else self.queue_dir, qid)

    def open(self, qid: str, *, held: bool = False) -> tuple[_core.MessageFile, Envelope]:
        msg = _core.MessageFile(self.path(qid, held=held))
        return msg, Envelope.from_bytes(msg.envelope(), msg.path)

    def find(self, qid: str) -> bool | None:
        """Where a message is: False queued, True held, None not in the spool."""
        for held in (False, True):
            if os.path.exists(self.path(qid, held=held)):
                return held
        return None

    def states(self, envelope: Envelope) -> dict[str, RecipientState]:
        """Each recipient's latest state from the journal (pending when it has no line)."""
        import json

        states = {r: RecipientState(r) for r in envelope.recipients}
        path = os.path.join(self.journal_dir, envelope.id)
        if not os.path.exists(path):
            return states  # the common case, without the cost of a raised FileNotFoundError
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return states
        for line in lines:
            try:
                rec = json.loads(line)
                if "event" in rec:
                    continue
                st = states[rec["rcpt"]]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash, or a foreign recipient
            st.status = str(rec.get("status", "pending"))
            st.attempts += 1
            st.reply = str(rec.get("reply", ""))
            st.dsn = str(rec.get("dsn", ""))
            st.relay = str(rec.get("relay", ""))
            st.last_attempt = float(rec.get("t", 0.0))
        return states

    def record(self, qid: str, outcome: Outcome, *, now: float | None = None) -> None:
        """Append one delivery result to the message's journal (one write, O_APPEND)."""
        self._append(qid, {
            "t": time.time() if now is None else now, "rcpt": outcome.recipient,
            "status": outcome.status, "reply": outcome.reply, "dsn": outcome.dsn,
            "relay": outcome.relay,
        })

    def events(self, qid: str) -> set[str]:
        """Message-level events recorded in the journal (e.g. ``delay-warning`` sent)."""
        import json

        found: set[str] = set()
        try:
            with open(os.path.join(self.journal_dir, qid), "rb") as f:
                for line in f.read().splitlines():
                    try:
                        found.add(str(json.loads(line)["event"]))
                    except (ValueError, KeyError, TypeError):
                        continue
        except FileNotFoundError:
            pass
        return found

    def mark(self, qid: str, event: str, *, now: float | None = None) -> None:
        self._append(qid, {"t": time.time() if now is None else now, "event": event})

    def _append(self, qid: str, doc: dict[str, object]) -> None:
        import json

        line = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        fd = os.open(os.path.join(self.journal_dir, qid),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def locked(self, qid: str, *, held: bool = False) -> Claim:
        """Claim a message for delivery: a context manager that gives it, or None when
        another runner holds it (or it vanished because that runner finished it)."""
        return Claim(self, qid, held)

    def move(self, qid: str, *, to_hold: bool) -> None:
        """Hold or release a message (a rename; the caller holds its lock)."""
        os.rename(self.path(qid, held=not to_hold), self.path(qid, held=to_hold))
        _fsync_dir(self.hold_dir if to_hold else self.queue_dir)

    def remove(self, qid: str, *, held: bool | None = None) -> None:
        """Remove a finished message: queue file first, so a crash leaves at most an orphan
        journal (cleaned by :meth:`clean_debris`), never a message without its journal.
        ``held`` says where the message is, when known."""
        places = (False, True) if held is None else (held,)
        for path in (*(self.path(qid, held=h) for h in places),
                     os.path.join(self.journal_dir, qid)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def clean_debris(self, now: float | None = None) -> int:
        """Remove temp files whose writer is gone and journals without a message.

        A live writer holds ``flock`` on its temp file, so an unlocked one is debris of a
        writer that crashed or was killed; a temp file is also taken as debris once it is a
        day old, whatever its lock (a writer stuck that long has failed)."""
        now = time.time() if now is None else now
        removed = 0
        queued = set(self.ids()) | set(self.ids(held=True))
        for d, keep in ((self.tmp_dir, None), (self.journal_dir, queued)):
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                p = os.path.join(d, name)
                try:
                    if keep is None:
                        if now - os.lstat(p).st_mtime < DEBRIS_AGE and _writer_alive(p):
                            continue
                    elif name in keep:
                        continue
                    os.unlink(p)
                    removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def listing(self) -> list[QueueEntry]:
        """Every queued and held message with its recipients' states; no locks, no side
        effects."""
        entries = []
        for held in (False, True):
            for qid in self.ids(held=held):
                entry = self.entry(qid, held=held)
                if entry is not None:
                    entries.append(entry)
        entries.sort(key=lambda e: e.id)
        return entries

    def entry(self, qid: str, *, held: bool = False) -> QueueEntry | None:
        try:
            st = os.stat(self.path(qid, held=held))
        except FileNotFoundError:
            return None
        try:
            msg, env = self.open(qid, held=held)
        except FileNotFoundError:
            return None
        except (SpoolCorrupt, OSError) as e:
            return QueueEntry(qid, None, st.st_size, st.st_mtime, error=str(e), held=held)
        size = msg.size
        msg.close()
        return QueueEntry(qid, env, size, st.st_mtime, self.states(env), held=held)


class Claim:
    """What :meth:`Spool.locked` returns (a class, not ``contextlib.contextmanager``, whose
    import costs a millisecond or two of every ``sendmail`` start)."""

    __slots__ = ("_spool", "_qid", "_held", "_msg")

    def __init__(self, spool: Spool, qid: str, held: bool) -> None:
        self._spool = spool
        self._qid = qid
        self._held = held
        self._msg: _core.MessageFile | None = None

    def __enter__(self) -> tuple[_core.MessageFile, Envelope] | None:
        try:
            msg, env = self._spool.open(self._qid, held=self._held)
        except FileNotFoundError:
            return None
        self._msg = msg
        try:
            fcntl.flock(msg.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        except BaseException:
            self._msg = None
            msg.close()
            raise
        # The message may have been finished, removed or moved while we took the lock.
        if not os.path.exists(msg.path):
            return None
        return msg, env

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        msg, self._msg = self._msg, None
        if msg is not None:
            msg.close()


def _new_writer(directory: str, fd: int, dot_ends: bool, failing: str,
                noun: str) -> tuple[str, _core.SpoolWriter]:
    """A fresh id and a writer creating ``directory/ID`` (a new id if that name is taken)."""
    for _ in range(8):
        qid = new_id()
        try:
            return qid, _core.SpoolWriter(os.path.join(directory, qid), fd, dot_ends)
        except FileExistsError:
            continue
        except OSError as e:
            raise spool_error(e, f"{failing} {directory}") from None
    raise SpoolError(f"cannot find a free {noun} in {directory}")


def _writer_alive(path: str) -> bool:
    """Whether the writer of a temp file still holds its lock (see docs/internals.md)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True  # already gone: nothing to remove
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_error(e: OSError, what: str) -> SpoolError:
    reason = e.strerror or str(e)
    if e.errno in _FULL_ERRNOS:
        return SpoolFullError(f"{what}: the spool is full ({reason}); "
                              "the message was not accepted, try again later")
    where = f" ({e.filename})" if e.filename else ""
    return SpoolError(f"{what}: {reason}{where}")
