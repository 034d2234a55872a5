"""The spool: commit, envelopes, journal states, locks, debris, listing, corruption."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dma.errors import SpoolCorrupt
from dma.outcome import Outcome
from dma.spool import Envelope, Spool, new_id


def spool_message(spool: Spool, data: bytes, recipients: tuple[str, ...] = ("root",),
                  sender: str = "a@b") -> str:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        qid, writer = spool.new_writer(r, dot_ends=False)
        writer.write_head(writer.read_head(1 << 20))
        writer.stream_rest()
        env = Envelope(id=qid, sender=sender, recipients=recipients, created=time.time(),
                       uid=0, user="root", size=writer.size, eight_bit=writer.eight_bit)
        spool.commit(writer, env)
    finally:
        os.close(r)
    return qid


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [new_id(1000.0 + i) for i in range(100)]
    assert ids == sorted(ids) and len(set(ids)) == 100
    assert len({new_id(5.0) for _ in range(1000)}) > 990


def test_commit_envelope_round_trip(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    qid = spool_message(spool, b"Subject: x\n\nhello \xe9\n", ("root", "bob@example.org"))
    assert spool.ids() == [qid]
    assert os.listdir(spool.tmp_dir) == []
    msg, env = spool.open(qid)
    assert env.recipients == ("root", "bob@example.org") and env.sender == "a@b"
    assert env.eight_bit and msg.size == len(b"Subject: x\n\nhello \xe9\n")
    assert b"".join(msg.cursor("raw")) == b"Subject: x\n\nhello \xe9\n"
    assert os.stat(msg.path).st_mode & 0o777 == 0o600
    msg.close()


def test_journal_states(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    qid = spool_message(spool, b"\nx\n", ("root", "a@x", "b@y"))
    _, env = spool.open(qid)
    spool.record(qid, Outcome("a@x", "deferred", "451 try later", "4.0.0", "mx[1.2.3.4]:25"))
    spool.record(qid, Outcome("a@x", "delivered", "250 ok", "2.0.0"))
    spool.record(qid, Outcome("b@y", "failed", "550 no", "5.1.1"))
    # a torn line from a crash mid-write is ignored
    with open(os.path.join(spool.journal_dir, qid), "ab") as f:
        f.write(b'{"t":1,"rcpt":"ro')
    states = spool.states(env)
    assert states["root"].status == "pending" and states["root"].attempts == 0
    assert states["a@x"].status == "delivered" and states["a@x"].attempts == 2
    assert states["b@y"].status == "failed" and states["b@y"].reply == "550 no"


def test_lock_excludes_a_second_runner(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    qid = spool_message(spool, b"\nx\n")
    with spool.locked(qid) as first:
        assert first is not None
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(spool.locked(qid).__enter__()))
        t.start()
        t.join()
        assert seen == [None]
    with spool.locked(qid) as again:
        assert again is not None
    spool.remove(qid)
    with spool.locked(qid) as gone:
        assert gone is None


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    qid = spool_message(spool, b"Subject: x\n\n" + b"z" * 5000)
    path = spool.path(qid)
    data = Path(path).read_bytes()
    # edited message byte: footer fine, content CRC wrong
    Path(path).write_bytes(data[:20] + b"Q" + data[21:])
    msg, _ = spool.open(qid)
    with pytest.raises(SpoolCorrupt):
        msg.verify()
    msg.close()
    # truncated: the footer is gone
    Path(path).write_bytes(data[:-10])
    with pytest.raises(SpoolCorrupt, match=qid):
        spool.open(qid)
    entries = spool.listing()
    assert entries[0].envelope is None and entries[0].error


def test_debris_cleaned(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    qid = spool_message(spool, b"\nx\n")
    # a live writer (holds its lock): kept
    r, w = os.pipe()
    live_id, live = spool.new_writer(r, dot_ends=False)
    # a dead writer's file (nobody holds a lock on it): removed at once
    Path(spool.tmp_dir, "DEAD").write_bytes(b"partial")
    Path(spool.journal_dir, "ORPHAN").write_bytes(b"{}\n")
    spool.record(qid, Outcome("root", "deferred", "x"))
    assert spool.clean_debris() == 2
    assert os.listdir(spool.tmp_dir) == [live_id]
    assert os.listdir(spool.journal_dir) == [qid]
    # a writer stuck for over a day is given up, lock or not
    old = time.time() - 2 * 86400
    os.utime(live.path, (old, old))
    assert spool.clean_debris() == 1
    assert os.listdir(spool.tmp_dir) == []
    live.abort()
    os.close(r)
    os.close(w)


def test_listing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    assert spool.listing() == []
    a = spool_message(spool, b"\n1\n", ("root",))
    b = spool_message(spool, b"\n22\n", ("x@y",), sender="")
    entries = spool.listing()
    assert [e.id for e in entries] == sorted([a, b])
    assert entries[1].envelope is not None and entries[1].envelope.sender == ""
