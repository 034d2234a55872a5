"""Crash safety with real processes, real files and real signals (issue 4, "Crash safety and
bad conditions"):

* kill -9 of ``dma -bq`` submitters at random moments (start-up, reading, fsync, rename,
  after the commit), then one queue run: what exited 0 is delivered exactly once and intact,
  what failed by itself is not delivered, a killed one at most once, the mbox is clean and the
  spool holds no debris;
* kill -9 of ``dma -q`` runners during multi-recipient local deliveries (mbox and maildir),
  then a final run: nobody lost a message, each kill adds at most one extra copy;
* four concurrent ``dma -q`` runners: exactly one copy per recipient.

Every loop is bounded in count and time; every process is ended by its pid.  Figures are
printed (run with ``-s`` to see them).  ``DMA_TORTURE_TRIALS`` sets the number of submission
trials (``make torture``: 1000), ``DMA_CRASH_SEED`` replays a run (the same messages, sizes
and kill aims; the exact moments depend on the machine).  ``DMA_CRASH_CLEAR_STALE_DOTLOCKS=1``
removes mbox dotlocks left by killed runners between runs (a workaround, off by default).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from crashlib import (
    Copy,
    Tally,
    TestMessage,
    current_syscall,
    dotlocks,
    kill9,
    mailbox_copies,
    maildir_copies,
    open_files,
    pid_alive,
    spool_files,
    spool_listing,
)

from conftest import DmaSite

DMA = shutil.which("dma") or "dma"
TRIALS = int(os.environ.get("DMA_TORTURE_TRIALS", "200"))
SEED = int(os.environ.get("DMA_CRASH_SEED", str(random.SystemRandom().randrange(1 << 32))))
BATCH = 50
"""Submission trials per queue run (the mailbox of a batch is checked, then emptied)."""
WORKERS = 3
"""Submissions running at the same time."""
MAX_SIZE = 4 << 20
CLEAR_STALE_DOTLOCKS = os.environ.get("DMA_CRASH_CLEAR_STALE_DOTLOCKS") == "1"
"""Workaround switch, off by default: remove mbox dotlocks left by killed runners between
runs, to measure the rest while dma does not yet break a dead holder's dotlock."""


def _rng(salt: str) -> random.Random:
    return random.Random(f"{SEED}:{salt}")


def _say(text: str) -> None:
    print(text, flush=True)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(lo * (hi / lo) ** rng.random()))


# ------------------------------------------------------------------------------------------
# 1. kill -9 during submission


@dataclass
class Trial:
    n: int
    msg: TestMessage
    kind: str
    """ok (dma -bq root), bad-user (unknown recipient: fails before reading) or
    bad-headers (-t without recipient headers: fails after the head is read)"""
    stdin: str
    """file, pipe, or slow-pipe (written in chunks with pauses)"""
    calibrate: bool = False
    """never killed: its duration calibrates the kill delays"""
    aim: str = "never"
    """the phase the kill was aimed at (see Timing.plan)"""
    delay: float = 0.0
    rc: int | None = None
    elapsed: float = 0.0
    sent_kill: bool = False
    syscall: str = ""
    spool_open: list[str] = field(default_factory=list)
    stderr: bytes = b""
    phase: str = ""

    @property
    def killed(self) -> bool:
        return self.sent_kill and self.rc == -9


class Timing:
    """When a submitter has its spool file open (start-up is over), how long writing and
    committing take per byte, and how long it needs to exit after the commit: measured on
    calibration trials (never killed), so that the kill delays land in every phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: list[tuple[int, float, float, float]] = []
        self.t_file = 0.25
        self.base = 0.01
        self.per_byte = 1e-8
        self.teardown = 0.02

    def observe(self, size: int, t_file: float, t_commit: float, t_exit: float) -> None:
        with self.lock:
            self.samples.append((size, t_file, t_commit, t_exit))
            recent = self.samples[-12:]
            self.t_file = statistics.median(s[1] for s in recent)
            self.teardown = statistics.median(s[3] - s[2] for s in recent)
            small = [s[2] - s[1] for s in recent if s[0] < (64 << 10)]
            if small:
                self.base = statistics.median(small)
            large = [(s[2] - s[1] - self.base) / s[0] for s in recent if s[0] >= (512 << 10)]
            if large:
                self.per_byte = max(1e-10, statistics.median(large))

    def plan(self, rng: random.Random, size: int, *, slow: bool = False) -> tuple[str, float]:
        """(when, seconds): ``start`` counts from the start of the process, ``writing``
        from the moment its temp file is open, ``commit`` from the moment it has closed it
        again (renamed into queue/); ``never`` lets it finish."""
        with self.lock:
            t_file, write = self.t_file, self.base + self.per_byte * size
            if slow:
                write += (size // SLOW_CHUNK + 1) * SLOW_PAUSE * 1.3
            teardown = self.teardown
        r = rng.random()
        if r < 0.10:
            return "never", 0.0
        if r < 0.35:
            return "start", rng.uniform(0.0, 1.1 * t_file)
        if r < 0.80:
            return "writing", rng.uniform(0.0, 1.1 * write)
        return "commit", rng.uniform(0.0, 1.2 * teardown)


def _start(site: DmaSite, t: Trial, inbox: Path) -> tuple[subprocess.Popen[bytes], bytes | None]:
    if t.kind == "bad-user":
        argv, data = [DMA, "-bq", "no-such-user-crash"], t.msg.data()
    elif t.kind == "bad-headers":
        argv, data = [DMA, "-bq", "-t"], t.msg.data(to=None)
    else:
        argv, data = [DMA, "-bq", "root"], t.msg.data()
    if t.stdin in ("pipe", "slow-pipe"):
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=site.env()), data
    path = inbox / t.msg.token
    path.write_bytes(data)
    with open(path, "rb") as f:
        return subprocess.Popen(argv, stdin=f, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=site.env()), None


def _drain(proc: subprocess.Popen[bytes]) -> bytes:
    """The stderr of an ended process (its pipe closed)."""
    if proc.stderr is None:
        return b""
    with proc.stderr:
        return proc.stderr.read()


def _tmp_open(pid: int, spool: Path) -> bool:
    return bool(open_files(pid, f"{spool / 'tmp'}{os.sep}"))


def _wait(proc: subprocess.Popen[bytes], until: Callable[[], bool], limit: float) -> bool:
    """Poll every millisecond until ``until()`` (True) or the process ends (False)."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        if until():
            return True
        time.sleep(0.001)
    return False


SLOW_CHUNK = 64 << 10
SLOW_PAUSE = 0.002
"""slow-pipe input: a pause after every chunk, so that reading and writing take a while"""


def _feed(pipe: IO[bytes], data: bytes, slow: bool) -> None:
    try:
        with pipe:
            if not slow:
                pipe.write(data)
                return
            for i in range(0, len(data), SLOW_CHUNK):
                pipe.write(data[i:i + SLOW_CHUNK])
                pipe.flush()
                time.sleep(SLOW_PAUSE)
    except (BrokenPipeError, OSError, ValueError):
        pass  # killed (or failed) before reading everything


def _calibrate(site: DmaSite, t: Trial, inbox: Path, timing: Timing) -> Trial:
    """An unkilled trial, watched through /proc: when its temp file is open, when it is
    closed again (committed), when the process ends."""
    t.stdin = "file"
    proc, _ = _start(site, t, inbox)
    t0 = time.monotonic()
    try:
        opened = _wait(proc, lambda: _tmp_open(proc.pid, site.spool), 60)
        t_file = time.monotonic() - t0
        _wait(proc, lambda: not _tmp_open(proc.pid, site.spool), 60)
        t_commit = time.monotonic() - t0
        proc.wait(60)
    finally:
        kill9(proc)
        proc.wait()
    t.elapsed = time.monotonic() - t0
    t.rc = proc.returncode
    t.stderr = _drain(proc)
    if t.rc == 0 and opened:
        timing.observe(t.msg.length, t_file, t_commit, t.elapsed)
    return t


def _run_trial(site: DmaSite, t: Trial, inbox: Path, timing: Timing) -> Trial:
    if t.calibrate:
        return _calibrate(site, t, inbox, timing)
    t.aim, t.delay = timing.plan(_rng(f"delay:{t.n}"), t.msg.length,
                                 slow=t.stdin == "slow-pipe")
    proc, feed = _start(site, t, inbox)
    feeder = None
    if feed is not None and proc.stdin is not None:
        feeder = threading.Thread(target=_feed, args=(proc.stdin, feed, t.stdin == "slow-pipe"),
                                  daemon=True)
        feeder.start()
    t0 = time.monotonic()
    try:
        due = t.aim != "never"
        if t.aim in ("writing", "commit"):
            due = _wait(proc, lambda: _tmp_open(proc.pid, site.spool), 30)
        if due and t.aim == "commit":
            due = _wait(proc, lambda: not _tmp_open(proc.pid, site.spool), 30)
        if due:
            try:
                proc.wait(t.delay)
            except subprocess.TimeoutExpired:
                t.syscall = current_syscall(proc.pid)
                t.spool_open = open_files(proc.pid, f"{site.spool}{os.sep}")
                t.sent_kill = kill9(proc)
        proc.wait(60)
    finally:
        kill9(proc)  # only if something above failed
        proc.wait()
        if feeder is not None:
            feeder.join(30)
    t.elapsed = time.monotonic() - t0
    t.rc = proc.returncode
    t.stderr = _drain(proc)
    return t


def _post_mortem(site: DmaSite, batch: Sequence[Trial]) -> tuple[set[str], int]:
    """Where each killed submission stopped, judged from what it left in the spool.  Returns
    the tokens committed to queue/ and the number of temp files no trial can be matched to."""
    queued = {f.token for f in spool_files(site.spool, "queue") if f.token}
    tmp = spool_files(site.spool, "tmp")
    tmp_by_token = {f.token: f for f in tmp if f.token}
    tmp_by_name = {f.name: f for f in tmp}
    matched: set[str] = set()
    for t in batch:
        tok = t.msg.token
        if t.rc == 0:
            t.phase = "exited 0"
        elif not t.killed:
            t.phase = f"exited {t.rc} by itself" if t.rc is not None and t.rc > 0 \
                else f"ended with {t.rc}"
        if tok in queued:
            if t.killed:
                t.phase = "killed after commit (queued)"
            continue
        f = tmp_by_token.get(tok)
        if f is None:
            for p in t.spool_open:
                rel = os.path.relpath(p, site.spool)
                f = tmp_by_name.get(os.path.basename(rel)) if rel.startswith("tmp/") else None
                if f is not None:
                    break
        if f is not None:
            matched.add(f.name)
        if not t.killed:
            continue
        if f is None:
            t.phase = "killed in start-up (no spool file)" if not t.spool_open \
                else "killed: spool file vanished"
        elif f.footer:
            t.phase = "killed before rename (tmp complete: fsync/rename)"
        elif f.size:
            t.phase = "killed while reading/writing (tmp partly written)"
        else:
            t.phase = "killed after creating tmp (empty)"
    return queued, len([f for f in tmp if f.name not in matched])


def test_kill9_during_submission(site: DmaSite) -> None:
    """Each submitter is killed at a random moment or left alone; after one queue run per
    batch: exit 0 = delivered exactly once and intact; failed by itself = not delivered;
    killed = delivered once (intact) if and only if it had been committed; a clean mbox;
    no debris in the spool."""
    rng = _rng("submission")
    timing = Timing()
    inbox = site.root / "in"
    inbox.mkdir()
    problems: list[str] = []
    debris: list[str] = []
    phases: Counter[str] = Counter()
    syscalls: Counter[str] = Counter()
    by_input: Counter[str] = Counter()
    unmatched_tmp = 0
    duplicates = 0
    run_times: list[float] = []
    started = time.monotonic()
    trials_done: list[Trial] = []
    for b0 in range(0, TRIALS, BATCH):
        batch: list[Trial] = []
        for n in range(b0, min(TRIALS, b0 + BATCH)):
            stdin = rng.choice(("file", "pipe", "slow-pipe"))
            # From a few bytes to a few MB; the slow-pipe ones large enough to be caught
            # while they read and write.
            size = _log_uniform(rng, 256 << 10 if stdin == "slow-pipe" else 4, MAX_SIZE)
            calibrate = n - b0 < (6 if b0 == 0 else 2)
            if calibrate:  # small and large ones, never killed
                size = (8, MAX_SIZE, 300, MAX_SIZE // 2, 40, 1 << 20)[n - b0]
            r = rng.random()
            kind = "bad-user" if r < 0.04 else "bad-headers" if r < 0.10 else "ok"
            msg = TestMessage.create(f"{SEED:08x}-{n:05d}-{rng.randrange(1 << 32):08x}",
                                     rng.randrange(1 << 62), size)
            batch.append(Trial(n, msg, "ok" if calibrate else kind, stdin, calibrate=calibrate))
        with ThreadPoolExecutor(WORKERS) as pool:
            calibration = [t for t in batch if t.calibrate]
            list(pool.map(lambda t: _run_trial(site, t, inbox, timing), calibration))
            rest = [t for t in batch if not t.calibrate]
            list(pool.map(lambda t: _run_trial(site, t, inbox, timing), rest))
        for f in inbox.iterdir():
            f.unlink()
        queued, unmatched = _post_mortem(site, batch)
        unmatched_tmp += unmatched
        known = {t.msg.token: t.msg for t in batch}

        t0 = time.monotonic()
        run = site.run("-q", timeout=180)
        run_times.append(time.monotonic() - t0)
        if run.returncode != 0:
            problems.append(f"batch {b0}: dma -q exited {run.returncode}: {run.stderr!r}")

        copies, framing = mailbox_copies(site.mailbox("root"), known)
        problems += framing
        tally = Tally()
        tally.add(copies)
        for c in tally.others:
            problems.append(f"{c.where}: {c.status} message in the mailbox "
                            f"(token {c.token}, head {c.head[:80]!r})")
        for t in batch:
            tok = t.msg.token
            phases[t.phase] += 1
            if t.killed:
                syscalls[f"{t.phase}: {t.syscall}"] += 1
                by_input[f"{t.stdin}: {t.phase}"] += 1
            intact = tally.count(tok)
            damaged = {s: n for s, n in tally.by_token.get(tok, Counter()).items()
                       if s != "intact"}
            duplicates += max(0, intact - 1)
            what = f"trial {t.n} ({t.kind}, {t.stdin}, {t.msg.length} bytes, rc {t.rc}, " \
                   f"{t.phase}, token {tok})"
            if damaged:
                problems.append(f"{what}: damaged copies in the mailbox: {damaged}")
            if t.rc == 0:
                if t.kind != "ok":
                    problems.append(f"{what}: a submission that must fail exited 0")
                elif tok not in queued:
                    problems.append(f"{what}: exited 0 but was not in queue/ before the run")
                if intact != 1:
                    problems.append(f"{what}: exited 0, delivered {intact} times (want 1)")
            elif t.rc is not None and t.rc > 0:
                if t.kind == "ok":
                    problems.append(f"{what}: failed by itself: {t.stderr[-300:]!r}")
                if intact or tok in queued:
                    problems.append(f"{what}: failed by itself but was queued/delivered "
                                    f"({intact} copies)")
            elif t.killed:
                want = 1 if tok in queued else 0
                if intact != want:
                    problems.append(f"{what}: killed, {'committed' if want else 'not committed'}"
                                    f", delivered {intact} times (want {want})")
            else:
                problems.append(f"{what}: ended unexpectedly: {t.stderr[-300:]!r}")

        left = spool_listing(site.spool)
        for d in ("queue", "journal", "hold"):
            if left[d]:
                problems.append(f"batch {b0}: after the queue run {d}/ still holds {left[d]}")
        if left["tmp"]:
            debris += [f"batch {b0}: tmp/{n}" for n in left["tmp"]]
            for name in left["tmp"]:  # recorded; removed so the next batch starts clean
                (site.spool / "tmp" / name).unlink(missing_ok=True)
        if site.mailbox("root").exists():
            site.mailbox("root").unlink()
        trials_done += batch

    total = time.monotonic() - started
    killed = [t for t in trials_done if t.killed]
    _say(f"\n== kill -9 during submission: {len(trials_done)} trials, seed {SEED}, "
         f"{total:.1f} s (queue runs {sum(run_times):.1f} s)")
    _say(f"   calibration: temp file open after {timing.t_file * 1000:.0f} ms, commit "
         f"{timing.base * 1000:.0f} ms + {timing.per_byte * 1e9:.1f} ms/MB later, exit "
         f"{timing.teardown * 1000:.0f} ms after that")
    for phase, n in sorted(phases.items(), key=lambda kv: -kv[1]):
        _say(f"   {n:5d}  {phase}")
    _say(f"   killed: {len(killed)}; delivered after commit: "
         f"{sum(1 for t in killed if t.phase.startswith('killed after commit'))}; "
         f"duplicates: {duplicates}; unmatched tmp files: {unmatched_tmp}; "
         f"tmp debris after queue runs: {len(debris)}")
    _say("   by input: " + ", ".join(f"{k} x{n}" for k, n in sorted(by_input.items())))
    _say("   system call at the moment of the kill: " + ", ".join(
        f"{k} x{n}" for k, n in sorted(syscalls.items(), key=lambda kv: -kv[1])))

    assert not problems, f"{len(problems)} problems (seed {SEED}):\n" + "\n".join(problems[:40])
    if TRIALS >= 100:
        for needed in ("exited 0", "killed in start-up (no spool file)",
                       "killed while reading/writing (tmp partly written)",
                       "killed after commit (queued)"):
            assert phases[needed], f"no trial ended as {needed!r}: {dict(phases)}"
    # KNOWN PRODUCT GAP (the only assertion that fails before the lead's change lands):
    # Spool.clean_debris removes tmp/ files only once they are an hour old; a queue run must
    # remove every temp file whose writer is dead (the writer holds a flock on it).
    assert not debris, (f"KNOWN GAP (clean_debris keeps temp files of dead writers for an "
                        f"hour): {len(debris)} temp files survived the queue runs: "
                        f"{debris[:10]}")


# ------------------------------------------------------------------------------------------
# 2. kill -9 during delivery

USERS = ("root", "daemon", "nobody", "bin", "mail")
ALIASES = "team: root, daemon, nobody\nops: daemon, bin\neveryone: team, ops, mail\n"
DELIVERY_MESSAGES = 60
MAX_KILLS = 50
KILL_LOOP_SECONDS = 40.0
STALL_LIMIT = 3.0
FINAL_RUN_TIMEOUT = 30.0
"""Below local.LOCK_TIMEOUT (60 s): a run after a crash must not wait on a dead lock."""


def _queue(site: DmaSite, msgs: Sequence[TestMessage], args: Sequence[str]) -> None:
    inbox = site.root / "in"
    inbox.mkdir(exist_ok=True)

    def one(m: TestMessage) -> None:
        p = inbox / m.token
        p.write_bytes(m.data(to=", ".join(args)))
        with open(p, "rb") as f:
            r = site.run("-bq", *args, stdin=f.fileno(), timeout=60)
        p.unlink()
        assert r.returncode == 0, r.stderr

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, msgs))


@dataclass
class KillLog:
    kills: int = 0
    finished_runs: int = 0
    in_mailbox: Counter[str] = field(default_factory=Counter)
    """what each kill interrupted: the mailbox file it had open, or the system call"""
    stale_locks: list[str] = field(default_factory=list)
    seen_locks: set[tuple[str, int, int]] = field(default_factory=set)
    cleared_locks: int = 0
    stalls: list[str] = field(default_factory=list)
    """runs that made no progress (opened no mailbox) for STALL_LIMIT seconds"""


def _in_flight(files: Sequence[str], mail: Path) -> str:
    """What a runner had open in the mail directory: ``mbox root``, ``maildir bin/tmp file``
    (writing), ``maildir bin dirs`` (before the file exists, or linking it into new/)."""
    rels = [Path(os.path.relpath(f, mail)) for f in files]
    labels = set()
    for r in rels:
        if len(r.parts) == 1 and r.name.endswith(".lock"):
            labels.add(f"dotlock {r}")
        elif len(r.parts) == 1 and (mail / r).is_file():
            labels.add(f"mbox {r}")
        elif len(r.parts) == 3:
            labels.add(f"maildir {r.parts[0]}/{r.parts[1]} file")
    if not labels:
        labels = {f"maildir {r.parts[0]} dirs" for r in rels}
    return ",".join(sorted(labels))


def _has_open(pid: int, prefix: str) -> Callable[[], bool]:
    return lambda: bool(open_files(pid, prefix))


def _kill_runners(site: DmaSite, rng: random.Random, log: KillLog) -> None:
    """``dma -q`` killed again and again (bounded in kills and time) until the queue is
    empty: a fifth of the kills at a random moment of start-up, the others a random few
    milliseconds after the runner has opened something in the mail directory (in the middle
    of a delivery)."""
    deadline = time.monotonic() + KILL_LOOP_SECONDS
    mail_prefix = f"{site.mail}{os.sep}"
    while log.kills < MAX_KILLS and time.monotonic() < deadline and site.queue_ids():
        proc = subprocess.Popen([DMA, "-q"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=site.env())
        try:
            if rng.random() < 0.2:
                delay = rng.uniform(0.0, 0.3)
            elif _wait(proc, _has_open(proc.pid, mail_prefix), STALL_LIMIT):
                delay = rng.uniform(0.0, 0.01)
            elif proc.poll() is None:
                log.stalls.append(f"run {proc.pid} opened no mailbox in {STALL_LIMIT:.0f} s; "
                                  f"dotlocks: {_describe_locks(site)}")
                delay = 0.0
            else:
                delay = 0.0
            try:
                proc.wait(timeout=delay)
                log.finished_runs += 1
            except subprocess.TimeoutExpired:
                files = open_files(proc.pid, mail_prefix)
                call = current_syscall(proc.pid)
                if kill9(proc):
                    log.kills += 1
                    log.in_mailbox[_in_flight(files, site.mail) or
                                   f"nothing open ({call})"] += 1
        finally:
            kill9(proc)
            proc.wait()
        for name, holder in dotlocks(site.mail).items():
            # Empty: killed between creating the lock (O_EXCL) and writing its pid into it.
            if holder not in (str(proc.pid), ""):
                continue
            try:
                st = (site.mail / name).stat()
            except FileNotFoundError:
                continue
            if (name, st.st_ino, st.st_mtime_ns) not in log.seen_locks:
                log.seen_locks.add((name, st.st_ino, st.st_mtime_ns))
                log.stale_locks.append(f"{name} ({f'pid {holder}' if holder else 'empty'})")
                if CLEAR_STALE_DOTLOCKS:
                    (site.mail / name).unlink(missing_ok=True)
                    log.cleared_locks += 1
        if len(log.stalls) >= 2:
            break  # no progress: the final run shows why


def _describe_locks(site: DmaSite) -> dict[str, str]:
    return {n: (f"pid {p} {'alive' if pid_alive(int(p)) else 'dead'}" if p.isdigit()
                else f"no pid in it ({p!r})")
            for n, p in dotlocks(site.mail).items()}


def _final_run(site: DmaSite, timeout: float = FINAL_RUN_TIMEOUT) -> str:
    """The last queue run, bounded; returns a problem description or ''."""
    try:
        r = site.run("-q", timeout=timeout)
    except subprocess.TimeoutExpired:
        return (f"the final dma -q did not finish within {timeout:.0f} s; dotlocks "
                f"in the mail directory: {_describe_locks(site)} (a dotlock of a killed runner "
                f"blocks delivery for LOCK_TIMEOUT, and is broken only after STALE_LOCK_AGE)")
    if r.returncode != 0:
        return f"the final dma -q exited {r.returncode}: {r.stderr!r}"
    return ""


def _check_after_kills(site: DmaSite, msgs: Sequence[TestMessage], log: KillLog,
                       copies_of: dict[str, list[Copy]], problems: list[str]) -> Counter[str]:
    """Every (message, user) has an intact copy; the extra copies (duplicates and cut
    copies) are at most one per kill; the spool is empty."""
    figures: Counter[str] = Counter()
    extras = 0
    queued = {f.token for f in spool_files(site.spool, "queue") if f.token}
    missing: list[str] = []
    for user in USERS:
        tally = Tally()
        tally.add(copies_of[user])
        for c in tally.others:
            figures[f"{c.status} (no token)"] += 1
            figures[f"extra for {user}"] += 1
            extras += 1
        for m in msgs:
            got = tally.by_token.get(m.token, Counter())
            if got["intact"] < 1:
                state = "still queued" if m.token in queued else "LOST"
                missing.append(f"{state}: {user} has no intact copy of {m.token} {dict(got)}")
            if got["garbled"]:
                problems.append(f"{user}: garbled copy of {m.token} ({dict(got)})")
            figures["duplicate"] += max(0, got["intact"] - 1)
            figures["truncated"] += got["truncated"]
            extra = max(0, got["intact"] - 1) + got["truncated"] + got["garbled"]
            figures[f"extra for {user}"] += extra
            extras += extra
    if missing:
        lost = sum(1 for x in missing if x.startswith("LOST"))
        problems.append(f"{len(missing)} (message, user) pairs without an intact copy, {lost} "
                        f"of them lost, the others still queued; e.g. {missing[:3]}")
    if extras > log.kills:
        problems.append(f"{extras} extra copies for {log.kills} kills (at most one per kill)")
    problems += [f"stalled: {s}" for s in log.stalls]
    left = spool_listing(site.spool)
    for d, names in left.items():
        if names:
            problems.append(f"spool {d}/ not empty at the end: {names}")
    return figures


def _delivery_setup(site: DmaSite, salt: str, extra_conf: str = "") -> list[TestMessage]:
    site.aliases.write_text(site.aliases.read_text() + ALIASES)
    site.write_conf(extra_conf)
    rng = _rng(salt)
    msgs = [TestMessage.create(f"{SEED:08x}-{salt}-{i:03d}", rng.randrange(1 << 62),
                               _log_uniform(rng, 2000, 3 << 20))
            for i in range(DELIVERY_MESSAGES)]
    # 'everyone', 'team' and 'ops' fan out to the same users: each is a recipient once.
    _queue(site, msgs, ["everyone", "root", "ops"])
    return msgs


def _describe_cut(c: Copy) -> str:
    where = "in the header" if not c.head_complete else "in the body"
    return f"{c.where}: {c.length} of {c.expected} body bytes, cut {where}"


def test_kill9_during_mbox_delivery(site: DmaSite) -> None:
    """Messages to five local users (three aliases fanning out to the same users), runners
    killed mid-delivery, then a final run: every user has every message intact; no cut
    copy survives (a killed append leaves its start offset in the dotlock and the next
    delivery removes what it wrote); the duplicates (a kill after the dotlock was released
    but before the journal line) number at most one per kill; the mailboxes stay
    well-framed; the spool ends empty."""
    msgs = _delivery_setup(site, "mbox")
    rng = _rng("kill-mbox")
    log = KillLog()
    started = time.monotonic()
    _kill_runners(site, rng, log)
    problems: list[str] = []
    if problem := _final_run(site):
        problems.append(problem)
    known = {m.token: m for m in msgs}
    copies_of: dict[str, list[Copy]] = {}
    framing: list[str] = []
    for user in USERS:
        copies_of[user], f = mailbox_copies(site.mailbox(user), known)
        framing += f
    problems += framing  # a cut copy is followed by a separator: the framing stays valid
    figures = _check_after_kills(site, msgs, log, copies_of, problems)
    cuts = [c for u in USERS for c in copies_of[u] if c.status in ("truncated", "fragment")]
    _say(f"\n== kill -9 during mbox delivery: {len(msgs)} messages x {len(USERS)} users, "
         f"{log.kills} kills, {log.finished_runs} runs finished before their kill, "
         f"{time.monotonic() - started:.1f} s")
    _say(f"   at the kill: {dict(log.in_mailbox)}")
    empty = sum(1 for x in log.stale_locks if x.endswith("(empty)"))
    _say(f"   extra copies: {dict(figures)}; stale dotlocks left by kills: "
         f"{len(log.stale_locks)} ({empty} of them empty) {log.stale_locks[:5]}"
         + (f" (cleared by the test: {log.cleared_locks})" if CLEAR_STALE_DOTLOCKS else ""))
    for c in cuts[:10]:
        _say(f"   cut copy {_describe_cut(c)}")
    problems += [f"cut copy left in a mailbox: {_describe_cut(c)}" for c in cuts]
    assert not problems, f"{len(problems)} problems (seed {SEED}):\n" + "\n".join(problems[:40])


def test_kill9_during_maildir_delivery(site: DmaSite) -> None:
    """The same with MAILBOXFORMAT maildir: as above, and no partial file ever in new/
    (a kill leaves at most a file in tmp/)."""
    msgs = _delivery_setup(site, "maildir", "MAILBOXFORMAT maildir\n")
    rng = _rng("kill-maildir")
    log = KillLog()
    started = time.monotonic()
    _kill_runners(site, rng, log)
    problems: list[str] = []
    if problem := _final_run(site):
        problems.append(problem)
    known = {m.token: m for m in msgs}
    copies_of: dict[str, list[Copy]] = {}
    tmp_left = 0
    for user in USERS:
        copies, framing, tmp = maildir_copies(site.mail / user, known)
        copies_of[user] = copies
        problems += framing
        tmp_left += len(tmp)
        for c in copies:
            if c.status != "intact":
                problems.append(f"partial file in new/: {c.where} ({c.status}, "
                                f"{c.length} of {c.expected} body bytes)")
    figures = _check_after_kills(site, msgs, log, copies_of, problems)
    _say(f"\n== kill -9 during maildir delivery: {len(msgs)} messages x {len(USERS)} users, "
         f"{log.kills} kills, {log.finished_runs} runs finished, "
         f"{time.monotonic() - started:.1f} s")
    _say(f"   at the kill: {dict(log.in_mailbox)}")
    _say(f"   extra copies: {dict(figures)}; files left in maildir tmp/: {tmp_left}")
    assert not problems, f"{len(problems)} problems (seed {SEED}):\n" + "\n".join(problems[:40])


def test_dotlock_of_killed_runner_does_not_block_delivery(site: DmaSite) -> None:
    """A runner killed while it holds ``root.lock`` leaves the dotlock with its (dead) pid in
    it; the next run must not wait LOCK_TIMEOUT and defer because of it (dotlockfile -p
    semantics: a lock whose pid is gone is stale)."""
    msg = TestMessage.create(f"{SEED:08x}-dotlock", 7, 2 << 20)
    _queue(site, [msg], ["root"])
    lock = site.mail / "root.lock"
    holder = None
    for _attempt in range(5):  # bounded: catch the runner while it holds the lock
        proc = subprocess.Popen([DMA, "-q"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=site.env())
        try:
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                if lock.exists():
                    kill9(proc)
                    holder = proc.pid
                    break
                time.sleep(0.0005)
        finally:
            kill9(proc)
            proc.wait()
        if holder is not None and lock.exists():
            break
        holder = None
        if not site.queue_ids():
            break
    if holder is None:
        pytest.skip("could not kill the runner while it held the dotlock")
    assert lock.read_text().split()[0] == str(holder), "the dotlock names the killed runner"
    t0 = time.monotonic()
    problem = _final_run(site, 15.0)  # a healthy run takes well under a second
    took = time.monotonic() - t0
    copies, framing = mailbox_copies(site.mailbox("root"), {msg.token: msg})
    assert not framing, framing
    statuses = Counter(c.status for c in copies)
    _say(f"\n== dotlock of a killed runner: next run took {took:.1f} s, copies {dict(statuses)}")
    assert not problem, problem
    assert statuses["intact"] == 1, statuses
    assert not site.queue_ids()


# ------------------------------------------------------------------------------------------
# 3. concurrent runners

CONCURRENT_MESSAGES = 500
RUNNERS = 4
RUNNERS_TIMEOUT = 120.0

_QUEUE_MANY = """
import sys
import dma
conf, paths = sys.argv[1], sys.argv[2:]
cfg = dma.load_config(conf)
for p in paths:
    with open(p, "rb") as f:
        dma.send(f.read(), ["root", "daemon", "nobody"], config=cfg, deliver=False)
"""


def test_concurrent_runners_deliver_exactly_once(site: DmaSite) -> None:
    import sys

    rng = _rng("concurrent")
    msgs = [TestMessage.create(f"{SEED:08x}-conc-{i:04d}", rng.randrange(1 << 62),
                               _log_uniform(rng, 100, 64 << 10))
            for i in range(CONCURRENT_MESSAGES)]
    inbox = site.root / "in"
    inbox.mkdir()
    paths = []
    for m in msgs:
        path = inbox / m.token
        path.write_bytes(m.data(to="root, daemon, nobody"))
        paths.append(str(path))
    # One process queues them all (the submission code of dma -bq, without 500 start-ups).
    r = subprocess.run([sys.executable, "-c", _QUEUE_MANY, str(site.conf), *paths],
                       capture_output=True, timeout=120, env=site.env())
    assert r.returncode == 0, r.stderr
    assert len(site.queue_ids()) == CONCURRENT_MESSAGES

    t0 = time.monotonic()
    procs = [subprocess.Popen([DMA, "-q"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=site.env()) for _ in range(RUNNERS)]
    problems: list[str] = []
    try:
        for proc in procs:
            remaining = max(0.1, t0 + RUNNERS_TIMEOUT - time.monotonic())
            try:
                _, err = proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                problems.append(f"runner {proc.pid} still running after "
                                f"{RUNNERS_TIMEOUT:.0f} s")
                continue
            if proc.returncode != 0:
                problems.append(f"runner {proc.pid} exited {proc.returncode}: {err!r}")
    finally:
        for proc in procs:
            kill9(proc)
            proc.communicate()
    took = time.monotonic() - t0

    known = {m.token: m for m in msgs}
    for user in ("root", "daemon", "nobody"):
        copies, framing = mailbox_copies(site.mailbox(user), known)
        problems += framing
        tally = Tally()
        tally.add(copies)
        problems += [f"{user}: {c.status} message {c.where}" for c in tally.others]
        for m in msgs:
            got = tally.by_token.get(m.token, Counter())
            if got != Counter(intact=1):
                problems.append(f"{user}: {m.token}: {dict(got)} (want exactly one intact)")
    leftover = spool_listing(site.spool)
    problems += [f"spool {d}/ not empty: {n[:5]}" for d, n in leftover.items() if n]
    per_runner: Counter[str] = Counter()
    deferred = 0
    logfile = site.root / "dma.log"
    if logfile.exists():
        for line in logfile.read_text(errors="replace").splitlines():
            if "status=delivered" in line:
                per_runner[line.split("dma[", 1)[-1].split("]", 1)[0]] += 1
            elif "status=deferred" in line:
                deferred += 1
    _say(f"\n== {RUNNERS} concurrent runners, {len(msgs)} messages x 3 recipients: "
         f"{took:.1f} s; deliveries per runner {sorted(per_runner.values(), reverse=True)}; "
         f"deferred {deferred}")
    assert not problems, f"{len(problems)} problems (seed {SEED}):\n" + "\n".join(problems[:40])
