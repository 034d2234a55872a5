"""Infrastructure for benches/bench.py: setup (Debian packages, smtp-sink, a venv with dma
installed from a real wheel), C dma's configuration (swapped in, always restored), SMTP sinks,
test messages, and timing helpers.

Everything here binds loopback only, starts its servers as children and stops them by PID,
and bounds every wait.  Processes started by the benchmark (including the delivery processes
C dma and our dma detach) carry the environment variable BENCH_MARK=<random id> so that a
run that fails half-way can stop exactly those and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benches"
BUILD = BENCH / "build"
RUN = BUILD / "run"
DATA = BUILD / "data"
VENV = BUILD / "venv"
OURS = VENV / "bin" / "dma"
VENV_PY = VENV / "bin" / "python"
CDMA = Path("/usr/sbin/dma")
POSTFIX = BUILD / "postfix"
SINK_BIN = POSTFIX / "usr/sbin/smtp-sink"
SINK_LIB = POSTFIX / "usr/lib/postfix"
CDMA_CONF = Path("/etc/dma/dma.conf")
GNU_TIME = Path("/usr/bin/time")
MAILNAME = "bench.test"
MiB = 1 << 20

MARK = uuid.uuid4().hex
"""Every process this run starts (and whatever those detach) has BENCH_MARK=MARK."""


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def sh(cmd: Sequence[str | os.PathLike[str]], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)  # type: ignore[call-overload]


# -- setup ----------------------------------------------------------------------------------


def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True)
    return r.returncode == 0 and b"install ok installed" in r.stdout


def _source_stamp() -> str:
    """A hash of everything that goes into the wheel: rebuild the venv's dma when it changes."""
    h = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "Cargo.toml", ROOT / "Cargo.lock"]
    for sub, pats in (("rust", ("*.rs",)), ("python/dma", ("*.py", "*.pyi", "py.typed"))):
        for pat in pats:
            files += sorted((ROOT / sub).rglob(pat))
    for f in files:
        if f.exists():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def setup() -> None:
    """Idempotent: install C dma (Debian's dma), dnsmasq; unpack Postfix's smtp-sink into
    benches/build; make benches/build/venv and pip-install this repository into it (a real
    release wheel build by maturin) whenever the sources changed."""
    BUILD.mkdir(parents=True, exist_ok=True)
    missing = [p for p in ("dma", "dnsmasq-base") if not _dpkg_installed(p)]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh(["apt-get", "update", "-qq"], env=env)
        sh(["apt-get", "install", "-y", "-qq", *missing], env=env)
    if not SINK_BIN.exists():
        log("fetching Postfix's smtp-sink (apt-get download postfix; dpkg -x, nothing installed)")
        for old in BUILD.glob("postfix_*.deb"):
            old.unlink()
        sh(["apt-get", "download", "-qq", "postfix"], cwd=BUILD)
        deb = sorted(BUILD.glob("postfix_*.deb"))[-1]
        sh(["dpkg-deb", "-x", deb, POSTFIX])
    if not VENV_PY.exists():
        base = os.path.realpath(sys.executable)
        log(f"creating {VENV} from {base}")
        sh([base, "-m", "venv", VENV])
    stamp = _source_stamp()
    stamp_file = BUILD / "venv.stamp"
    if not OURS.exists() or not stamp_file.exists() or stamp_file.read_text() != stamp:
        log("pip install . into the bench venv (release wheel build)")
        env = dict(os.environ, CARGO_TARGET_DIR=str(BUILD / "target"),
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        sh([VENV_PY, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", ROOT],
           env=env)
        sh([VENV_PY, "-m", "pip", "install", "-q", ROOT], env=env)  # dependencies
        stamp_file.write_text(stamp)
    for d in (RUN, DATA):
        d.mkdir(parents=True, exist_ok=True)


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "ours": out([str(OURS), "--version"]),
        "c_dma": out(["dpkg-query", "-W", "-f=${Version}", "dma"]),
        "smtp_sink": "postfix " + out(["dpkg-deb", "-f", str(next(BUILD.glob("postfix_*.deb"),
                                                                    "")), "Version"]),
        "python": out([str(VENV_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "git": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "git_dirty": out(["git", "-C", str(ROOT), "status", "--porcelain", "--", "python",
                          "rust"]) != "" and "yes" or "no",
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
    }


# -- process hygiene ------------------------------------------------------------------------


def bench_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DMA_CONF", "EMAIL")}
    env["BENCH_MARK"] = MARK
    env.update(extra)
    return env


def marked_pids(exe: str | None = None) -> list[int]:
    """PIDs of live processes carrying this run's BENCH_MARK (optionally: running exe)."""
    needle = f"BENCH_MARK={MARK}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            if exe is not None and os.readlink(f"/proc/{name}/exe") != exe:
                continue
        except OSError:
            continue
        found.append(int(name))
    return found


def stop_marked(grace: float = 3.0) -> int:
    """Stop every process this run started that is still alive (detached deliveries)."""
    pids = marked_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.002) -> float:
    """Poll ``cond`` until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- C dma's configuration ------------------------------------------------------------------


class CdmaConf:
    """C dma reads only /etc/dma/dma.conf: this writes the bench settings there and restores
    the original bytes (and mode) on restore(), which the runner calls in a finally block."""

    def __init__(self) -> None:
        self.original: bytes | None = CDMA_CONF.read_bytes() if CDMA_CONF.exists() else None
        self.mode = CDMA_CONF.stat().st_mode & 0o7777 if CDMA_CONF.exists() else 0o644
        self.spool = RUN / "c-spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        # C dma drops root to the mail user: its spool must be the mail user's.
        shutil.chown(self.spool, "mail", "mail")
        os.chmod(self.spool, 0o2775)
        (RUN / "aliases").touch()

    def write(self, port: int, smarthost: str | None = "127.0.0.1") -> None:
        lines = [f"SPOOLDIR {self.spool}", f"ALIASES {RUN / 'aliases'}", f"MAILNAME {MAILNAME}"]
        if smarthost:
            lines += [f"SMARTHOST {smarthost}", f"PORT {port}"]
        CDMA_CONF.parent.mkdir(parents=True, exist_ok=True)
        CDMA_CONF.write_text("# written by dma's benches/bench.py; restored when it ends\n"
                             + "\n".join(lines) + "\n")

    def restore(self) -> None:
        if self.original is None:
            with contextlib.suppress(FileNotFoundError):
                CDMA_CONF.unlink()
        else:
            CDMA_CONF.write_bytes(self.original)
            os.chmod(CDMA_CONF, self.mode)

    def pending(self) -> int:
        """Queue (Q*) and message (M*) files left in C dma's spool."""
        return sum(1 for n in os.listdir(self.spool) if n[:1] in ("Q", "M"))

    def clear(self) -> None:
        for n in os.listdir(self.spool):
            p = self.spool / n
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


class OursConf:
    """Our dma's private configuration (DMA_CONF), spool and mail directory under RUN."""

    def __init__(self) -> None:
        self.path = RUN / "ours.conf"
        self.spool = RUN / "ours-spool"
        self.mail = RUN / "mail"
        self.mail.mkdir(parents=True, exist_ok=True)
        (RUN / "aliases").touch()

    def write(self, port: int, smarthost: str | None = "127.0.0.1", extra: str = "") -> None:
        lines = [f"SPOOLDIR {self.spool}", f"MAILSPOOL {self.mail}", f"ALIASES {RUN / 'aliases'}",
                 f"MAILNAME {MAILNAME}", f"LOGFILE {RUN / 'ours.log'}"]
        if smarthost:
            lines += [f"SMARTHOST {smarthost}", f"PORT {port}"]
        self.path.write_text("\n".join(lines) + "\n" + extra)

    def env(self) -> dict[str, str]:
        return bench_env(DMA_CONF=str(self.path))

    def pending(self) -> int:
        try:
            return len(os.listdir(self.spool / "queue"))
        except FileNotFoundError:
            return 0

    def clear(self) -> None:
        """Empty the spool but keep its directories (as a long-lived installation has them)."""
        if not self.spool.exists():
            return
        for d in self.spool.iterdir():
            if d.is_dir():
                for f in d.iterdir():
                    if f.is_dir():
                        shutil.rmtree(f)
                    else:
                        f.unlink()
            else:
                d.unlink()


# -- sinks ----------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SmtpSink:
    """Postfix's smtp-sink on host:port, counting (-c): its running counters (sessions
    ended, messages received) are read from its stdout and time-stamped as they come.

    Postfix's smtp-sink reads DATA at only 200-350 MB/s; FastSink (benches/fastsink.py)
    has the same interface and reads at about the loopback copy rate."""

    name = "smtp-sink"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sess = 0
        self.mesg = 0
        self.mesg_times: list[float] = []
        """mesg_times[i]: when the (i+1)-th message had been received."""
        self.expected = 0
        """How many messages the bench has sent here in all (see settle())."""
        self.bodies: list[dict[str, object]] = []
        """FastSink(verify=True) only: per message, RCPTs and the body's size and SHA-256."""
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def _command(self) -> tuple[list[str], dict[str, str]]:
        # -m 1024: up to 1024 sessions at once (C dma opens one per recipient / message);
        # backlog 1024; -t 300: no command timeout during the big runs.
        return ([str(SINK_BIN), "-c", "-u", "root", "-m", "1024", "-t", "300",
                 f"{self.host}:{self.port}", "1024"],
                dict(os.environ, LD_LIBRARY_PATH=str(SINK_LIB)))

    def _err_path(self) -> Path:
        return RUN / f"{self.name}-{self.host}-{self.port}.err"

    def __enter__(self) -> Self:
        argv, env = self._command()
        err = open(self._err_path(), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                     stdin=subprocess.DEVNULL, env=env)
        err.close()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_until(self._accepting, 10, f"{self.name} on {self.host}:{self.port}", 0.02)
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}), see {RUN}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.recv(100)
                s.sendall(b"QUIT\r\n")
                s.recv(100)
            return True
        except OSError:
            return False

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        rest = b""
        while True:
            data = os.read(fd, 65536)
            if not data:
                return
            now = time.monotonic()
            *records, rest = (rest + data).replace(b"\n", b"\r").split(b"\r")
            with self._cv:
                for rec in records:
                    fields = dict(kv.split(b"=", 1) for kv in rec.split() if b"=" in kv)
                    if b"mesg" not in fields:
                        continue
                    mesg = int(fields[b"mesg"])
                    self.sess = int(fields.get(b"sess", self.sess))
                    # fastsink stamps each message itself (t=, CLOCK_MONOTONIC as here)
                    at = float(fields[b"t"]) if b"t" in fields else now
                    while len(self.mesg_times) < mesg:
                        self.mesg_times.append(at)
                    if b"sha256" in fields:
                        self.bodies.append({"rcpts": int(fields[b"rcpt"]),
                                            "body_size": int(fields[b"size"]),
                                            "body_sha256": fields[b"sha256"].decode()})
                    self.mesg = mesg
                self._cv.notify_all()

    def wait_mesg(self, count: int, timeout: float) -> float:
        """Time at which the sink had received ``count`` messages in all."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.mesg < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise TimeoutError(f"{self.name} {self.host}:{self.port}: {self.mesg} of "
                                       f"{count} messages after {timeout:.0f}s")
                self._cv.wait(min(left, 0.5))
            return self.mesg_times[count - 1] if count > 0 else time.monotonic()

    def settle(self, add: int = 0, timeout: float = 60) -> int:
        """Account for ``add`` more messages sent here, wait until the sink has counted every
        message sent so far (its counter lines can trail the reply to the client), and return
        that total: the base for the next run."""
        self.expected += add
        self.wait_mesg(self.expected, timeout)
        with self._cv:
            if self.mesg != self.expected:
                raise RuntimeError(f"{self.name} {self.host}:{self.port} counted {self.mesg} "
                                   f"messages, the bench sent {self.expected}")
        return self.expected

    def counts(self) -> tuple[int, int]:
        with self._cv:
            return self.sess, self.mesg

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(2)
        err = self._err_path()
        with contextlib.suppress(OSError):
            if err.stat().st_size == 0:
                err.unlink()


class FastSink(SmtpSink):
    """benches/fastsink.py on host:port, in a process of its own (its own core): a
    selector-loop SMTP sink that reads DATA with recv_into a 4 MiB buffer and finds the
    terminator with bytearray.find, about the loopback copy rate where Postfix's smtp-sink
    reads 200-350 MB/s.  Same counters and interface as SmtpSink (its records carry the
    time the terminator was read).  ``verify=True``: it also hashes every body (see
    ``bodies``): slower, not for timing."""

    name = "fastsink"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 verify: bool = False, size: bool = True) -> None:
        super().__init__(host, port)
        self.verify = verify
        self.size = size

    def _command(self) -> tuple[list[str], dict[str, str]]:
        return ([sys.executable, str(BENCH / "fastsink.py"), f"{self.host}:{self.port}",
                 *(["--verify"] if self.verify else []),
                 *([] if self.size else ["--no-size"])], dict(os.environ))


class HashSink:
    """A byte-exact receiving server of our own (Python, threaded, PIPELINING, no CHUNKING
    like smtp-sink): undoes the dot-stuffing of each DATA and records per transaction the
    number of accepted RCPTs and the SHA-256 and size of the body (everything after the
    header block).  Slower than smtp-sink: used to check bytes, not to time."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.transactions: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HashSink:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, 0))
        self._sock.listen(1024)
        self.port = self._sock.getsockname()[1]
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        if self._sock is not None:
            self._sock.close()

    def received(self) -> int:
        with self._lock:
            return len(self.transactions)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            r, _, _ = select.select([self._sock], [], [], 0.1)
            if not r:
                continue
            conn, _ = self._sock.accept()
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(300)
        buf = b""
        rcpts = 0
        try:
            conn.sendall(b"220 hashsink ESMTP\r\n")
            while not self._stop.is_set():
                i = buf.find(b"\r\n")
                if i < 0:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                    continue
                line, buf = buf[:i], buf[i + 2:]
                verb = line[:4].upper()
                if verb in (b"EHLO", b"LHLO"):
                    conn.sendall(b"250-hashsink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250-SIZE 0\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == b"HELO":
                    conn.sendall(b"250 hashsink\r\n")
                elif verb == b"MAIL":
                    rcpts = 0
                    conn.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts += 1
                    conn.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    buf, record = self._data(conn, buf)
                    record["rcpts"] = rcpts
                    with self._lock:
                        self.transactions.append(record)
                    conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:  # RSET, NOOP, ...
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    @staticmethod
    def _data(conn: socket.socket, buf: bytes) -> tuple[bytes, dict[str, object]]:
        body = hashlib.sha256()
        size = 0
        head = bytearray()
        in_head = True
        first = True
        pending = b"\r\n" + buf  # a virtual line end before the first line
        while True:
            end = pending.find(b"\r\n.\r\n")
            if end >= 0:
                part, rest, final = pending[:end + 2], pending[end + 5:], True
            else:
                cut = pending.rfind(b"\r\n")
                if cut > 0:  # every "\r\n.." before the last line end lies wholly in part
                    part, pending = pending[:cut], pending[cut:]
                else:
                    part = b""
                final, rest = False, b""
            if part:
                part = part.replace(b"\r\n..", b"\r\n.")
                if first:
                    part, first = part[2:], False
                if in_head:
                    head += part
                    k = head.find(b"\r\n\r\n")
                    if k >= 0:
                        tail = bytes(head[k + 4:])
                        del head[k + 2:]
                        in_head = False
                        body.update(tail)
                        size += len(tail)
                else:
                    body.update(part)
                    size += len(part)
            if final:
                return rest, {"body_sha256": body.hexdigest(), "body_size": size,
                              "head": bytes(head[:4096]).decode("latin-1")}
            data = conn.recv(1 << 20)
            if not data:
                raise ConnectionError("connection closed in DATA")
            pending += data


# -- messages -------------------------------------------------------------------------------


_GEN_VERSION = 1


def message_path(size: int) -> Path:
    """A MIME message of ``size`` bytes (LF line ends) with a base64 attachment of random
    bytes and a text part with lines that need SMTP dot-stuffing and mbox From_ escaping;
    generated once (deterministic) and cached in benches/build/data."""
    path = DATA / f"msg-{size}-v{_GEN_VERSION}.eml"
    if path.exists() and path.stat().st_size == size:
        return path
    head = (b"From: Bench <bench@bench.test>\nTo: someone@remote.test\n"
            b"Subject: benchmark attachment\nMIME-Version: 1.0\n"
            b"Content-Type: multipart/mixed; boundary=\"=-bench-boundary\"\n\n"
            b"--=-bench-boundary\nContent-Type: text/plain; charset=us-ascii\n\n"
            b"The attachment is random data.\n.a line that SMTP must dot-stuff\n..two dots\n"
            b"From here on the mbox writer must escape this line\n\n"
            b"--=-bench-boundary\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n"
            b"Content-Disposition: attachment; filename=\"random.bin\"\n\n")
    tail = b"\n--=-bench-boundary--\n"
    if size < len(head) + len(tail) + 77:
        raise ValueError("message too small")
    rng = random.Random(size)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        left = size - len(head) - len(tail)
        block = 57 * 20000  # 20,000 base64 lines of 76 characters (+ LF) per write
        while left >= 77:
            n = min(block, (left // 77) * 57)
            enc = base64.encodebytes(rng.randbytes(n))
            f.write(enc)
            left -= len(enc)
        f.write(b"x" * (left - 1) + b"\n" if left else b"")
        f.write(tail)
    os.replace(tmp, path)
    assert path.stat().st_size == size, (path, path.stat().st_size, size)
    return path


def small_message(size: int) -> Path:
    """A plain text message of ``size`` bytes (cron / application mail)."""
    path = DATA / f"text-{size}.eml"
    if path.exists() and path.stat().st_size == size:
        return path
    head = b"From: cron@bench.test\nTo: ops@remote.test\nSubject: nightly report\n\n"
    line = b"All jobs finished; this line is filler text for the benchmark body.\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 1] + b"\n"
    path.write_bytes(head + body)
    return path


def body_sha256_crlf(path: Path) -> tuple[str, int]:
    """SHA-256 and size of the message body (after the first blank line) as it must arrive
    over SMTP (CRLF line ends, unstuffed)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for line in f:
            if line == b"\n":
                break
        for block in iter(lambda: f.read(8 * MiB), b""):
            # blocks end anywhere; LF -> CRLF is safe per block (input has no CR)
            out = block.replace(b"\n", b"\r\n")
            h.update(out)
            size += len(out)
    return h.hexdigest(), size


def wire_path(path: Path) -> Path:
    """The message as SMTP DATA carries it: CRLF, dot-stuffed, with the final ".\\r\\n"."""
    wire = path.with_suffix(".wire")
    if wire.exists() and wire.stat().st_mtime >= path.stat().st_mtime:
        return wire
    tmp = wire.with_suffix(".wtmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for line in src:
            if line.startswith(b"."):
                line = b"." + line
            dst.write(line[:-1] + b"\r\n" if line.endswith(b"\n") else line + b"\r\n")
        dst.write(b".\r\n")
    os.replace(tmp, wire)
    return wire


# -- raw limits ---------------------------------------------------------------------------


def _reply(f: object) -> bytes:
    last = b""
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("closed")
        last = line
        if line[3:4] != b"-":
            return last


def raw_smtp(host: str, port: int, wire: Path, rcpts: Sequence[str]) -> float:
    """One SMTP transaction by a minimal client (the bytes prepared in advance, sent with
    sendfile): connect .. final 250 after the dot.  Returns seconds."""
    t0 = time.monotonic()
    with socket.create_connection((host, port)) as s, open(wire, "rb") as body:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _reply(f)
        s.sendall(b"EHLO raw.bench.test\r\n")
        _reply(f)
        cmds = b"MAIL FROM:<raw@bench.test>\r\n" + b"".join(
            b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n"
        s.sendall(cmds)
        for _ in range(len(rcpts) + 2):
            code = _reply(f)
        if not code.startswith(b"354"):
            raise RuntimeError(f"raw client: {code!r}")
        s.sendfile(body)
        code = _reply(f)
        if not code.startswith(b"250"):
            raise RuntimeError(f"raw client: {code!r}")
        t1 = time.monotonic()
        s.sendall(b"QUIT\r\n")
        _reply(f)
    return t1 - t0


def raw_pipelined(host: str, port: int, body: bytes, count: int) -> float:
    """``count`` transactions over one connection by a bare client (MAIL+RCPT+DATA in one
    send, then the body and the dot in one send)."""
    wire = body.replace(b"\n", b"\r\n") + b".\r\n"
    t0 = time.monotonic()
    with socket.create_connection((host, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _reply(f)
        s.sendall(b"EHLO raw.bench.test\r\n")
        _reply(f)
        for _ in range(count):
            s.sendall(b"MAIL FROM:<raw@bench.test>\r\nRCPT TO:<q@remote.test>\r\nDATA\r\n")
            _reply(f), _reply(f), _reply(f)
            s.sendall(wire)
            _reply(f)
        s.sendall(b"QUIT\r\n")
        _reply(f)
    return time.monotonic() - t0


def dd_fsync(src: Path) -> float:
    """``dd bs=1M conv=fsync`` of the file into the spools' file system (benches/build/run
    holds both spools); returns seconds."""
    dst = RUN / "raw-dd.tmp"
    t0 = time.monotonic()
    sh(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none"])
    t = time.monotonic() - t0
    dst.unlink()
    return t


# -- statistics -----------------------------------------------------------------------------


def stats(xs: Sequence[float]) -> dict[str, object]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs),
            "runs": [round(x, 6) for x in xs]}


def ratio(c: dict[str, object], ours: dict[str, object]) -> float:
    return float(c["median"]) / float(ours["median"])  # type: ignore[arg-type]


def _run_blocking(argv: list[str], stdin: object, stderr: object, env: dict[str, str],
                  timeout: float) -> int:
    """Start and wait with a blocking waitpid.  (subprocess.run(timeout=...) polls with
    sleeps that double from 0.5 ms to 50 ms, which would round every measured time up to
    4, 8, 16, 32, 64, 114 ms...)  A watchdog thread kills the process after ``timeout``."""
    p = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    watchdog = threading.Timer(timeout, p.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        rc = p.wait()
    finally:
        watchdog.cancel()
    if rc == -signal.SIGKILL:
        raise TimeoutError(f"{argv[0]} killed after {timeout:.0f}s")
    return rc


def run_timed(cmd: Sequence[str | os.PathLike[str]], stdin_path: Path | None,
              env: dict[str, str], timeout: float = 600) -> tuple[float, float]:
    """Run to completion; returns (start, end) monotonic times.  stdout/stderr are not
    pipes (a detached delivery child must not hold the caller up), stderr goes to a file."""
    with contextlib.ExitStack() as st:
        stdin = st.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        err = st.enter_context(open(RUN / "last-stderr", "wb"))
        argv = [str(c) for c in cmd]
        t0 = time.monotonic()
        rc = _run_blocking(argv, stdin, err, env, timeout)
        t1 = time.monotonic()
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {rc}: "
                           f"{(RUN / 'last-stderr').read_text(errors='replace')[-2000:]}")
    return t0, t1


def run_rss(cmd: Sequence[str | os.PathLike[str]], stdin_path: Path | None,
            env: dict[str, str], timeout: float = 900) -> tuple[float, float]:
    """Run under GNU time (a small C parent: fork, exec, wait4); returns (wall seconds,
    peak RSS in MiB of that one process, ru_maxrss)."""
    out = RUN / "time.out"
    with contextlib.ExitStack() as st:
        stdin = st.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        err = st.enter_context(open(RUN / "last-stderr", "wb"))
        argv = [str(GNU_TIME), "-f", "%M", "-o", str(out), *map(str, cmd)]
        t0 = time.monotonic()
        rc = _run_blocking(argv, stdin, err, env, timeout)
        wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {rc}: "
                           f"{(RUN / 'last-stderr').read_text(errors='replace')[-2000:]}")
    kb = int(out.read_text().split()[-1])
    return wall, kb / 1024


@contextlib.contextmanager
def mailbox_guard(users: Sequence[str], mail_dir: str = "/var/mail") -> Iterator[
        Callable[[], None]]:
    """C dma always delivers into /var/mail: remember each user's mailbox (absent, or its
    size) and put it back after every run (yields that restore function) and at the end."""
    before: dict[str, int | None] = {}
    for u in users:
        p = os.path.join(mail_dir, u)
        before[u] = os.stat(p).st_size if os.path.exists(p) else None

    def restore() -> None:
        for u, size in before.items():
            p = os.path.join(mail_dir, u)
            if size is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            elif os.path.exists(p) and os.stat(p).st_size != size:
                os.truncate(p, size)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p + ".lock")

    try:
        yield restore
    finally:
        restore()
