"""Local delivery (dma.local) against real files, real spooled messages and real users."""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from dma import _core, local
from dma.config import Config

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mount, other users)")

NOW = time.mktime((2026, 12, 4, 15, 46, 16, 0, 0, -1))
STAMP = time.asctime(time.localtime(NOW))  # "Fri Dec  4 15:46:16 2026" in this time zone
ME = pwd.getpwuid(os.geteuid()).pw_name

MakeMsg = Callable[..., _core.MessageFile]


@pytest.fixture
def mailspool(tmp_path: Path) -> Path:
    d = tmp_path / "mail"
    d.mkdir()
    return d


def cfg(mailspool: Path, fmt: str = "mbox") -> Config:
    return Config().replace(mailspool=str(mailspool), mailbox_format=fmt)


@pytest.fixture
def make_msg(tmp_path: Path) -> Iterator[MakeMsg]:
    """Spools ``data`` through _core.SpoolWriter and opens the result as a MessageFile."""
    spool = tmp_path / "spool"
    (spool / "tmp").mkdir(parents=True)
    (spool / "queue").mkdir()
    ids = itertools.count(1)
    opened: list[_core.MessageFile] = []

    def make(data: bytes) -> _core.MessageFile:
        n = next(ids)
        src = tmp_path / f"input{n}"
        src.write_bytes(data)
        dest = spool / "queue" / f"M{n}"
        with open(src, "rb") as f:
            w = _core.SpoolWriter(str(spool / "tmp" / f"M{n}"), f.fileno(), False)
            w.write_head(w.read_head())
            w.stream_rest()
            w.commit(b'{"v": 1}', str(dest))
        m = _core.MessageFile(str(dest))
        opened.append(m)
        return m

    yield make
    for m in opened:
        m.close()


def mboxrd(body: bytes) -> bytes:
    """What the mbox kind must produce for ``body`` (already LF)."""
    if body and not body.endswith(b"\n"):
        body += b"\n"
    lines = body.split(b"\n")[:-1]
    out = [b">" + ln if re.match(rb">*From ", ln) else ln for ln in lines]
    return b"".join(ln + b"\n" for ln in out) + b"\n"


def copy(body: bytes, sender: str = "root@host") -> bytes:
    return f"From {sender} {STAMP}\n".encode() + mboxrd(body)


SIMPLE = b"From: a@b\nSubject: hi\n\nhello\n"


# ------------------------------------------------------------------------------------------
# mbox format


def test_from_line_format_and_outcome(mailspool: Path, make_msg: MakeMsg) -> None:
    msg = make_msg(SIMPLE)
    out = local.deliver(msg, "root@host", ME, cfg(mailspool), now=NOW)
    assert out.status == "delivered", out
    assert out.recipient == ME
    assert out.dsn == "2.0.0"
    assert out.relay == f"mbox:{mailspool}/{ME}"
    data = (mailspool / ME).read_bytes()
    first = data.split(b"\n", 1)[0].decode()
    assert first == f"From root@host {STAMP}"
    assert re.fullmatch(
        r"From root@host (Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} [ \d]\d "
        r"\d\d:\d\d:\d\d \d{4}", first)
    assert data == copy(SIMPLE)
    assert not (mailspool / f"{ME}.lock").exists()


def test_from_line_day_is_space_padded(mailspool: Path, make_msg: MakeMsg) -> None:
    local.deliver(make_msg(SIMPLE), "x@y", ME, cfg(mailspool), now=NOW)
    assert b" Dec  4 " in (mailspool / ME).read_bytes().split(b"\n", 1)[0]


def test_empty_sender_is_mailer_daemon(mailspool: Path, make_msg: MakeMsg) -> None:
    assert local.deliver(make_msg(SIMPLE), "", ME, cfg(mailspool), now=NOW).status == "delivered"
    assert (mailspool / ME).read_bytes() == copy(SIMPLE, "MAILER-DAEMON")


def test_sender_whitespace_cannot_break_the_from_line(mailspool: Path,
                                                     make_msg: MakeMsg) -> None:
    local.deliver(make_msg(SIMPLE), "a b\nFrom evil", ME, cfg(mailspool), now=NOW)
    data = (mailspool / ME).read_bytes()
    assert data.startswith(f"From a_b_From_evil {STAMP}\n".encode())
    assert data.count(b"\nFrom ") == 0


def test_body_escaping_and_blank_line_after(mailspool: Path, make_msg: MakeMsg) -> None:
    body = (b"Subject: esc\n\nFrom the start\n>From quoted\n>>From twice\nFrom\n"
            b" From indented\nFromage\nlast From x\n")
    assert local.deliver(make_msg(body), "s@h", ME, cfg(mailspool), now=NOW).status == \
        "delivered"
    data = (mailspool / ME).read_bytes()
    assert data == (f"From s@h {STAMP}\n".encode()
                    + b"Subject: esc\n\n>From the start\n>>From quoted\n>>>From twice\nFrom\n"
                      b" From indented\nFromage\nlast From x\n\n")


def test_two_deliveries_append(mailspool: Path, make_msg: MakeMsg) -> None:
    m1 = make_msg(b"Subject: one\n\nfirst\n")
    m2 = make_msg(b"Subject: two\n\nFrom second\n")
    c = cfg(mailspool)
    assert local.deliver(m1, "a@h", ME, c, now=NOW).status == "delivered"
    assert local.deliver(m2, "b@h", ME, c, now=NOW).status == "delivered"
    assert (mailspool / ME).read_bytes() == (copy(b"Subject: one\n\nfirst\n", "a@h")
                                              + copy(b"Subject: two\n\nFrom second\n", "b@h"))


def test_missing_trailing_newline(mailspool: Path, make_msg: MakeMsg) -> None:
    local.deliver(make_msg(b"Subject: x\n\nno newline"), "a@h", ME, cfg(mailspool), now=NOW)
    assert (mailspool / ME).read_bytes() == f"From a@h {STAMP}\n".encode() + \
        b"Subject: x\n\nno newline\n\n"


def test_crlf_input_stored_lf(mailspool: Path, make_msg: MakeMsg) -> None:
    local.deliver(make_msg(b"Subject: x\r\n\r\nline1\r\nFrom y\r\n"), "a@h", ME, cfg(mailspool),
                  now=NOW)
    data = (mailspool / ME).read_bytes()
    assert b"\r" not in data
    assert data == f"From a@h {STAMP}\n".encode() + b"Subject: x\n\nline1\n>From y\n\n"


def test_existing_mailbox_without_blank_line_gets_separator(mailspool: Path,
                                                            make_msg: MakeMsg) -> None:
    old = b"From old@h Thu Jan  1 00:00:00 1970\nSubject: old\n\nold body\n"
    (mailspool / ME).write_bytes(old)
    local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW)
    assert (mailspool / ME).read_bytes() == old + b"\n" + copy(SIMPLE)

    (mailspool / ME).write_bytes(b"old body without newline")
    local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW)
    assert (mailspool / ME).read_bytes() == b"old body without newline\n\n" + copy(SIMPLE)


def test_large_message(mailspool: Path, make_msg: MakeMsg) -> None:
    body = b"Subject: big\n\n" + b"".join(
        (b"From line %d\n" % i if i % 7 == 0 else b"x" * 70 + b"\n") for i in range(60000))
    assert local.deliver(make_msg(body), "a@h", ME, cfg(mailspool), now=NOW).status == \
        "delivered"
    assert (mailspool / ME).read_bytes() == copy(body, "a@h")


# ------------------------------------------------------------------------------------------
# ownership and path safety


@needs_root
def test_mailbox_created_user_mail_0660(mailspool: Path, make_msg: MakeMsg) -> None:
    for user in ("daemon", "nobody"):
        out = local.deliver(make_msg(SIMPLE), "root@host", user, cfg(mailspool), now=NOW)
        assert out.status == "delivered", out
        st = os.stat(mailspool / user)
        assert st.st_uid == pwd.getpwnam(user).pw_uid
        assert st.st_gid == grp.getgrnam("mail").gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (mailspool / user).read_bytes() == copy(SIMPLE)


@needs_root
def test_existing_mailbox_owner_and_mode_kept(mailspool: Path, make_msg: MakeMsg) -> None:
    box = mailspool / "daemon"
    box.write_bytes(b"")
    os.chown(box, 1, 1)
    os.chmod(box, 0o600)
    assert local.deliver(make_msg(SIMPLE), "a@h", "daemon", cfg(mailspool)).status == \
        "delivered"
    st = os.stat(box)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 1, 0o600)


def test_symlink_mailbox_refused(tmp_path: Path, mailspool: Path, make_msg: MakeMsg) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    (mailspool / ME).symlink_to(target)
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool))
    assert out.status == "failed"
    assert out.reply == f"mailbox {mailspool}/{ME} is a symbolic link; refusing to deliver"
    assert out.dsn.startswith("5.")
    assert target.read_bytes() == b"precious\n"
    assert (mailspool / ME).is_symlink()
    assert not (mailspool / f"{ME}.lock").exists()


def test_dangling_symlink_refused(tmp_path: Path, mailspool: Path, make_msg: MakeMsg) -> None:
    target = tmp_path / "nonexistent"
    (mailspool / ME).symlink_to(target)
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool))
    assert out.status == "failed"
    assert "symbolic link" in out.reply
    assert not target.exists()


def test_hard_link_refused(tmp_path: Path, mailspool: Path, make_msg: MakeMsg) -> None:
    target = tmp_path / "other"
    target.write_bytes(b"precious\n")
    os.link(target, mailspool / ME)
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool))
    assert out.status == "failed"
    assert out.reply == f"mailbox {mailspool}/{ME} has 2 hard links; refusing to deliver"
    assert target.read_bytes() == b"precious\n"


def test_directory_and_fifo_refused(mailspool: Path, make_msg: MakeMsg) -> None:
    (mailspool / ME).mkdir()
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool))
    assert out.status == "failed"
    assert "not a regular file" in out.reply
    (mailspool / ME).rmdir()

    os.mkfifo(mailspool / ME)
    t0 = time.monotonic()
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool), lock_timeout=5)
    assert out.status == "failed"
    assert "not a regular file" in out.reply
    assert time.monotonic() - t0 < 2  # the open did not wait for a reader


@pytest.mark.parametrize("user", [
    "../../etc/passwd", "../" + ME, f"x/{ME}", f"/{ME}", "/etc/passwd", ".", "..", "",
    f"{ME}\n", f"{ME}\x00", f"r{ME}\x7f", f"{ME} x", "-rf", f"{ME}:x", "a" * 300,
])
def test_invalid_names_refused(tmp_path: Path, mailspool: Path, make_msg: MakeMsg,
                               user: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    out = local.deliver(make_msg(SIMPLE), "a@h", user, cfg(mailspool))
    assert out.status == "failed"
    assert out.dsn == "5.1.3"
    assert out.relay == ""
    assert "not a valid local user name" in out.reply
    assert "\n" not in out.reply
    assert list(mailspool.iterdir()) == []
    after = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in after if n not in before and not n.startswith("input")] == []


def test_unknown_user(mailspool: Path, make_msg: MakeMsg) -> None:
    out = local.deliver(make_msg(SIMPLE), "a@h", "no-such-user-dma", cfg(mailspool))
    assert out.status == "failed"
    assert out.dsn == "5.1.1"
    assert out.reply == "no such local user 'no-such-user-dma'"
    assert list(mailspool.iterdir()) == []


def test_missing_mailspool_deferred(tmp_path: Path, make_msg: MakeMsg) -> None:
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(tmp_path / "absent"))
    assert out.status == "deferred"
    assert "mail spool directory" in out.reply
    assert not (tmp_path / "absent").exists()


def test_unknown_format_deferred(mailspool: Path, make_msg: MakeMsg) -> None:
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool, "mh"))
    assert out.status == "deferred"
    assert "mailbox format" in out.reply
    assert list(mailspool.iterdir()) == []


# ------------------------------------------------------------------------------------------
# locking


def test_held_dotlock_defers(mailspool: Path, make_msg: MakeMsg) -> None:
    (mailspool / ME).write_bytes(b"")
    lock = mailspool / f"{ME}.lock"
    holder = f"{os.getppid()}\n".encode()  # a live process
    lock.write_bytes(holder)
    t0 = time.monotonic()
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool), lock_timeout=0.4)
    elapsed = time.monotonic() - t0
    assert out.status == "deferred", out
    assert out.dsn.startswith("4.")
    assert "locked" in out.reply and str(lock) in out.reply
    assert 0.4 <= elapsed < 3
    assert lock.read_bytes() == holder  # somebody else's lock is left alone
    assert (mailspool / ME).read_bytes() == b""


def test_dotlock_of_dead_process_is_broken(mailspool: Path, make_msg: MakeMsg) -> None:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()  # its pid now names no process
    lock = mailspool / f"{ME}.lock"
    lock.write_bytes(f"{p.pid}\n".encode())
    t0 = time.monotonic()
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool), lock_timeout=30)
    assert out.status == "delivered", out
    assert time.monotonic() - t0 < 5
    assert not lock.exists()
    assert [n for n in os.listdir(mailspool) if n.startswith(".")] == []  # no link debris


def test_dotlock_released_while_waiting(mailspool: Path, make_msg: MakeMsg) -> None:
    lock = mailspool / f"{ME}.lock"
    lock.write_bytes(b"1\n")
    threading.Timer(0.3, lock.unlink).start()
    out = local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW,
                        lock_timeout=5)
    assert out.status == "delivered"
    assert (mailspool / ME).read_bytes() == copy(SIMPLE)
    assert not lock.exists()


def test_stale_dotlock_broken(mailspool: Path, make_msg: MakeMsg) -> None:
    lock = mailspool / f"{ME}.lock"
    lock.write_bytes(b"99999\n")
    old = time.time() - 600
    os.utime(lock, (old, old))
    out = local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW,
                        lock_timeout=1)
    assert out.status == "delivered", out
    assert (mailspool / ME).read_bytes() == copy(SIMPLE)
    assert not lock.exists()


def test_dotlock_holds_our_pid_during_delivery(mailspool: Path, make_msg: MakeMsg,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    real = local._append_locked

    def spy(*args: object, **kw: object) -> None:
        seen.append((mailspool / f"{ME}.lock").read_bytes())
        real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_append_locked", spy)
    assert local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool)).status == "delivered"
    assert seen == [f"{os.getpid()}\n".encode()]


def test_fcntl_lock_of_another_process_defers(mailspool: Path, make_msg: MakeMsg) -> None:
    box = mailspool / ME
    box.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(box)!r}, os.O_RDWR)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"locked\n"
        out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool), lock_timeout=0.4)
        assert out.status == "deferred", out
        assert "fcntl" in out.reply
        assert box.read_bytes() == b""
        assert not (mailspool / f"{ME}.lock").exists()
        holder.stdin.close()
        holder.wait(10)
        out = local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW,
                            lock_timeout=2)
        assert out.status == "delivered"
        assert box.read_bytes() == copy(SIMPLE)
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------
# write errors


@needs_root
def test_disk_full_midway_truncates_back(tmp_path: Path, make_msg: MakeMsg) -> None:
    spool = tmp_path / "tiny"
    spool.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        c = cfg(spool)
        small = b"Subject: small\n\n" + b"s" * 5000 + b"\n"
        assert local.deliver(make_msg(small), "a@h", ME, c, now=NOW).status == "delivered"
        before = (spool / ME).read_bytes()
        assert before == copy(small, "a@h")
        big = b"Subject: big\n\n" + (b"b" * 79 + b"\n") * 3000  # 240 KB > 64 KB
        out = local.deliver(make_msg(big), "a@h", ME, c, now=NOW)
        assert out.status == "deferred", out
        assert out.dsn == "4.3.1"
        assert "full" in out.reply
        assert (spool / ME).read_bytes() == before
        assert not (spool / f"{ME}.lock").exists()
        # the space is usable again
        assert local.deliver(make_msg(small), "a@h", ME, c, now=NOW).status == "delivered"
        assert (spool / ME).read_bytes() == before * 2
    finally:
        subprocess.run(["umount", str(spool)], check=True)


@needs_root
def test_disk_full_maildir_leaves_nothing(tmp_path: Path, make_msg: MakeMsg) -> None:
    spool = tmp_path / "tiny"
    spool.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        big = b"Subject: big\n\n" + (b"b" * 79 + b"\n") * 3000
        out = local.deliver(make_msg(big), "a@h", ME, cfg(spool, "maildir"))
        assert out.status == "deferred", out
        for d in ("tmp", "new", "cur"):
            assert list((spool / ME / d).iterdir()) == []
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def test_write_error_truncates_back(mailspool: Path, make_msg: MakeMsg,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error after the From line was written removes what was written."""
    old = copy(SIMPLE)
    (mailspool / ME).write_bytes(old)
    msg = make_msg(SIMPLE)

    class Flaky:
        def append_to(self, fd: int, kind: str = "mbox", fsync: bool = True) -> int:
            os.write(fd, b"partial data without end")
            raise OSError(5, "Input/output error")

    out = local.deliver(cast(_core.MessageFile, Flaky()), "a@h", ME, cfg(mailspool), now=NOW)
    assert out.status == "deferred"
    assert "Input/output error" in out.reply
    assert (mailspool / ME).read_bytes() == old
    assert local.deliver(msg, "root@host", ME, cfg(mailspool), now=NOW).status == "delivered"
    assert (mailspool / ME).read_bytes() == old * 2


def test_damaged_queue_file_fails_and_truncates_back(mailspool: Path,
                                                     make_msg: MakeMsg) -> None:
    old = copy(SIMPLE)
    (mailspool / ME).write_bytes(old)
    msg = make_msg(b"Subject: x\n\n" + b"y" * 100000 + b"\n")
    os.truncate(msg.path, 5000)  # the queue file shrinks under the open MessageFile
    out = local.deliver(msg, "a@h", ME, cfg(mailspool), now=NOW)
    assert out.status == "failed", out
    assert out.dsn == "5.3.0"
    assert "queue file is damaged" in out.reply
    assert (mailspool / ME).read_bytes() == old
    (mailspool / "md").mkdir()
    out = local.deliver(msg, "a@h", ME, cfg(mailspool / "md", "maildir"), now=NOW)
    assert out.status == "failed", out
    assert out.dsn == "5.3.0"
    for d in ("tmp", "new"):
        assert list((mailspool / "md" / ME / d).iterdir()) == []


# ------------------------------------------------------------------------------------------
# maildir


@needs_root
def test_maildir_delivery(mailspool: Path, make_msg: MakeMsg) -> None:
    c = cfg(mailspool, "maildir")
    raw = b"Subject: md\r\n\r\nFrom here\r\nno newline"
    out1 = local.deliver(make_msg(raw), "s@h", "daemon", c)
    out2 = local.deliver(make_msg(raw), "", "daemon", c)
    assert out1.status == out2.status == "delivered"
    assert out1.relay == f"maildir:{mailspool}/daemon/"
    md = mailspool / "daemon"
    names = sorted(p.name for p in (md / "new").iterdir())
    assert len(names) == 2 and names[0] != names[1]
    for n in names:
        assert re.fullmatch(rf"\d+\.M\d+P{os.getpid()}Q\d+\..+", n), n
    assert list((md / "tmp").iterdir()) == [] and list((md / "cur").iterdir()) == []
    contents = sorted((md / "new" / n).read_bytes() for n in names)
    assert contents == sorted([b"Return-Path: <s@h>\nSubject: md\n\nFrom here\nno newline",
                               b"Return-Path: <>\nSubject: md\n\nFrom here\nno newline"])
    uid, gid = pwd.getpwnam("daemon").pw_uid, pwd.getpwnam("daemon").pw_gid
    for p in (md, md / "tmp", md / "new", md / "cur"):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o700), p
    for n in names:
        st = os.stat(md / "new" / n)
        assert (st.st_uid, st.st_nlink, stat.S_IMODE(st.st_mode)) == (uid, 1, 0o600)


def test_maildir_symlink_refused(tmp_path: Path, mailspool: Path, make_msg: MakeMsg) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (mailspool / ME).symlink_to(target)
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool, "maildir"))
    assert out.status == "failed"
    assert "symbolic link" in out.reply
    assert list(target.iterdir()) == []

    (mailspool / ME).unlink()
    (mailspool / ME).mkdir()
    (mailspool / ME / "new").symlink_to(target)
    out = local.deliver(make_msg(SIMPLE), "a@h", ME, cfg(mailspool, "maildir"))
    assert out.status == "failed"
    assert list(target.iterdir()) == []
    assert list((mailspool / ME / "tmp").iterdir()) == []


def test_maildir_many_unique(mailspool: Path, make_msg: MakeMsg) -> None:
    msg = make_msg(SIMPLE)
    c = cfg(mailspool, "maildir")
    with_threads = [threading.Thread(target=local.deliver, args=(msg, "a@h", ME, c))
                    for _ in range(8)]
    for t in with_threads:
        t.start()
    for t in with_threads:
        t.join()
    files = list((mailspool / ME / "new").iterdir())
    assert len(files) == 8
    assert all(f.read_bytes() == b"Return-Path: <a@h>\n" + SIMPLE for f in files)


# ------------------------------------------------------------------------------------------
# concurrency


def test_threads_same_message_same_mbox(mailspool: Path, make_msg: MakeMsg) -> None:
    body = b"Subject: par\n\n" + b"".join(
        (b"From %d\n" % i if i % 5 == 0 else b"%d " % i * 12 + b"\n") for i in range(40000))
    msg = make_msg(body)
    c = cfg(mailspool)
    outs: list[str] = []

    def run() -> None:
        outs.append(local.deliver(msg, "root@host", ME, c, now=NOW, lock_timeout=60).status)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs == ["delivered"] * 8
    assert (mailspool / ME).read_bytes() == copy(body) * 8
    assert not (mailspool / f"{ME}.lock").exists()


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_partial_copy_of_killed_delivery_is_removed(mailspool: Path, make_msg: MakeMsg) -> None:
    """A delivery killed mid-append leaves its dotlock (dead pid + start offset) and a cut
    copy; the next delivery removes the cut copy before appending."""
    before = b"From a@b Thu Jan  1 00:00:00 2026\nSubject: old\n\nkept\n\n"
    partial = b"From x@y Thu Jan  1 00:00:01 2026\nSubject: cut\n\nhalf a mes"
    (mailspool / ME).write_bytes(before + partial)
    (mailspool / f"{ME}.lock").write_bytes(f"{_dead_pid()} {len(before)}\n".encode())
    out = local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW,
                        lock_timeout=5)
    assert out.status == "delivered", out
    assert (mailspool / ME).read_bytes() == before + copy(SIMPLE)


def test_partial_copy_kept_when_others_wrote_after_it(mailspool: Path,
                                                      make_msg: MakeMsg) -> None:
    before = b"From a@b Thu Jan  1 00:00:00 2026\n\nkept\n\n"
    partial = b"From x@y Thu Jan  1 00:00:01 2026\n\nhalf\n\nFrom other@z Thu Jan  1 2026\n\nx\n\n"
    (mailspool / ME).write_bytes(before + partial)
    (mailspool / f"{ME}.lock").write_bytes(f"{_dead_pid()} {len(before)}\n".encode())
    out = local.deliver(make_msg(SIMPLE), "root@host", ME, cfg(mailspool), now=NOW,
                        lock_timeout=5)
    assert out.status == "delivered", out
    assert (mailspool / ME).read_bytes() == before + partial + copy(SIMPLE)
