"""Picking up messages that unprivileged users dropped into ``SPOOLDIR/incoming/``.

The drop directory (mode 1733, made by ``dma setup``) lets any local user create a file but
not list or read the others.  A drop is a spool file whose envelope is the submitter's
request (:class:`dma.submit.DropRequest`).  The queue runner, with the rights to write the
queue, submits each complete drop again with the dropped file's *owner* as the submitter
(never anything the file says about its author), then removes the drop.  A crash between
the two leaves the drop, which is submitted again: a possible duplicate, never a loss.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import stat

from dma import _core
from dma.config import Config
from dma.errors import DmaError, SpoolCorrupt
from dma.log import Log
from dma.spool import Spool
from dma.submit import DropRequest, Request, Submitter, submit_chunks


def _submitter(uid: int) -> Submitter:
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return Submitter(f"uid={uid}", uid)
    return Submitter(pw.pw_name, uid, pw.pw_gecos.split(",", 1)[0])


def _locked_by_writer(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _resubmit(msg: _core.MessageFile, req: DropRequest, who: Submitter, config: Config) -> str:
    request = Request(recipients=req.recipients, sender=req.sender, full_name=req.full_name,
                      from_headers=req.from_headers, dot_ends=False)
    return submit_chunks(msg.cursor("raw"), request, config, submitter=who, env={})


def pickup(spool: Spool, config: Config, log: Log) -> list[str]:
    """Queue every complete drop; returns the new queue ids."""
    queued = []
    for name in spool.drops():
        path = os.path.join(spool.incoming_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or a symlink planted there (ELOOP): not ours to read
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                log.error(f"drop {name}: not a regular file with one link; removed unread")
                os.unlink(path)
                continue
            if _locked_by_writer(fd):
                continue  # still being written
            who = _submitter(st.st_uid)
            try:
                msg = _core.MessageFile(path)
            except SpoolCorrupt:
                # The writer is gone and never committed: debris of a failed submission.
                os.unlink(path)
                continue
            try:
                msg.verify()
                req = DropRequest.from_bytes(msg.envelope())
                qid = _resubmit(msg, req, who, config)
            except (ValueError, KeyError, DmaError) as e:
                log.error(f"drop {name} from {who.user}: refused ({e}); moved aside as "
                          f".refused-{name}")
                os.rename(path, os.path.join(spool.incoming_dir, f".refused-{name}"))
                continue
            finally:
                msg.close()
            os.unlink(path)
            log.info(f"{qid}: picked up from {who.user} (uid {who.uid}), drop {name}")
            queued.append(qid)
        finally:
            os.close(fd)
    return queued
