"""The detached delivery of the default mode: started before the message is read (it loads
the delivery code while the message is spooled), it leaves the caller's session and pipes at
once, and it delivers only a committed message: real ``sendmail`` processes, a real SMTP
server on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from conftest import DmaSite
from smtpd import Behaviour, ScriptedServer

pytestmark = pytest.mark.usefixtures("root_only")

HEAD = b"To: root\nSubject: early\n\n"


def dma_processes(site: DmaSite) -> list[int]:
    """Live processes (not zombies) running with this site's configuration."""
    marker = f"DMA_CONF={site.conf}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if marker in env and state != b"Z":
            found.append(int(name))
    return sorted(found)


def wait_for(cond: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def session_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[3])


def start(site: DmaSite, *args: str) -> subprocess.Popen[bytes]:
    exe = site.exe.rsplit("/", 1)[0] + "/sendmail"
    return subprocess.Popen([exe, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=site.env())


def test_the_delivery_starts_before_the_message_is_read(site: DmaSite) -> None:
    p = start(site, "root")
    assert p.stdin
    try:
        p.stdin.write(HEAD)
        p.stdin.flush()
        assert wait_for(lambda: len(dma_processes(site)) == 2), dma_processes(site)
        (child,) = [pid for pid in dma_processes(site) if pid != p.pid]
        # It leaves the caller's session (right after the fork: wait for it).
        assert wait_for(lambda: session_of(child) == child), session_of(child)
        assert session_of(p.pid) != child
        assert wait_for(lambda: all(os.readlink(f"/proc/{child}/fd/{fd}") == os.devnull
                                    for fd in (0, 1, 2)))
        assert site.queue_ids() == [] and not site.mailbox().exists()
        p.stdin.write(b"the body\n")
    finally:
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == err == b""
    assert b"the body" in site.wait_mailbox()
    assert wait_for(lambda: site.queue_ids() == [] and dma_processes(site) == [])


def test_the_callers_pipes_close_when_sendmail_returns(site: DmaSite) -> None:
    with ScriptedServer(Behaviour(greeting_delay=4)) as srv:
        site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {srv.port}\n")
        t = time.monotonic()
        r = site.run("someone@example.org", input=HEAD + b"slow smarthost\n", prog="sendmail",
                     timeout=30)
        took = time.monotonic() - t
        assert r.returncode == 0, r.stderr
        assert took < 3, took  # not kept waiting for the delivery
        assert len(site.queue_ids()) == 1 and dma_processes(site)
        assert wait_for(lambda: len(srv.transactions) == 1, 30)
        assert b"slow smarthost" in srv.transactions[0].data
        assert wait_for(lambda: site.queue_ids() == [] and dma_processes(site) == [])


@pytest.mark.parametrize(("args", "message", "code"), [
    (["root", "no-such-user-xyz"], HEAD + b"x\n", 65),
    (["bad address@example.org"], HEAD + b"x\n", 65),
    (["-t"], b"Subject: no recipients in the head\n\nx\n", 66),
])
def test_a_failed_submission_leaves_nothing_behind(site: DmaSite, args: list[str],
                                                   message: bytes, code: int) -> None:
    r = site.run(*args, input=message, prog="sendmail")
    assert r.returncode == code, r.stderr
    assert wait_for(lambda: dma_processes(site) == [])
    assert site.queue_ids() == [] and site.tmp_debris() == []
    assert not site.mailbox().exists()


def test_unreadable_stdin_leaves_nothing_behind(site: DmaSite) -> None:
    fd = os.open(site.root / "out", os.O_WRONLY | os.O_CREAT)  # reading it fails (EBADF)
    try:
        r = site.run("root", stdin=fd, prog="sendmail")
    finally:
        os.close(fd)
    assert r.returncode != 0 and r.stderr.startswith(b"dma: "), r.stderr
    assert wait_for(lambda: dma_processes(site) == [])
    assert site.queue_ids() == [] and not site.mailbox().exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_sendmail_mid_message_leaves_no_child(site: DmaSite, sig: int) -> None:
    p = start(site, "root")
    assert p.stdin
    try:
        p.stdin.write(HEAD + b"half of it\n")
        p.stdin.flush()
        assert wait_for(lambda: len(dma_processes(site)) == 2)
        p.send_signal(sig)
        p.wait(10)
    finally:
        p.kill()
        p.communicate(timeout=10)
    assert wait_for(lambda: dma_processes(site) == [])
    assert site.queue_ids() == [] and not site.mailbox().exists()


@pytest.mark.parametrize(("args", "conf"), [
    (["-bq"], ""), (["-odq"], ""), (["-odi"], ""), (["-D"], ""), ([], "DEFER\n"),
])
def test_no_early_child_without_a_detached_delivery(site: DmaSite, args: list[str],
                                                    conf: str) -> None:
    site.write_conf(conf)
    p = start(site, *args, "root")
    assert p.stdin
    try:
        p.stdin.write(HEAD)
        p.stdin.flush()
        assert wait_for(lambda: p.pid in dma_processes(site))
        time.sleep(0.3)
        assert dma_processes(site) == [p.pid]
    finally:
        out, err = p.communicate(b"body\n", timeout=30)
    assert p.returncode == 0, err
