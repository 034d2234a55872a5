"""Harness for the kill -9 tests in test_crash.py: test messages that carry a token and a
body that can be checked byte for byte, parsers that find every copy of them in an mbox or a
maildir and judge each copy (intact, truncated, garbled), spool inspection, and helpers
that look at a live process (its current system call, its open files) just before it is
killed.  Real processes, real files, real signals: nothing here mocks dma."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_HEADER = "X-Crash-Token"
FOOTER_MAGIC = b"DMA-END 1 "
FOOTER_LEN = 64

_TOKEN_RE = re.compile(rb"(?mi)^X-Crash-Token: *(\S+)\r?$")
_UNESCAPE_RE = re.compile(rb"(?m)^>(>*From )")

# Lines that exercise the mbox From-escaping and the reader's line handling.  None of them is a
# lone "." (that would end the input) or starts with a dot (no dot-stuffing questions here).
_SPECIAL_LINES = (
    b"From the crash test: a line that mboxrd must escape\n",
    b">From an already quoted line\n",
    b">>From one quoted twice\n",
    b"\n",
    b"\n",
    b"    indented text, then trailing blanks   \n",
    b"x" * 997 + b"\n",
    b"From \n",
)


def make_body(seed: int, size: int) -> bytes:
    """A deterministic body of about ``size`` bytes (at least one line), LF line endings."""
    rng = random.Random(seed)
    raw = rng.randbytes(max(1, size * 3 // 4))
    text = base64.encodebytes(raw)  # 76-character lines
    if size < 512:
        return text
    line = 77
    cuts = sorted(rng.randrange(0, len(text) // line + 1) * line for _ in range(6))
    parts: list[bytes] = []
    prev = 0
    for cut in cuts:
        parts.append(text[prev:cut])
        parts.append(rng.choice(_SPECIAL_LINES))
        prev = cut
    parts.append(text[prev:])
    return b"".join(parts)


@dataclass(frozen=True)
class TestMessage:
    """One message of a crash test: its token identifies every copy of it."""

    __test__ = False  # not a pytest class

    token: str
    seed: int
    size: int
    sha: str
    length: int

    @classmethod
    def create(cls, token: str, seed: int, size: int) -> TestMessage:
        body = make_body(seed, size)
        return cls(token, seed, size, hashlib.sha256(body).hexdigest(), len(body))

    def body(self) -> bytes:
        return make_body(self.seed, self.size)

    def data(self, *, to: str | None = "root") -> bytes:
        """Head + body as a submitter sends it (``to=None``: no recipient headers)."""
        head = f"From: Crash Test <crash@example.org>\nSubject: crash trial {self.token}\n"
        if to is not None:
            head += f"To: {to}\n"
        head += f"{TOKEN_HEADER}: {self.token}\n\n"
        return head.encode() + self.body()


@dataclass
class Copy:
    """One message found in a mailbox."""

    where: str
    """mailbox path (and offset) or maildir file name"""
    token: str | None
    head: bytes
    body: bytes
    """the body as a reader sees it (mboxrd escaping removed)"""
    head_complete: bool
    status: str = "unjudged"
    """intact, truncated (a prefix of the message), garbled, foreign (unknown token) or
    fragment (no token: cut before its token header)"""
    length: int = 0
    expected: int = 0


def parse_mbox(data: bytes, where: str = "mbox") -> tuple[list[Copy], list[str]]:
    """Every message in an mboxrd mailbox and the framing problems found.  A message starts
    with a ``From `` line at the start of the file or after an empty line; dma escapes every
    ``From `` line inside a message, so an unescaped one anywhere else is a problem."""
    problems: list[str] = []
    if not data:
        return [], problems
    if not data.startswith(b"From "):
        problems.append(f"{where}: does not start with a From_ line: {data[:60]!r}")
    if not data.endswith(b"\n\n"):
        problems.append(f"{where}: the last message is not complete (file ends with "
                        f"{data[-60:]!r})")
    copies: list[Copy] = []
    starts = [0] + [m.start() + 2 for m in re.finditer(rb"\n\nFrom ", data)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        text = data[start:end]
        if text.endswith(b"\n\n"):
            text = text[:-1]  # the empty line that ends every message in an mbox
        _, _, rest = text.partition(b"\n")
        if re.search(rb"(?m)^From ", rest):
            problems.append(f"{where}@{start}: an unescaped From_ line inside a message")
        head, sep, body = rest.partition(b"\n\n")
        copies.append(Copy(f"{where}@{start}", _token(head), head,
                           _UNESCAPE_RE.sub(rb"\1", body), bool(sep)))
    return copies, problems


def parse_maildir_file(path: Path) -> tuple[Copy, list[str]]:
    data = path.read_bytes()
    problems = []
    first, _, rest = data.partition(b"\n")
    if not first.startswith(b"Return-Path: <"):
        problems.append(f"{path}: does not start with a Return-Path line: {data[:60]!r}")
    head, sep, body = rest.partition(b"\n\n")
    return Copy(str(path), _token(head), head, body, bool(sep)), problems


def _token(head: bytes) -> str | None:
    m = _TOKEN_RE.search(head)
    return m.group(1).decode() if m else None


def judge(copies: Iterable[Copy], known: Mapping[str, TestMessage]) -> None:
    """Set each copy's status against the message it claims to be."""
    for c in copies:
        c.length = len(c.body)
        if c.token is None:
            c.status = "fragment"
            continue
        msg = known.get(c.token)
        if msg is None:
            c.status = "foreign"
            continue
        c.expected = msg.length
        if c.head_complete and len(c.body) == msg.length and \
                hashlib.sha256(c.body).hexdigest() == msg.sha:
            c.status = "intact"
            continue
        full = msg.body()
        # A cut copy: what was written is a prefix of the message; the separator that the
        # next delivery adds may have completed its last line with a newline.
        cut = c.body[:-1] if c.body.endswith(b"\n") else c.body
        if not c.head_complete or (len(c.body) < len(full) and full.startswith(cut)):
            c.status = "truncated"
        else:
            c.status = "garbled"


@dataclass
class Tally:
    """Copies per token, by status."""

    by_token: dict[str, Counter[str]] = field(default_factory=dict)
    others: list[Copy] = field(default_factory=list)
    """fragments and foreign copies"""

    def add(self, copies: Iterable[Copy]) -> None:
        for c in copies:
            if c.token is None or c.status == "foreign":
                self.others.append(c)
            else:
                self.by_token.setdefault(c.token, Counter())[c.status] += 1

    def count(self, token: str, status: str = "intact") -> int:
        return self.by_token.get(token, Counter())[status]


def mailbox_copies(path: Path, known: Mapping[str, TestMessage]) -> tuple[list[Copy], list[str]]:
    if not path.exists():
        return [], []
    copies, problems = parse_mbox(path.read_bytes(), str(path))
    judge(copies, known)
    return copies, problems


def maildir_copies(path: Path, known: Mapping[str, TestMessage]
                   ) -> tuple[list[Copy], list[str], list[str]]:
    """Copies in ``new/`` (and ``cur/``), framing problems, names left in ``tmp/``."""
    copies: list[Copy] = []
    problems: list[str] = []
    for sub in ("new", "cur"):
        d = path / sub
        if not d.exists():
            continue
        for f in sorted(d.iterdir()):
            c, p = parse_maildir_file(f)
            copies.append(c)
            problems += p
    judge(copies, known)
    tmp = sorted(os.listdir(path / "tmp")) if (path / "tmp").exists() else []
    return copies, problems, tmp


# ------------------------------------------------------------------------------------------
# the spool


SPOOL_DIRS = ("tmp", "queue", "journal", "hold")


def spool_listing(spool: Path) -> dict[str, list[str]]:
    out = {}
    for d in SPOOL_DIRS:
        p = spool / d
        out[d] = sorted(os.listdir(p)) if p.exists() else []
    return out


@dataclass(frozen=True)
class SpoolFile:
    name: str
    token: str | None
    size: int
    footer: bool
    """ends with a complete footer (the writer got past writing envelope + footer)"""


def spool_files(spool: Path, sub: str) -> list[SpoolFile]:
    d = spool / sub
    out = []
    for name in sorted(os.listdir(d)) if d.exists() else []:
        try:
            with open(d / name, "rb") as f:
                head = f.read(1 << 16)
                size = os.fstat(f.fileno()).st_size
                footer = False
                if size >= FOOTER_LEN:
                    f.seek(size - FOOTER_LEN)
                    footer = f.read(FOOTER_LEN).startswith(FOOTER_MAGIC)
        except FileNotFoundError:
            continue
        hd = head.partition(b"\n\n")[0]
        out.append(SpoolFile(name, _token(hd), size, footer))
    return out


# ------------------------------------------------------------------------------------------
# processes

# x86_64 and aarch64 numbers of the system calls worth naming in a report
_SYSCALLS = {
    "x86_64": {0: "read", 1: "write", 3: "close", 4: "stat", 5: "fstat", 7: "poll",
               8: "lseek", 9: "mmap", 17: "pread64", 18: "pwrite64", 20: "writev",
               72: "fcntl", 73: "flock", 74: "fsync", 75: "fdatasync", 82: "rename",
               87: "unlink", 202: "futex", 230: "clock_nanosleep", 257: "openat",
               262: "newfstatat", 263: "unlinkat", 264: "renameat", 285: "fallocate",
               316: "renameat2", 332: "statx", 35: "nanosleep", 270: "pselect6",
               281: "epoll_pwait", 232: "epoll_wait", 61: "wait4", 93: "fchown", 91: "fchmod",
               77: "ftruncate", 59: "execve", 231: "exit_group", 10: "mprotect", 11: "munmap",
               12: "brk", 265: "linkat", 86: "link"},
    "aarch64": {63: "read", 64: "write", 57: "close", 82: "fsync", 83: "fdatasync",
                276: "renameat2", 38: "renameat", 56: "openat", 67: "pread64", 25: "fcntl",
                32: "flock", 98: "futex", 115: "clock_nanosleep", 101: "nanosleep",
                35: "unlinkat", 37: "linkat", 46: "ftruncate", 221: "execve"},
}


def current_syscall(pid: int) -> str:
    """What the process is doing now: a system call name, ``running`` or ``gone``."""
    try:
        text = Path(f"/proc/{pid}/syscall").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    except OSError:
        return "unknown"
    if not text:
        return "unknown"
    if text[0] in ("running", "-1"):
        return "running" if text[0] == "running" else "blocked"
    try:
        nr = int(text[0])
    except ValueError:
        return text[0]
    return _SYSCALLS.get(os.uname().machine, {}).get(nr, f"syscall {nr}")


def open_files(pid: int, prefix: str | Path) -> list[str]:
    """Paths starting with ``prefix`` that the process has open now."""
    out: list[str] = []
    prefix = str(prefix)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            out.append(target)
    return out


def kill9(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL our child by its pid if it has not ended yet (it is not reaped while
    ``poll()`` says None, so the pid cannot belong to anybody else); True when sent."""
    if proc.poll() is not None:
        return False
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) is not alive for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def dotlocks(maildir: Path) -> dict[str, str]:
    """``*.lock`` files in the mail directory and their contents (the holder's pid)."""
    out = {}
    for p in maildir.glob("*.lock"):
        try:
            out[p.name] = p.read_text().strip()
        except OSError:
            continue
    return out
