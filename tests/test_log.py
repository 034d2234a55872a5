"""The log file: one line per write, kept open briefly, never in place of stdin."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dma.log import Log


def test_lines_are_appended_and_a_rotated_file_is_let_go_of(tmp_path: Path) -> None:
    path = tmp_path / "dma.log"
    log = Log("dma", use_syslog=False, fallback_path=str(path))
    log.info("first")
    log.error("second\nline")
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("info: first")
    assert lines[1].endswith("error: second line")  # one line per entry
    path.rename(tmp_path / "dma.log.1")  # logrotate
    time.sleep(1.1)
    log.info("third")
    assert path.read_text().splitlines()[0].endswith("info: third")
    assert "third" not in (tmp_path / "dma.log.1").read_text()


def test_a_closed_stdin_is_not_taken_by_the_log(tmp_path: Path) -> None:
    # cron and daemons may start us with fd 0 closed; the message is read from fd 0.
    code = ("import os, sys\n"
            "from dma.log import Log\n"
            "log = Log(use_syslog=False, fallback_path=sys.argv[1])\n"
            "log.info('x')\n"
            "print(os.path.exists('/proc/self/fd/0'))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dma.log")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       pass_fds=(), close_fds=True,
                       preexec_fn=lambda: __import__("os").close(0))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert (tmp_path / "dma.log").read_text().endswith("info: x\n")
