"""Shared fixtures: a private dma installation context (config, spool, mail directory,
aliases in a temporary directory) and a runner for the real installed ``dma`` executable."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

DMA = shutil.which("dma")


@dataclass
class DmaSite:
    root: Path
    conf: Path
    spool: Path
    mail: Path
    aliases: Path
    mailname: str = "mail.test"

    def write_conf(self, extra: str = "") -> None:
        self.conf.write_text(
            f"SPOOLDIR {self.spool}\nMAILSPOOL {self.mail}\nALIASES {self.aliases}\n"
            f"MAILNAME {self.mailname}\nLOGFILE {self.root / 'dma.log'}\n{extra}"
        )

    @property
    def exe(self) -> str:
        exe = shutil.which("dma")
        assert exe, "dma is not installed (pip install -e .)"
        return exe

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("EMAIL", "DMA_CONF")}
        env["DMA_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *args: str, input: bytes | None = b"", prog: str = "dma",
            env: Mapping[str, str] | None = None, timeout: float = 60,
            stdin: int | None = None) -> subprocess.CompletedProcess[bytes]:
        exe = shutil.which(prog)
        assert exe, f"{prog} is not installed (pip install -e .)"
        return subprocess.run([exe, *args], input=None if stdin is not None else input,
                              stdin=stdin, capture_output=True, timeout=timeout,
                              env=dict(env) if env is not None else self.env())

    def mailbox(self, user: str = "root") -> Path:
        return self.mail / user

    def wait_mailbox(self, user: str = "root", count: int = 1, timeout: float = 20) -> bytes:
        """Wait for ``count`` messages in the mbox (delivery runs detached)."""
        deadline = time.monotonic() + timeout
        path = self.mailbox(user)
        while time.monotonic() < deadline:
            if path.exists():
                data = path.read_bytes()
                if data.count(b"\nFrom ") + data.startswith(b"From ") >= count and \
                        data.endswith(b"\n\n"):
                    return data
            time.sleep(0.05)
        raise AssertionError(f"no {count} message(s) in {path} after {timeout}s")

    def queue_ids(self) -> list[str]:
        q = self.spool / "queue"
        return sorted(os.listdir(q)) if q.exists() else []

    def tmp_debris(self) -> list[str]:
        t = self.spool / "tmp"
        return sorted(os.listdir(t)) if t.exists() else []


_PEAK_RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nPEAK_RSS_KB={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], *, stdin: int, env: Mapping[str, str],
                 timeout: float = 300) -> tuple[int, float, bytes]:
    """Run ``cmd`` and return (exit code, peak RSS in MB, stderr).  The command is started
    from a small wrapper process: a child forked from pytest itself would report pytest's
    own (large) resident size as its peak."""
    import sys

    p = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, *cmd], stdin=stdin,
                       capture_output=True, env=dict(env), timeout=timeout)
    err, _, tail = p.stderr.rpartition(b"\nPEAK_RSS_KB=")
    return p.returncode, int(tail) / 1024, err


@pytest.fixture
def site(tmp_path: Path) -> Iterator[DmaSite]:
    s = DmaSite(root=tmp_path, conf=tmp_path / "dma.conf", spool=tmp_path / "spool",
                mail=tmp_path / "mail", aliases=tmp_path / "aliases")
    s.mail.mkdir()
    s.aliases.write_text("postmaster: root\nabuse: root, daemon\n")
    s.write_conf()
    yield s


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")


Waiter = Callable[..., bytes]
