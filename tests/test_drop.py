"""Unprivileged submitters: ``nobody`` drops a message into the spool's drop directory, the
queue runner (root) picks it up with the file owner as the sender identity."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dma.cli
import dma.config
import dma.pickup
import dma.submit
from conftest import DmaSite

pytestmark = pytest.mark.usefixtures("root_only")

NOBODY = 65534


@pytest.fixture
def shared_site() -> Iterator[DmaSite]:
    """A site outside /tmp/pytest-of-root (0700), laid out as ``dma setup`` does."""
    root = Path(tempfile.mkdtemp(prefix="dma-drop-", dir="/tmp"))
    try:
        root.chmod(0o755)
        s = DmaSite(root=root, conf=root / "dma.conf", spool=root / "spool", mail=root / "mail",
                    aliases=root / "aliases")
        s.spool.mkdir(mode=0o755)
        for d in ("tmp", "queue", "journal", "hold"):
            (s.spool / d).mkdir(mode=0o700)
        incoming = s.spool / "incoming"
        incoming.mkdir()
        os.chown(incoming, 0, grp.getgrnam("mail").gr_gid)
        incoming.chmod(0o1733)
        s.mail.mkdir()
        s.aliases.write_text("postmaster: root\n")
        s.write_conf()
        s.conf.chmod(0o644)
        yield s
    finally:
        shutil.rmtree(root)


def as_nobody(site: DmaSite, argv: list[str], message: bytes) -> int:
    """Run the sendmail persona in a child that has dropped to ``nobody`` (the package was
    imported while root could read it: the interpreter lives under /root)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.dup2(r, 0)
            sys.stdin = os.fdopen(0, "r")  # pytest replaces sys.stdin while capturing
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ.clear()
            os.environ.update(DMA_CONF=str(site.conf), LOGNAME="nobody", PATH="/usr/bin:/bin")
            code = dma.cli.main(["sendmail", *argv])
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 99
        os._exit(code)
    os.close(r)
    os.write(w, message)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_nobody_drops_and_runner_delivers(shared_site: DmaSite) -> None:
    site = shared_site
    msg = (b"Received: from root (uid 0) forged\nSubject: from nobody\n\n"
           b"hello from an unprivileged user\n.\nafter a dot line\n")
    assert as_nobody(site, ["-i", "-f", "anyone@example.org", "root"], msg) == 0
    drops = os.listdir(site.spool / "incoming")
    assert len(drops) == 1 and site.queue_ids() == []
    st = (site.spool / "incoming" / drops[0]).stat()
    assert st.st_uid == NOBODY and st.st_mode & 0o777 == 0o600
    # nobody cannot list the drop directory (nor read the queue)
    pid = os.fork()
    if pid == 0:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        try:
            os.listdir(site.spool / "incoming")
            os._exit(1)
        except PermissionError:
            os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    assert os.listdir(site.spool / "incoming") == [] and site.queue_ids() == []
    mbox = site.mailbox("root").read_bytes()
    first_received = mbox.split(b"\nReceived: ", 1)[1].split(b"\n", 1)[0]
    assert first_received == b"from nobody (uid 65534)"  # the owner, not the forged header
    assert b"Subject: from nobody" in mbox
    assert b"hello from an unprivileged user\n.\nafter a dot line\n" in mbox
    assert mbox.startswith(b"From anyone@example.org ")


def test_nobody_bad_input_still_fails_fast(shared_site: DmaSite) -> None:
    site = shared_site
    assert as_nobody(site, ["no-such-user-xyz"], b"\nx\n") == 65
    assert as_nobody(site, ["-t"], b"Subject: none\n\nx\n") == 66
    assert os.listdir(site.spool / "incoming") == []


def test_unusable_drops_are_moved_aside_or_removed(shared_site: DmaSite) -> None:
    site = shared_site
    incoming = site.spool / "incoming"
    # debris of a dead writer (no footer, unlocked): removed
    (incoming / "AAAA1").write_bytes(b"partial message")
    # a symlink planted in the drop directory: never followed
    (incoming / "AAAA2").symlink_to(site.conf)
    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(incoming)) == ["AAAA2"]
    assert site.conf.exists()


def test_setup_layout_allows_drops(tmp_path: Path) -> None:
    """``dma setup --root`` makes the drop directory the way this test relies on."""
    exe = shutil.which("dma")
    assert exe
    r = subprocess.run([exe, "setup", "--root", str(tmp_path), "--init", "cron"],
                       capture_output=True, env={**os.environ, "DMA_CONF": ""})
    assert r.returncode == 0, r.stderr
    incoming = tmp_path / "var/spool/dma/incoming"
    assert incoming.stat().st_mode & 0o7777 == 0o1733
