"""Local delivery: one spooled message to one local user's mailbox.

``deliver()`` appends to ``<mailspool>/<user>`` (mbox, the default) or drops a file into
``<mailspool>/<user>/new/`` (maildir) and returns an :class:`~dma.outcome.Outcome`; it never
raises for a delivery problem.

Path safety: the user name must be a plain passwd name of a user that exists.  Every file is
opened relative to a descriptor of the mail spool directory with ``O_NOFOLLOW``, so the name
can never leave that directory and a symbolic link is refused; a mailbox that is not a regular
file, or that has more than one hard link, is refused too.

mbox locking is what Debian's mail readers (mutt, mailx, liblockfile) expect: a dotlock
``<user>.lock`` (``O_CREAT|O_EXCL``; one older than five minutes, or naming a process that
no longer exists, is stale and removed) and an
``fcntl`` write lock on the whole mailbox.  Both are waited for with a bound; a lock not
obtained defers the delivery.  The message is written after the size of the mailbox has been
recorded, and any error truncates the mailbox back to that size, so a partial message never
stays in it.  Crash behaviour: a crash in the middle of the write can leave a partial message
(nothing in the kernel makes an append atomic) and a dotlock that the next delivery removes
once it is stale; the queue file is still there and the message is delivered again.

maildir: the message is written to ``tmp/<unique>`` with a ``Return-Path:`` line first,
fsynced, hard-linked into ``new/`` and the ``new`` directory fsynced.  A crash leaves at most a
file in ``tmp/`` (maildir readers remove those after 36 hours).
"""

from __future__ import annotations

import errno
import grp
import itertools
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dma.errors import SpoolCorrupt
from dma.outcome import Outcome

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    from dma._core import MessageFile
    from dma.config import Config
    from dma.outcome import Status

__all__ = ["deliver", "LOCK_TIMEOUT", "STALE_LOCK_AGE"]

LOCK_TIMEOUT = 60.0
"""Seconds to wait for the dotlock and the ``fcntl`` lock together before deferring."""
STALE_LOCK_AGE = 300.0
"""A dotlock older than this many seconds is stale and removed (liblockfile's rule)."""

_MAX_NAME = 250  # leaves room for ".lock" within NAME_MAX (255)
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 0.5

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class _Refuse(Exception):
    """Ends a delivery with a given outcome (internal control flow, never escapes)."""

    def __init__(self, status: Status, reason: str, dsn: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.dsn = dsn


def _failed(reason: str, dsn: str = "5.2.0") -> _Refuse:
    return _Refuse("failed", reason, dsn)


def _deferred(reason: str, dsn: str = "4.3.0") -> _Refuse:
    return _Refuse("deferred", reason, dsn)


def deliver(
    msg: MessageFile,
    sender: str,
    user: str,
    config: Config,
    *,
    now: float | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    stale_lock_age: float = STALE_LOCK_AGE,
) -> Outcome:
    """Deliver ``msg`` to the local ``user``'s mailbox in ``config.mailspool``.

    ``sender`` is the envelope sender (``""`` for a bounce).  ``now`` sets the time written
    into the mbox ``From `` line (default: the current time; maildir names always use it).
    ``lock_timeout`` bounds the wait for the mailbox locks, ``stale_lock_age`` is the age at
    which somebody else's dotlock is considered abandoned.

    Returns ``delivered``, ``deferred`` (temporary: a lock not obtained, a full disk, an I/O
    error) or ``failed`` (permanent: no such user, an invalid name, a mailbox that is a symbolic
    link, not a regular file or hard-linked, a corrupt queue file).
    """
    fmt = config.mailbox_format
    path = os.path.join(config.mailspool, user)
    relay = ""  # stays empty for a name that does not make a path
    try:
        pw = _lookup_user(user)
        relay = f"maildir:{path}/" if fmt == "maildir" else f"mbox:{path}"
        if fmt not in ("mbox", "maildir"):
            raise _deferred(f"unknown mailbox format {fmt!r} (MAILBOXFORMAT is mbox or maildir)",
                            "4.3.5")
        try:
            spool_fd = os.open(config.mailspool, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError as e:
            raise _deferred(f"mail spool directory {config.mailspool} cannot be opened: "
                            f"{e.strerror}") from e
        try:
            if fmt == "mbox":
                _deliver_mbox(msg, sender, pw, spool_fd, path, now, lock_timeout,
                              stale_lock_age)
            else:
                _deliver_maildir(msg, sender, pw, spool_fd, path)
        finally:
            os.close(spool_fd)
    except _Refuse as r:
        return Outcome(user, r.status, r.reason, r.dsn, relay)
    where = "maildir" if fmt == "maildir" else "mailbox"
    return Outcome(user, "delivered", f"delivered to {where} {path}", "2.0.0", relay)


# --------------------------------------------------------------------------------------------
# names and users


def _valid_name(user: str) -> bool:
    if not user or user in (".", "..") or user.startswith("-"):
        return False
    try:
        if len(os.fsencode(user)) > _MAX_NAME:
            return False
    except UnicodeError:
        return False
    return not any(c in "/:" or c.isspace() or ord(c) < 32 or ord(c) == 127 for c in user)


def _lookup_user(user: str) -> pwd.struct_passwd:
    if not _valid_name(user):
        raise _failed(f"{user!r} is not a valid local user name", "5.1.3")
    try:
        return pwd.getpwnam(user)
    except (KeyError, ValueError, UnicodeError):
        raise _failed(f"no such local user {user!r}", "5.1.1") from None


def _mail_gid(pw: pwd.struct_passwd) -> int:
    try:
        return grp.getgrnam("mail").gr_gid
    except KeyError:
        return pw.pw_gid


def _from_sender(sender: str) -> str:
    if sender in ("", "<>"):
        return "MAILER-DAEMON"
    return "".join("_" if c.isspace() or ord(c) < 32 or ord(c) == 127 else c for c in sender)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _io_reason(what: str, e: OSError) -> _Refuse:
    """A deferral for an I/O error, with the enhanced status code that fits it."""
    code = e.errno
    text = e.strerror or str(e)
    if code == errno.ENOSPC:
        return _deferred(f"{what}: the mail spool is full ({text})", "4.3.1")
    if code in (errno.EDQUOT, errno.EFBIG):
        return _deferred(f"{what}: the mailbox is over its size limit ({text})", "4.2.2")
    return _deferred(f"{what}: {text}", "4.3.0")


# --------------------------------------------------------------------------------------------
# mbox


def _deliver_mbox(msg: MessageFile, sender: str, pw: pwd.struct_passwd, spool_fd: int,
                  path: str, now: float | None, lock_timeout: float,
                  stale_lock_age: float) -> None:
    deadline = time.monotonic() + lock_timeout
    name = pw.pw_name
    with _dotlock(spool_fd, f"{name}.lock", path + ".lock", deadline,
                  stale_lock_age) as lock:
        fd = _open_mbox(spool_fd, name, path, pw)
        try:
            st = os.fstat(fd)
            _check_regular(st, path)
            _fcntl_lock(fd, path, deadline)
            try:
                if lock.recovered is not None:
                    _cut_partial(fd, lock.recovered)
                _append_locked(fd, msg, sender, path, now, lock)
            finally:
                _fcntl_unlock(fd)
        finally:
            os.close(fd)


def _open_mbox(spool_fd: int, name: str, path: str, pw: pwd.struct_passwd) -> int:
    # O_RDWR (not O_WRONLY) so the end of the existing mailbox can be read with pread to
    # supply a missing separator; O_NONBLOCK so that a FIFO planted in place of the mailbox
    # cannot block the open (it is refused below).
    flags = os.O_RDWR | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK
    for _ in range(5):
        try:
            fd = os.open(name, flags, dir_fd=spool_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _open_error(e, path) from e
        else:
            os.set_blocking(fd, True)
            return fd
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=spool_fd)
        except FileExistsError:
            continue  # created (or a link planted) since: open it again, checks apply
        except OSError as e:
            raise _io_reason(f"cannot create mailbox {path}", e) from e
        try:
            os.set_blocking(fd, True)
            if os.geteuid() == 0:
                os.fchown(fd, pw.pw_uid, _mail_gid(pw))
                os.fchmod(fd, 0o660)
        except OSError as e:
            os.close(fd)
            _unlink_quietly(name, spool_fd)
            raise _io_reason(f"cannot set the owner of new mailbox {path}", e) from e
        return fd
    raise _deferred(f"mailbox {path} keeps appearing and disappearing; try again later")


def _open_error(e: OSError, path: str) -> _Refuse:
    if e.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: the BSDs' answer to O_NOFOLLOW
        return _failed(f"mailbox {path} is a symbolic link; refusing to deliver")
    if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.ETXTBSY):
        return _failed(f"mailbox {path} is not a regular file; refusing to deliver")
    return _io_reason(f"cannot open mailbox {path}", e)



def _check_regular(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _failed(f"mailbox {path} is not a regular file; refusing to deliver")
    if st.st_nlink > 1:
        raise _failed(f"mailbox {path} has {st.st_nlink} hard links; refusing to deliver")


def _append_locked(fd: int, msg: MessageFile, sender: str, path: str,
                   now: float | None, lock: _Dotlock) -> None:
    st = os.fstat(fd)
    _check_regular(st, path)  # again, now that nobody else may change it
    old_size = st.st_size
    lock.note(old_size)
    try:
        sep = _separator_prefix(fd, old_size)
        stamp = time.asctime(time.localtime(now))
        line = f"From {_from_sender(sender)} {stamp}\n".encode("utf-8", "surrogateescape")
        _write_all(fd, sep + line)
        msg.append_to(fd, "mbox", fsync=True)
    except BaseException as e:
        _truncate_back(fd, old_size)
        if isinstance(e, SpoolCorrupt):
            raise _failed(f"the queue file is damaged: {e}", "5.3.0") from e
        if isinstance(e, OSError):
            raise _io_reason(f"writing to mailbox {path} failed", e) from e
        raise


def _cut_partial(fd: int, offset: int) -> None:
    """Remove what a killed dma delivery left after ``offset`` (recorded in its dotlock):
    a cut copy, or a complete copy whose success never reached the journal and that will be
    delivered again now.  Only when nothing but that one message follows ``offset``: its
    ``From `` line first and no other message separator after it (mboxrd escaping keeps
    ``From `` out of message text), so nothing another program appended is ever removed."""
    size = os.fstat(fd).st_size
    if offset >= size:
        return
    head = os.pread(fd, 7, offset)
    if not (head.startswith(b"From ") or head.startswith(b"\nFrom ")
            or head.startswith(b"\n\nFrom ")):
        return
    pos = offset + head.index(b"From ") + 5
    chunk = 1 << 20
    while pos < size:
        block = os.pread(fd, chunk + 5, pos)
        if not block or b"\nFrom " in block:
            return
        pos += chunk
    _truncate_back(fd, offset)


def _separator_prefix(fd: int, size: int) -> bytes:
    """What makes the existing mailbox end with an empty line, so the new ``From `` line
    starts a message (a mailbox written by an older dma ends with a single newline)."""
    if size == 0:
        return b""
    tail = os.pread(fd, 2, size - 2) if size >= 2 else b"\n" + os.pread(fd, 1, 0)
    if tail == b"\n\n":
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\n\n"


def _truncate_back(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


def _wait_for_lock(deadline: float, delay: float, held: str) -> float:
    """Sleep before the next try at a lock (backing off), or defer once ``deadline`` has
    passed; returns the next delay."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _deferred(f"{held}; will try again later", "4.2.0")
    time.sleep(min(delay, remaining))
    return min(delay * 2, _BACKOFF_MAX)


def _fcntl_lock(fd: int, path: str, deadline: float) -> None:
    import fcntl

    delay = _BACKOFF_FIRST
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EINTR):
                raise _io_reason(f"cannot lock mailbox {path}", e) from e
        delay = _wait_for_lock(deadline, delay, f"mailbox {path} is locked by another "
                               "program (fcntl lock)")


def _fcntl_unlock(fd: int) -> None:
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError:
        pass


@contextmanager
def _dotlock(spool_fd: int, name: str, path: str, deadline: float,
             stale_age: float) -> Iterator[_Dotlock]:
    """Holds ``<mailspool>/<user>.lock`` with our pid inside.  As liblockfile does, the pid
    is written to a uniquely named file first and that file is then hard-linked to the lock
    name, so a crash can never leave an empty lock (which only age could break)."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    try:
        _unlink_quietly(tmp, spool_fd)
        fd = os.open(tmp, flags, 0o644, dir_fd=spool_fd)
        try:
            _write_all(fd, f"{os.getpid()}\n".encode())
            mine = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as e:
        _unlink_quietly(tmp, spool_fd)
        raise _io_reason(f"cannot create lock file {path}", e) from e
    delay = _BACKOFF_FIRST
    recovered: int | None = None
    try:
        while True:
            try:
                os.link(tmp, name, src_dir_fd=spool_fd, dst_dir_fd=spool_fd,
                        follow_symlinks=False)
                break
            except FileExistsError:
                pass
            except OSError as e:
                raise _io_reason(f"cannot create lock file {path}", e) from e
            broken, left = _break_stale(spool_fd, name, stale_age)
            if broken:
                recovered = left if left is not None else recovered
                continue
            delay = _wait_for_lock(deadline, delay, f"mailbox is locked by another program "
                                   f"({path} exists)")
    finally:
        _unlink_quietly(tmp, spool_fd)
    try:
        yield _Dotlock(spool_fd, name, mine, recovered)
    finally:
        # Remove it only if it is still ours (not broken as stale and re-created meanwhile).
        try:
            cur = os.stat(name, dir_fd=spool_fd, follow_symlinks=False)
            if (cur.st_dev, cur.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(name, dir_fd=spool_fd)
        except OSError:
            pass


def _break_stale(spool_fd: int, name: str, stale_age: float) -> tuple[bool, int | None]:
    """Removes the dotlock when it is older than ``stale_age`` or its holder is dead.
    Returns (gone, offset): the mailbox size a dead dma delivery recorded in it, if any."""
    try:
        st = os.stat(name, dir_fd=spool_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True, None
    except OSError:
        return False, None
    pid, offset = _lock_contents(spool_fd, name)
    dead = pid is not None and _pid_dead(pid)
    if time.time() - st.st_mtime <= stale_age and not dead:
        return False, None
    try:
        again = os.stat(name, dir_fd=spool_fd, follow_symlinks=False)
        if (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
            os.unlink(name, dir_fd=spool_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return False, None
    return True, offset if dead else None


class _Dotlock:
    """The dotlock we hold; ``note`` records where our append starts, so that if we are
    killed mid-write the next delivery can remove the partial copy."""

    def __init__(self, spool_fd: int, name: str, mine: os.stat_result,
                 recovered: int | None) -> None:
        self.spool_fd, self.name, self.mine, self.recovered = spool_fd, name, mine, recovered
        if recovered is not None:
            # Carried over at once: if we are killed too before cutting, the next delivery
            # still knows where the partial copy starts.
            self.note(recovered)

    def note(self, offset: int) -> None:
        try:
            fd = os.open(self.name, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.spool_fd)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (self.mine.st_dev, self.mine.st_ino):
                # One small write at offset 0: it lands whole or not at all, and the pid
                # stays first, where other programs look for it.
                os.pwrite(fd, f"{os.getpid()} {offset}\n".encode(), 0)
        except OSError:
            pass
        finally:
            os.close(fd)


def _lock_contents(spool_fd: int, name: str) -> tuple[int | None, int | None]:
    """(pid, recorded mailbox offset) from a dotlock; None where absent or unreadable."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=spool_fd)
        try:
            words = os.read(fd, 64).split()
        finally:
            os.close(fd)
        pid = int(words[0]) if words else None
        offset = int(words[1]) if len(words) > 1 else None
    except (OSError, ValueError):
        return None, None
    return (pid if pid and pid > 0 else None), offset


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# maildir


def _unique_name() -> str:
    """``<time>.M<usec>P<pid>Q<counter>.<host>`` (maildir's rules for unique names)."""
    t = time.time()
    with _counter_lock:
        n = next(_counter)
    host = os.uname().nodename.replace("/", "\\057").replace(":", "\\072") or "localhost"
    return f"{int(t)}.M{int((t % 1) * 1_000_000)}P{os.getpid()}Q{n}.{host}"


def _open_subdir(parent_fd: int, name: str, path: str, pw: pwd.struct_passwd) -> int:
    """Opens (creating it 0700, owned by the user, when missing) a directory under
    ``parent_fd`` without following a symbolic link."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as e:
        raise _io_reason(f"cannot create maildir directory {path}", e) from e
    else:
        if os.geteuid() == 0:
            try:
                os.chown(name, pw.pw_uid, pw.pw_gid, dir_fd=parent_fd, follow_symlinks=False)
            except OSError as e:
                raise _io_reason(f"cannot set the owner of {path}", e) from e
    try:
        return os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC,
                       dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) and _is_symlink(name, parent_fd):
            # O_DIRECTORY|O_NOFOLLOW on a symbolic link: Linux says ENOTDIR, not ELOOP
            raise _failed(f"maildir {path} is a symbolic link; refusing to deliver") from e
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _failed(f"maildir {path} is not a directory; refusing to deliver") from e
        raise _io_reason(f"cannot open maildir {path}", e) from e


def _deliver_maildir(msg: MessageFile, sender: str, pw: pwd.struct_passwd, spool_fd: int,
                     path: str) -> None:
    md_fd = _open_subdir(spool_fd, pw.pw_name, path, pw)
    fds = [md_fd]
    try:
        sub = {}
        for d in ("tmp", "new", "cur"):
            sub[d] = _open_subdir(md_fd, d, f"{path}/{d}", pw)
            fds.append(sub[d])
        _write_maildir(msg, sender, pw, sub["tmp"], sub["new"], path)
    finally:
        for fd in fds:
            os.close(fd)


def _write_maildir(msg: MessageFile, sender: str, pw: pwd.struct_passwd, tmp_fd: int,
                   new_fd: int, path: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    for _ in range(3):
        name = _unique_name()
        try:
            fd = os.open(name, flags, 0o600, dir_fd=tmp_fd)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise _io_reason(f"cannot create a file in {path}/tmp", e) from e
    else:
        raise _deferred(f"cannot find a unique file name in {path}/tmp")
    linked = False
    try:
        try:
            if os.geteuid() == 0:
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
            rp = sender if sender != "<>" else ""
            _write_all(fd, f"Return-Path: <{rp}>\n".encode("utf-8", "surrogateescape"))
            msg.append_to(fd, "raw", fsync=True)
        finally:
            os.close(fd)
        try:
            os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.rename(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)  # no hard links here
        linked = True
        _unlink_quietly(name, tmp_fd)
        os.fsync(new_fd)
    except BaseException as e:
        _unlink_quietly(name, tmp_fd)
        if linked:
            _unlink_quietly(name, new_fd)
        if isinstance(e, SpoolCorrupt):
            raise _failed(f"the queue file is damaged: {e}", "5.3.0") from e
        if isinstance(e, OSError):
            raise _io_reason(f"writing to maildir {path} failed", e) from e
        raise
