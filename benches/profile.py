#!/usr/bin/env python3
"""Profiles behind the benchmark's unmet goals; run after `make bench` (it needs the venv and
smtp-sink that bench.py sets up).

    python3 benches/profile.py imports   # sendmail start-up: instructions (callgrind) per import
    python3 benches/profile.py flush     # `dma -q` of 1,000 queued messages: where the time goes

callgrind's instruction counts (Ir) are stable on a noisy shared machine, unlike wall time;
the flush breakdown uses wall time of each phase (monkeypatched timers in one process) and a
cProfile with the per-message thread pool replaced by a synchronous one, so that the SMTP
work of the worker thread shows up in the same profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402

PY = str(B.VENV_PY)

def _top_level_imports(env: dict[str, str], msg: Path) -> list[str]:
    """The modules `dma -bq` imports at top level (depth 0 of -X importtime), in order, minus
    those the bare interpreter imports anyway."""
    def mods(argv: list[str], stdin: Path | None) -> list[str]:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
            p = subprocess.run(argv, stdin=inp, capture_output=True, text=True,
                               env=dict(env, PYTHONPROFILEIMPORTTIME="1"))
        out = []
        for line in p.stderr.splitlines():
            if line.startswith("import time:") and "self [us]" not in line:
                name = line.split("|", 2)[2]
                if not name.startswith("  "):  # depth 0: one leading space only
                    out.append(name.strip())
        return out

    bare = set(mods([PY, "-c", "pass"], None))
    return [m for m in mods([str(B.OURS), "-bq", "ops@remote.test"], msg) if m not in bare]


def _ir(argv: list[str], stdin: Path | None = None, env: dict[str, str] | None = None) -> float:
    """Instructions executed (millions), by callgrind."""
    with tempfile.TemporaryDirectory() as tmp, \
            open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
        p = subprocess.run(["valgrind", "--tool=callgrind",
                            f"--callgrind-out-file={tmp}/cg.out", *argv], stdin=inp,
                           capture_output=True, text=True, env=env)
    for line in p.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1]) / 1e6
    raise RuntimeError(p.stderr[-2000:])


def imports() -> None:
    if not shutil.which("valgrind"):
        sys.exit("profile: needs valgrind (apt-get install valgrind)")
    ours = B.OursConf()
    ours.write(25)
    msg = B.small_message(1024)
    base = _ir([PY, "-S", "-c", "pass"])
    site = _ir([PY, "-c", "pass"])
    print(f"{'python -S -c pass':<44} {base:7.1f} M instructions")
    print(f"{'python -c pass (site, .pth files)':<44} {site:7.1f} M  (+{site - base:.1f})")
    prev, chain = site, "import sys"
    for mod in _top_level_imports(ours.env(), msg):
        chain += f"; import {mod}"
        ir = _ir([PY, "-c", chain], env=ours.env())
        print(f"{'  + import ' + mod:<44} {ir:7.1f} M  (+{ir - prev:.1f})")
        prev = ir
    full = _ir([str(B.OURS), "-bq", "ops@remote.test"], msg, ours.env())
    print(f"{'dma -bq (1 KB message, whole run)':<44} {full:7.1f} M  (+{full - prev:.1f} after "
          f"the imports)")
    print("(`re` at the top comes from pip's generated console script, `import re` in bin/dma)")
    print(f"\nof `dma -bq`: interpreter + site {site / full:.0%}, imports (stdlib and dma's "
          f"modules) {(prev - site) / full:.0%}, dma's submission work {(full - prev) / full:.0%}")
    ours.clear()


_PHASES = r'''
import collections, functools, sys, time
import concurrent.futures.thread as cft
from dma import cli, log as logmod, queue, route, smtp, spool
T = collections.defaultdict(float); N = collections.Counter()
def wrap(obj, name, key):
    f = getattr(obj, name)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[key] += time.perf_counter() - t; N[key] += 1
    setattr(obj, name, w)
# A queue run to one smarthost: the messages are claimed (locked, read) as the pipelined
# session asks for them (queue._claim), their replies read (Connection._reply), their ends
# concluded (queue._conclude: the unlink, or journal and bounce).
for obj, name, key in [(queue, "_claim", "  queue._claim (lock, envelope, state)"),
                       (spool.Spool, "open", "    Spool.open"),
                       (spool.Spool, "states", "    Spool.states (journal read)"),
                       (route, "plan", "    route.plan"),
                       (smtp.Connection, "_prep", "  Connection._prep (commands, body)"),
                       (smtp.Connection, "_reply", "  Connection._reply (wait + parse)"),
                       (smtp._Client, "send_raw", "  _Client.send_raw (sendall)"),
                       (smtp, "_log_attempt", "  smtp._log_attempt (log line)"),
                       (queue, "_conclude", "  queue._conclude (remove / journal)"),
                       (spool.Spool, "record", "    Spool.record (journal append)"),
                       (spool.Spool, "remove", "    Spool.remove (unlink)"),
                       (route, "resolve", "  route.resolve")]:
    wrap(obj, name, key)
submit = cft.ThreadPoolExecutor.submit
def timed_submit(self, fn, *a, **k):
    t0 = time.perf_counter()
    def run(*a2, **k2):
        T["  thread start latency"] += time.perf_counter() - t0; N["  thread start latency"] += 1
        return fn(*a2, **k2)
    return submit(self, run, *a, **k)
cft.ThreadPoolExecutor.submit = timed_submit
t0 = time.perf_counter(); c0 = time.process_time()
cli.main(["dma", "-q"])
wall = time.perf_counter() - t0
print(f"in-process dma -q: {wall:.3f} s wall, {time.process_time() - c0:.3f} s CPU")
for k in sorted(T, key=lambda k: -T[k]):
    print(f"  {k:<36} {T[k]:6.3f} s  {T[k] / N[k] * 1e3:6.3f} ms x {N[k]:5d}  "
          f"{T[k] / wall:5.1%} of wall")
'''

_CPROFILE = r'''
import cProfile, pstats
from concurrent.futures import Future
from dma import cli, queue
class SyncExecutor:
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *e): pass
    def submit(self, fn, *a, **k):
        f = Future(); f.set_result(fn(*a, **k)); return f
queue.ThreadPoolExecutor = SyncExecutor
pr = cProfile.Profile(); pr.enable(); cli.main(["dma", "-q"]); pr.disable()
st = pstats.Stats(pr); st.sort_stats("cumulative"); st.print_stats(r"dma/|socket|open|unlink", 30)
'''


def flush(count: int = 1000) -> None:
    ours = B.OursConf()
    msg = B.small_message(4096)
    snap = B.RUN / "profile-snap"
    with B.SmtpSink() as sink:
        ours.write(sink.port)
        ours.clear()
        fill = ("import dma, sys\nbody = open(sys.argv[1], 'rb').read()\n"
                "for _ in range(int(sys.argv[2])):\n"
                "    dma.send(body, recipients=['q@remote.test'], config=sys.argv[3],\n"
                "             deliver=False)\n")
        B.sh([PY, "-c", fill, msg, str(count), ours.path], env=ours.env())
        shutil.rmtree(snap, ignore_errors=True)
        B.sh(["cp", "-a", ours.spool, snap])

        def restore() -> None:
            shutil.rmtree(ours.spool)
            B.sh(["cp", "-a", snap, ours.spool])

        for _ in range(3):
            restore()
            t0, t1 = B.run_timed([B.OURS, "-q"], None, ours.env())
            print(f"dma -q, {count} messages: {t1 - t0:.3f} s")
        restore()
        subprocess.run([PY, "-c", _PHASES], env=ours.env(), check=True)
        restore()
        print("\ncProfile, thread pool replaced by a synchronous executor:")
        subprocess.run([PY, "-c", _CPROFILE], env=ours.env(), check=True)
        ours.clear()
    shutil.rmtree(snap, ignore_errors=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "imports":
        imports()
    elif what == "flush":
        flush()
    else:
        sys.exit(__doc__)
