"""Python-side tests of ``dma._core`` through its public API, on real files.

Every output kind is checked against a small pure-Python reference implementation (also under
Hypothesis), and the error mapping, parallel cursors (threads and forked processes), the
writer lock and commit in place are exercised the way the rest of dma uses them.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dma import _core
from dma.errors import SpoolCorrupt

KINDS = ("raw", "crlf", "smtp", "smtp-wrap", "mbox")
CHUNKS = (1, 2, 3, 7, 64, 1 << 20)
LIMIT = 998

# ---- reference implementations ----------------------------------------------------------


def normalise(data: bytes, dot_ends: bool = False) -> bytes:
    """What SpoolWriter stores for input ``data``: CRLF -> LF, optional lone-dot end."""
    out = bytearray()
    for line in re.findall(rb"[^\n]*\n|[^\n]+$", data):
        if dot_ends and line in (b".\n", b".\r\n", b"."):
            break
        out += line[:-2] + b"\n" if line.endswith(b"\r\n") else line
    return bytes(out)


def lines_of(data: bytes) -> list[bytes]:
    """The lines of ``data`` without their LF; a final line without LF counts."""
    parts = data.split(b"\n")
    return parts[:-1] + ([parts[-1]] if parts[-1] else [])


def wrap(body: bytes) -> bytes:
    """Postfix's long-line break: 998 octets, then continuations of a space + 997."""
    if len(body) <= LIMIT:
        return body
    segs = [body[:LIMIT]] + [body[i:i + LIMIT - 1] for i in range(LIMIT, len(body), LIMIT - 1)]
    return b"\r\n ".join(segs)


def reference(data: bytes, kind: str) -> bytes:
    if kind == "raw":
        return data
    if kind == "crlf":
        return data.replace(b"\n", b"\r\n")
    out = bytearray()
    for body in lines_of(data):
        if kind == "mbox":
            out += (b">" if re.match(rb">*From ", body) else b"") + body + b"\n"
        else:
            out += (b"." if body.startswith(b".") else b"")
            out += (wrap(body) if kind == "smtp-wrap" else body) + b"\r\n"
    return bytes(out + (b"\n" if kind == "mbox" else b".\r\n"))


def unstuff(wire: bytes, *, unwrap: bool = False) -> bytes:
    """Undo smtp (and smtp-wrap's inserted breaks): the stored message, final LF added."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    if unwrap:
        body = body.replace(b"\r\n ", b"")
    if not body:
        return b""
    assert body.endswith(b"\r\n")
    lines = body[:-2].split(b"\r\n")
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\n" for ln in lines)


def with_final_lf(data: bytes) -> bytes:
    return data + b"\n" if data and not data.endswith(b"\n") else data


# ---- helpers -----------------------------------------------------------------------------


def store(dir: Path, data: bytes, name: str = "q", envelope: bytes = b"{}") -> Path:
    """Submit ``data`` through a SpoolWriter (no dot end) and commit it to ``dir/name``."""
    src = dir / f"{name}.in"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        w = _core.SpoolWriter(dir / f"{name}.tmp", fd, dot_ends=False)
        w.stream_rest()
        w.commit(envelope, dir / name)
    finally:
        os.close(fd)
    return dir / name


def read_cursor(c: _core.Cursor) -> bytes:
    chunks = list(c)
    assert all(chunks), "a cursor never yields an empty chunk"
    return b"".join(chunks)


def lockable(path: Path) -> bool:
    """Whether a new open file description of ``path`` can take LOCK_EX now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def sample() -> bytes:
    """A message with every special case, long lines included (about 1 MB)."""
    parts: list[bytes] = []
    for i in range(6000):
        parts.append([b"From someone\n", b".leading dot\n", b">>From quoted\n", b"\n",
                      b"bare\rcr \xc3\xa9\0\n", b"x" * (900 + i % 300) + b"\n",
                      b"." * (1990 + i % 10) + b"\n", f"line {i}\n".encode()][i % 8])
    parts.append(b"y" * 5000)
    return b"".join(parts)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("big")
    data = sample()
    return store(d, data), data


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root); unmounted afterwards."""
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        gc.collect()  # close descriptors of dropped core objects
        subprocess.run(["umount", str(d)], check=True)


# ---- writer and reader -------------------------------------------------------------------


def test_roundtrip_writer_reader(tmp_path: Path) -> None:
    head_in = b"Subject: hi\r\nTo: x\r\n\r\n"
    body_in = b"".join(f"line {i} .x\r\n".encode() for i in range(200_000))
    body_in += b".dot\r\nbare\rcr\r\n\xc3\xa9" + b"z" * 3000 + b"\r\n.\r\nnot message\r\n"
    r, wfd = os.pipe()

    def feed() -> None:
        with os.fdopen(wfd, "wb") as f:
            f.write(head_in + body_in)

    t = threading.Thread(target=feed)
    t.start()
    try:
        with _core.SpoolWriter(tmp_path / "tmp", r) as w:
            assert w.path == str(tmp_path / "tmp")
            head = w.read_head()
            assert head == b"Subject: hi\nTo: x\n\n"
            w.write_head(b"Received: by test\n" + head)
            w.stream_rest()
            size, eight_bit, max_line = w.size, w.eight_bit, w.max_line
            w.commit(b'{"v": 1}', tmp_path / "queue")
    finally:
        t.join()
        os.close(r)
    assert not (tmp_path / "tmp").exists()
    stored = b"Received: by test\n" + head + normalise(body_in, dot_ends=True)
    with _core.MessageFile(tmp_path / "queue") as m:
        assert m.path == str(tmp_path / "queue")
        assert (m.size, m.eight_bit, m.max_line) == (size, eight_bit, max_line)
        assert m.size == len(stored)
        assert m.eight_bit
        assert m.max_line == 3002
        assert m.crc32 == zlib.crc32(stored)
        assert m.envelope() == b'{"v": 1}'
        m.verify()
        assert m.read_head() == b"Received: by test\n" + head
        assert read_cursor(m.cursor()) == stored
        fcntl.flock(m.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert m.closed
    with pytest.raises(ValueError):
        m.cursor()
    raw = (tmp_path / "queue").read_bytes()
    assert len(raw) == len(stored) + 8 + _core.FOOTER_LEN == len(stored) + 72
    footer = raw[-_core.FOOTER_LEN:]
    f = re.fullmatch(rb"DMA-END 1 ([0-9a-f]{12}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) "
                     rb"(000[01]) ([0-9a-f]{8})\n", footer)
    assert f is not None
    assert int(f[1], 16) == len(stored) and int(f[2], 16) == 8
    assert int(f[3], 16) == zlib.crc32(stored) and int(f[4], 16) == zlib.crc32(b'{"v": 1}')


def test_writer_misuse_and_abort(tmp_path: Path) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        w = _core.SpoolWriter(tmp_path / "t", fd)
        with pytest.raises(ValueError):
            w.commit(b"", tmp_path / "q")
        w.abort()
        w.abort()
        assert not (tmp_path / "t").exists()
        with pytest.raises(ValueError):
            w.stream_rest()
        with pytest.raises(FileExistsError) as ei:
            (tmp_path / "e").write_bytes(b"")
            _core.SpoolWriter(tmp_path / "e", fd)
        assert ei.value.filename == str(tmp_path / "e")
        w = _core.SpoolWriter(tmp_path / "t", fd)
        w.stream_rest()
        (tmp_path / "q").write_bytes(b"existing")
        with pytest.raises(FileExistsError):
            w.commit(b"", tmp_path / "q")
        assert (tmp_path / "q").read_bytes() == b"existing"
        w.abort()
        assert not (tmp_path / "t").exists()
    finally:
        os.close(fd)


# ---- kinds against the reference ---------------------------------------------------------

PIECES = [b"\n", b"\r", b"\r\n", b".", b"..", b"From ", b"From", b">", b">From ", b"\0",
          b"x", b" ", b"\xff", b"a" * 997, b"b" * 998, b"." * 999, b"c" * 1995]
messages = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(data=messages)
def test_transform_matches_reference(data: bytes) -> None:
    for kind in KINDS:
        assert _core.transform(data, kind) == reference(data, kind), kind


@settings(max_examples=300, deadline=None)
@given(data=messages)
def test_smtp_unstuffs_to_stored(data: bytes) -> None:
    assert unstuff(_core.transform(data, "smtp")) == with_final_lf(data)
    # An inserted break is told from a real line end only without spaces in the message.
    nospace = data.replace(b" ", b"_")
    out = _core.transform(nospace, "smtp-wrap")
    assert unstuff(out, unwrap=True) == with_final_lf(nospace)
    for line in out.split(b"\r\n"):
        assert len(line) - line.startswith(b"..") <= LIMIT


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=messages, chunk=st.one_of(st.sampled_from(CHUNKS), st.integers(1, 5000)))
def test_cursors_match_reference(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                 chunk: int) -> None:
    d = tmp_path_factory.mktemp("cur")
    path = store(d, data)
    stored = normalise(data)
    chunk = max(chunk, len(data) // 300)  # keep byte-sized chunks to small messages
    with _core.MessageFile(path) as m:
        assert m.size == len(stored)
        for kind in KINDS:
            c = m.cursor(kind, chunk=chunk)
            assert read_cursor(c) == reference(stored, kind), kind
            assert c.offset == m.size
    shutil.rmtree(d)


EDGES = {
    "998": b"a" * 998 + b"\n",
    "999": b"a" * 999 + b"\n",
    "1996": b"a" * 1996 + b"\n",
    "1997": b"a" * 1997 + b"\n",
    "cr": b"a" * 997 + b"\r" + b"b" * 1500 + b"\r\r\n",
    "no-lf": b"c" * 2500,
    "dot": b"." * 2100 + b"\n.\n" + b"." * 999,
    "space-after-998": b"a" * 998 + b"\n b\n",
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_smtp_wrap_edges_every_chunk_size(tmp_path: Path, name: str) -> None:
    data = EDGES[name]
    want = reference(data, "smtp-wrap")
    assert _core.transform(data, "smtp-wrap") == want
    path = store(tmp_path, data)
    want = reference(normalise(data), "smtp-wrap")  # the writer stores CRLF as LF
    with _core.MessageFile(path) as m:
        for chunk in CHUNKS:
            assert read_cursor(m.cursor("smtp-wrap", chunk=chunk)) == want, chunk
        out = tmp_path / "out"
        with open(out, "wb") as f:
            assert m.send_to(f.fileno(), "smtp-wrap", chunk=7) == len(want)
        assert out.read_bytes() == want


def test_smtp_wrap_specifics() -> None:
    a998 = b"a" * 998
    assert _core.transform(a998 + b"\n", "smtp-wrap") == _core.transform(a998 + b"\n", "smtp")
    assert _core.transform(a998 + b"b\n", "smtp-wrap") == a998 + b"\r\n b\r\n.\r\n"
    b997 = b"b" * 997
    assert _core.transform(a998 + b997 + b"c", "smtp-wrap") == \
        a998 + b"\r\n " + b997 + b"\r\n c\r\n.\r\n"
    # the stuffed dot does not count; a continuation starting with "." is not stuffed
    assert _core.transform(b"." + a998 + b".\n", "smtp-wrap") == \
        b".." + a998[:997] + b"\r\n a.\r\n.\r\n"
    with pytest.raises(ValueError):
        _core.transform(b"", "smtp_wrap")


def test_every_kind_every_chunk_size(big: tuple[Path, bytes]) -> None:
    path, data = big
    with _core.MessageFile(path) as m:
        for kind in KINDS:
            want = reference(data, kind)
            for chunk in (64, 4093, 1 << 20):
                assert read_cursor(m.cursor(kind, chunk=chunk)) == want, (kind, chunk)


@pytest.mark.parametrize("kind", KINDS)
def test_cursor_resumes_at_offset(big: tuple[Path, bytes], kind: str) -> None:
    path, data = big
    want = reference(data, kind)
    with _core.MessageFile(path) as m:
        for stop in (1, 5, 37, 250):
            c = m.cursor(kind, chunk=333)
            got = b"".join(next(c) for _ in range(stop))
            got += read_cursor(m.cursor(kind, offset=c.offset, chunk=4096))
            assert got == want, (kind, stop)
        with pytest.raises(ValueError):
            m.cursor(kind, offset=m.size + 1)
        with pytest.raises(ValueError):
            m.cursor(kind, chunk=0)


def test_send_to_and_append_to(tmp_path: Path) -> None:
    path = store(tmp_path, b"From me\n.x\n" + b"y" * 1200)
    with _core.MessageFile(path) as m:
        mbox = tmp_path / "mbox"
        fd = os.open(mbox, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            n = m.append_to(fd)
            assert n == m.append_to(fd, "mbox", fsync=False)
        finally:
            os.close(fd)
        assert mbox.read_bytes() == 2 * reference(b"From me\n.x\n" + b"y" * 1200, "mbox")
        want = reference(b"From me\n.x\n" + b"y" * 1200, "smtp-wrap")
        assert want.count(b"\r\n ") == 1
        r, w = os.pipe()
        try:
            assert m.send_to(w, "smtp-wrap") == len(want)
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read() == want
        with pytest.raises(ValueError):
            m.send_to(1, "maildir")


# ---- errors ------------------------------------------------------------------------------


def test_missing_paths_are_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as ei:
        _core.MessageFile(tmp_path / "missing")
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename == str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as ei:
        _core.SpoolWriter(tmp_path / "nodir" / "x", 0)
    assert ei.value.filename == str(tmp_path / "nodir" / "x")


def test_corrupt_files(tmp_path: Path) -> None:
    good = store(tmp_path, b"hello\nworld\n", envelope=b"ENVELOPE")
    raw = good.read_bytes()
    cases = {"truncated": raw[:-1], "short": raw[:10], "cut": raw[1:],
             "envelope": raw.replace(b"ENVELOPE", b"ENVELOPF"),
             "flags": raw[:-14] + b"8" + raw[-13:]}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(SpoolCorrupt) as ei:
            _core.MessageFile(p)
        assert str(p) in str(ei.value), name
    edited = tmp_path / "edited"
    edited.write_bytes(b"J" + raw[1:])
    with _core.MessageFile(edited) as m:  # the message CRC is checked by verify() only
        with pytest.raises(SpoolCorrupt, match="CRC"):
            m.verify()
    with pytest.raises(SpoolCorrupt):
        _core.MessageFile(tmp_path)


def test_enospc_while_streaming(tmp_path: Path, tiny_fs: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes((b"x" * 99 + b"\n") * 2000)
    fd = os.open(src, os.O_RDONLY)
    try:
        w = _core.SpoolWriter(tiny_fs / "t", fd)
        with pytest.raises(OSError) as ei:
            w.stream_rest()
        assert ei.value.errno == errno.ENOSPC
        assert ei.value.filename == str(tiny_fs / "t")
        with pytest.raises(ValueError):
            w.commit(b"", tiny_fs / "q")
        w.abort()
        assert os.listdir(tiny_fs) == []
    finally:
        os.close(fd)


def test_enospc_in_append_to(tmp_path: Path, tiny_fs: Path) -> None:
    path = store(tmp_path, b"y" * 200_000)
    with _core.MessageFile(path) as m:
        fd = os.open(tiny_fs / "mbox", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with pytest.raises(OSError) as ei:
                m.append_to(fd)
        finally:
            os.close(fd)
    assert ei.value.errno == errno.ENOSPC
    assert ei.value.filename == os.path.realpath(tiny_fs / "mbox")


def test_enospc_in_commit_in_place_removes_file(tmp_path: Path, tiny_fs: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"small message\n" * 100)
    fd = os.open(src, os.O_RDONLY)
    try:
        w = _core.SpoolWriter(tiny_fs / "final", fd)
        w.stream_rest()
        with pytest.raises(OSError) as ei:
            w.commit(b"E" * 200_000)
        assert ei.value.errno == errno.ENOSPC
        assert ei.value.filename == str(tiny_fs / "final")
        assert not (tiny_fs / "final").exists()
        w.abort()  # still allowed, nothing left to do
        with pytest.raises(ValueError):
            w.stream_rest()
    finally:
        os.close(fd)


# ---- parallel readers --------------------------------------------------------------------


def test_cursors_in_threads(big: tuple[Path, bytes]) -> None:
    path, data = big
    wants = {k: reference(data, k) for k in KINDS}
    results: dict[int, bytes] = {}
    with _core.MessageFile(path) as m:
        def run(i: int) -> None:
            results[i] = read_cursor(m.cursor(KINDS[i % 5], chunk=1000 + 97 * i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 10
    for i, out in results.items():
        assert out == wants[KINDS[i % 5]], i


def test_cursors_in_forked_processes(tmp_path: Path, big: tuple[Path, bytes]) -> None:
    path, data = big
    m = _core.MessageFile(path)
    started = m.cursor("smtp-wrap", chunk=5000)
    first = next(started)
    pids: dict[int, tuple[str, Path]] = {}
    try:
        for i, kind in enumerate(KINDS * 2):
            out = tmp_path / f"child-{i}"
            pid = os.fork()
            if pid == 0:  # child: write the cursor's output to its own file
                code = 1
                try:
                    with open(out, "wb") as f:
                        for chunk in m.cursor(kind, chunk=777 + 1000 * i):
                            f.write(chunk)
                    code = 0
                finally:
                    os._exit(code)
            pids[pid] = (kind, out)
        mine = {k: read_cursor(m.cursor(k, chunk=65536)) for k in KINDS}
        rest = first + read_cursor(started)
    finally:
        statuses = {pid: os.waitpid(pid, 0)[1] for pid in pids}
        m.close()
    assert rest == mine["smtp-wrap"]
    for pid, (kind, out) in pids.items():
        assert statuses[pid] == 0
        assert out.read_bytes() == mine[kind] == reference(data, kind), kind


# ---- writer lock and commit in place -----------------------------------------------------


def test_writer_lock_held_until_commit_or_abort(tmp_path: Path) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        w = _core.SpoolWriter(tmp_path / "t", fd)
        assert not lockable(tmp_path / "t")
        w.stream_rest()
        assert not lockable(tmp_path / "t")
        w.commit(b"{}", tmp_path / "q")
        assert lockable(tmp_path / "q")
        w = _core.SpoolWriter(tmp_path / "t2", fd)
        probe = os.open(tmp_path / "t2", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            w.abort()
            assert not (tmp_path / "t2").exists()
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        with _core.SpoolWriter(tmp_path / "t3", fd):
            assert not lockable(tmp_path / "t3")
        assert not (tmp_path / "t3").exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("death", ["_exit", "SIGKILL"])
def test_dead_writer_leaves_unlocked_debris(tmp_path: Path, death: str) -> None:
    path = tmp_path / "tmp-ID"
    ready_r, ready_w = os.pipe()
    in_r, in_w = os.pipe()  # the child's message input; kept open so it blocks
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(in_w)
            w = _core.SpoolWriter(path, in_r)
            w.write_head(b"Subject: half a message\n")
            os.write(ready_w, b"1")
            if death == "_exit":
                code = 0
            else:
                w.stream_rest()  # blocks until killed
        finally:
            os._exit(code)  # no cleanup: the writer is never dropped
    os.close(ready_w)
    os.close(in_r)
    try:
        assert os.read(ready_r, 1) == b"1"
        if death == "SIGKILL":
            assert path.exists()
            assert not lockable(path), "a live writer's file is locked"
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        pid = 0
        if death == "_exit":
            assert os.waitstatus_to_exitcode(status) == 0
        else:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert path.exists()
        assert lockable(path), "a dead writer's debris is unlocked"
        with pytest.raises(SpoolCorrupt):
            _core.MessageFile(path)
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(in_w)


def test_commit_in_place(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    drop = tmp_path / "drop"
    drop.mkdir()
    fd = os.open(src, os.O_RDONLY)
    try:
        w = _core.SpoolWriter(drop / "ID1", fd)
        assert not lockable(drop / "ID1")
        w.stream_rest()
        w.commit(b'{"v": 1}')
        w.abort()  # no-op after commit
    finally:
        os.close(fd)
    assert os.listdir(drop) == ["ID1"]
    assert lockable(drop / "ID1")
    with _core.MessageFile(drop / "ID1") as m:
        m.verify()
        assert read_cursor(m.cursor()) == b"Subject: x\n\nbody\n"
        assert m.envelope() == b'{"v": 1}'


def test_commit_in_place_unprivileged_into_unreadable_drop_dir() -> None:
    nobody = 65534
    drop = Path(tempfile.mkdtemp(prefix="dma-drop-", dir="/tmp"))
    try:
        os.chmod(drop, 0o1733)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(nobody)
                os.setuid(nobody)
                try:  # the directory cannot be opened: the fsync of it is skipped
                    os.open(drop, os.O_RDONLY)
                    code = 3
                except PermissionError:
                    r, w = os.pipe()
                    os.write(w, b"Subject: from nobody\n\nhi\n")
                    os.close(w)
                    writer = _core.SpoolWriter(drop / "ID", r)
                    writer.stream_rest()
                    writer.commit(b"{}")
                    code = 0 if lockable(drop / "ID") else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.stat(drop / "ID").st_uid == nobody
        with _core.MessageFile(drop / "ID") as m:
            m.verify()
            assert read_cursor(m.cursor()) == b"Subject: from nobody\n\nhi\n"
    finally:
        shutil.rmtree(drop)
