#!/usr/bin/env python3
"""dma against C dma (Debian's dma package) and the machine's raw limits, side by side.

    make bench                      # setup + every case (full matrix, < 30 min)
    python3 benches/bench.py --quick
    python3 benches/bench.py --cases 2,4 --runs 7

Each case alternates ours and C dma (which one goes first alternates too), one warm-up
then --runs measured runs, and prints min / median / max and the ratio C dma / ours of the
medians.  Results go to benches/results.json (cases not run keep their previous entry) and
the tables to benches/results.md.  Machines are shared and noisy: the ratios from one run
are the figures that count.

Ours is the `dma` of benches/build/venv (a clean venv, `pip install .` = maturin release
wheel), pointed at its own config with DMA_CONF.  C dma reads only /etc/dma/dma.conf: the
bench writes its settings there and restores the original file when it ends.  The SMTP
sinks: case 2 (large messages end to end) and the raw loopback copies of case 6 use
fastsink (benches/fastsink.py, a selector-loop sink of our own in its own process, reading
at about the loopback copy rate); the other cases, and a reference row of case 2, use
Postfix's smtp-sink (unpacked from Debian's postfix package with dpkg -x, nothing
installed), which reads DATA at only 200-350 MB/s.  Byte-exactness is checked separately by
a Python sink that hashes what it gets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402
from benchlib import CDMA, OURS, RUN, MiB, log, stats  # noqa: E402

RESULTS = B.BENCH / "results.json"
RESULTS_MD = B.BENCH / "results.md"
LOCAL_USERS = ("root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news")
FULL_SIZES = (1, 10, 70, 100)
FULL_RCPTS = (1, 2, 10, 50)
QUICK_CELLS = ((1, 1), (10, 10), (70, 2), (100, 50))

Json = dict[str, Any]


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs: int = args.runs
        self.quick: bool = args.quick
        self.ours = B.OursConf()
        self.cdma = B.CdmaConf()

    def order(self, i: int) -> tuple[str, str]:
        return ("ours", "c") if i % 2 == 0 else ("c", "ours")

    def quiet(self, timeout: float = 30) -> None:
        """Wait until every process this run started has exited (detached deliveries)."""
        B.wait_until(lambda: not B.marked_pids(), timeout, "detached deliveries to exit", 0.01)

    def reset(self) -> None:
        B.stop_marked()
        self.ours.clear()
        self.cdma.clear()


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def row(name: str, s: Json, unit: Callable[[float], str] = ms) -> str:
    return (f"  {name:<34} min {unit(s['min']):>10}  median {unit(s['median']):>10}  "
            f"max {unit(s['max']):>10}")


def header(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


# -- case 1: submit latency ---------------------------------------------------------------


def case_latency(ctx: Ctx) -> Json:
    header("1. submit latency, 1 KB message (until sendmail returns)")
    runs = max(ctx.runs, 10 if ctx.quick else 20)
    msg = B.small_message(1024)
    with B.SmtpSink() as sink:
        ctx.ours.write(sink.port)
        ctx.cdma.write(sink.port)
        oenv, cenv = ctx.ours.env(), B.bench_env()
        rcpt = "ops@remote.test"
        variants: dict[str, Callable[[], float]] = {}

        def timed(cmd: list[Any], env: dict[str, str], stdin: Path | None = msg,
                  after: Callable[[], None] | None = None) -> Callable[[], float]:
            def run() -> float:
                t0, t1 = B.run_timed(cmd, stdin, env)
                if after:
                    after()
                return t1 - t0
            return run

        def drained(pending: Callable[[], int]) -> Callable[[], None]:
            def wait() -> None:
                B.wait_until(lambda: pending() == 0, 30, "the delivery to finish")
                ctx.quiet()
                sink.settle(1)
            return wait

        variants["floor: /bin/true"] = timed(["/bin/true"], B.bench_env(), None)
        variants["floor: venv python -c pass"] = timed([B.VENV_PY, "-c", "pass"],
                                                       B.bench_env(), None)
        variants["ours -bq"] = timed([OURS, "-bq", rcpt], oenv, after=ctx.ours.clear)
        variants["C dma -bq"] = timed([CDMA, "-bq", rcpt], cenv, after=ctx.cdma.clear)
        variants["ours default"] = timed([OURS, rcpt], oenv, after=drained(ctx.ours.pending))
        variants["C dma default"] = timed([CDMA, rcpt], cenv, after=drained(ctx.cdma.pending))
        times: dict[str, list[float]] = {k: [] for k in variants}
        base = sink.counts()[1]
        pairs = [("ours -bq", "C dma -bq"), ("ours default", "C dma default")]
        for i in range(3 + runs):
            names = ["floor: /bin/true", "floor: venv python -c pass"]
            for pair in pairs:
                names += pair if i % 2 == 0 else pair[::-1]
            for name in names:
                t = variants[name]()
                if i >= 3:
                    times[name].append(t)
        delivered = sink.counts()[1] - base
    ctx.reset()
    out: Json = {k: stats(v) for k, v in times.items()}
    for mode in ("-bq", "default"):
        out[f"ratio {mode}"] = B.ratio(out[f"C dma {mode}"], out[f"ours {mode}"])
    out["default-mode deliveries seen by the sink"] = delivered
    out["expected deliveries"] = 2 * (3 + runs)
    for k in times:
        print(row(k, out[k]))
    print(f"  ratio C dma / ours: -bq {out['ratio -bq']:.2f}, default {out['ratio default']:.2f}"
          f"   (sink got {delivered} of {2 * (3 + runs)} default-mode messages)")
    out["importtime"] = import_profile(ctx, msg)
    print("  ours -bq imports (python -X importtime, cumulative, top level):")
    for mod, us in out["importtime"]["top_cumulative"][:8]:
        print(f"    {us / 1000:7.1f} ms  {mod}")
    return out


def import_profile(ctx: Ctx, msg: Path) -> Json:
    """`python -X importtime` of the real `dma -bq` run (PYTHONPROFILEIMPORTTIME=1)."""
    ctx.ours.write(25)
    samples: list[list[tuple[str, int, int, int]]] = []
    for _ in range(5):
        with open(msg, "rb") as f:
            p = subprocess.run([str(OURS), "-bq", "ops@remote.test"], stdin=f,
                               capture_output=True,
                               env=dict(ctx.ours.env(), PYTHONPROFILEIMPORTTIME="1"))
        rows = []
        for line in p.stderr.decode(errors="replace").splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum, name = line[len("import time:"):].split("|", 2)
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            rows.append((name.strip(), int(self_us), int(cum), depth))
        samples.append(rows)
    ctx.ours.clear()
    best = min(samples, key=lambda r: sum(x[1] for x in r))
    top = sorted(((n, c) for n, s, c, d in best if d == 0), key=lambda x: -x[1])
    by_self = sorted(((n, s) for n, s, c, d in best), key=lambda x: -x[1])
    return {"total_ms": sum(x[1] for x in best) / 1000, "top_cumulative": top[:15],
            "top_self": by_self[:15],
            "note": "fastest of 5 runs; microseconds; depth-0 modules are what dma.cli pulls in"}


# -- case 2: large attachment end to end ----------------------------------------------------


def e2e(ctx: Ctx, who: str, sinks: Sequence[B.SmtpSink], expect: Sequence[int], msg: Path,
        rcpts: Sequence[str], timeout: float) -> Json:
    """Submit in default mode; the run ends when every sink has its expected number of
    messages (and the spool is empty).  Returns total, submit and delivery times."""
    bases = [s.settle() for s in sinks]
    cmd, env, pending = ((OURS, ctx.ours.env(), ctx.ours.pending) if who == "ours"
                         else (CDMA, B.bench_env(), ctx.cdma.pending))
    t0, t_sub = B.run_timed([cmd, *rcpts], msg, env, timeout=timeout)
    t_last = max(s.wait_mesg(b + n, timeout) for s, b, n in zip(sinks, bases, expect,
                                                                    strict=True))
    B.wait_until(lambda: pending() == 0, 60, f"{who}'s spool to empty")
    ctx.quiet()
    time.sleep(0.05)
    got = [s.counts()[1] - b for s, b in zip(sinks, bases, strict=True)]
    if got != list(expect):
        raise RuntimeError(f"{who}: sinks received {got} messages, expected {list(expect)}")
    for s, n in zip(sinks, expect, strict=True):
        s.settle(n)
    return {"total": t_last - t0, "submit": t_sub - t0, "delivery": t_last - t_sub}


def measure_pair(ctx: Ctx, label: str, fns: dict[str, Callable[[], Json]],
                 raw: Callable[[], float] | None, warmup: bool = True) -> Json:
    """A warm-up + ctx.runs alternating runs of ours/C (and the raw limit after each pair).
    ``warmup=False`` for the cells where one C dma run takes most of a minute: the cell
    before them has warmed the page cache, the sink and both programs."""
    res: dict[str, list[Json]] = {k: [] for k in fns}
    raws: list[float] = []
    first = 0 if warmup else 1
    for i in range(first, 1 + ctx.runs):
        order = [k for k in ctx.order(i) if k in fns]
        for who in order:
            r = fns[who]()
            if i:
                res[who].append(r)
        if raw is not None:
            t = raw()
            if i:
                raws.append(t)
    out: Json = {"case": label, "warmup": warmup}
    for who, rs in res.items():
        out[who] = {k: stats([r[k] for r in rs]) for k in rs[0]}
    if raws:
        out["raw_tcp"] = stats(raws)
    if "ours" in out and "c" in out:
        out["ratio_total"] = B.ratio(out["c"]["total"], out["ours"]["total"])
        if "delivery" in out["ours"]:
            out["ratio_delivery"] = B.ratio(out["c"]["delivery"], out["ours"]["delivery"])
    return out


def raw_counted(sink: B.SmtpSink, send: Callable[[], float], count: int = 1) -> float:
    t = send()
    sink.settle(count)
    return t


def print_cell(c: Json) -> None:
    def med(x: Json) -> str:
        return ms(x["median"])

    line = f"  {c['case']:<24}"
    if "ours" in c:
        o = c["ours"]
        line += (f" ours {med(o['total']):>9} [{ms(o['total']['min'])}-{ms(o['total']['max'])}]"
                 f" (submit {med(o['submit'])}, deliver {med(o['delivery'])})")
    if "c" in c:
        line += f" | C {med(c['c']['total']):>9} [{ms(c['c']['total']['min'])}-" \
                f"{ms(c['c']['total']['max'])}]"
    if "raw_tcp" in c:
        line += f" | raw tcp {med(c['raw_tcp'])}"
    if "ratio_total" in c:
        line += f" | C/ours {c['ratio_total']:.1f}x"
    if "error" in c:
        line += f" | ERROR {c['error']}"
    print(line, flush=True)


def large_cell(ctx: Ctx, sink: B.SmtpSink, size_mb: int, n: int, label: str) -> Json:
    """One end-to-end cell: ours and C dma relay through ``sink`` (both configs point at
    it), the raw loopback copy beside them goes into the same sink."""
    ctx.ours.write(sink.port)
    ctx.cdma.write(sink.port)
    msg = B.message_path(size_mb * MiB)
    wire = B.wire_path(msg)
    rcpts = [f"user{i}@remote{i % 7}.test" for i in range(n)]
    timeout = max(120.0, size_mb * n * 0.6)
    try:
        cell = measure_pair(ctx, label, {
            "ours": lambda: e2e(ctx, "ours", [sink], [1], msg, rcpts, timeout),
            "c": lambda: e2e(ctx, "c", [sink], [n], msg, rcpts, timeout),
        }, lambda: raw_counted(sink, lambda: B.raw_smtp("127.0.0.1", sink.port, wire, rcpts)),
            warmup=size_mb * n < 3500)
    except Exception as e:  # noqa: BLE001 - record, clean up, go on
        ctx.reset()
        cell = {"case": label, "error": str(e)[:500]}
    cell.update(size_mb=size_mb, rcpts=n, sink=sink.name)
    print_cell(cell)
    return cell


REFERENCE_CELLS = ((70, 2),)
"""Cells measured a second time against Postfix's smtp-sink, right after the same cell on
fastsink: smtp-sink reads DATA at 200-350 MB/s, so there the sink bounds the ratio."""


def case_large(ctx: Ctx) -> Json:
    header("2. large attachment end to end, smarthost fastsink (benches/fastsink.py) on "
           "loopback (default mode: submit .. the sink has the last copy); 70 MB x 2 also "
           "against Postfix's smtp-sink for reference")
    if ctx.quick:
        cells = list(QUICK_CELLS)
    else:
        cells = [(s, n) for s in FULL_SIZES for n in FULL_RCPTS]
    out: Json = {"cells": [], "reference": [], "sink": "fastsink", "reference_sink": "smtp-sink",
                 "note": "total = submit until the sink has the last copy; "
                 "submit = until sendmail returns; delivery = total - submit. Ours sends one "
                 "transaction with all RCPTs, C dma one connection per recipient. The matrix "
                 "runs against fastsink (benches/fastsink.py); 'reference' holds the same cell "
                 "against Postfix's smtp-sink, measured right after it."}
    with B.FastSink() as sink, B.SmtpSink() as ref:
        for size_mb, n in cells:
            out["cells"].append(large_cell(ctx, sink, size_mb, n, f"{size_mb} MB x {n}"))
            if (size_mb, n) in REFERENCE_CELLS:
                out["reference"].append(large_cell(ctx, ref, size_mb, n,
                                                   f"{size_mb} MB x {n} [smtp-sink]"))
    ctx.reset()
    out["mx"] = case_mx(ctx)
    out["bytes"] = case_bytes(ctx)
    return out


def case_mx(ctx: Ctx) -> list[Json]:
    """Ours only: C dma has no resolver setting (it uses the system resolver from
    /etc/resolv.conf and MX port 25); pointing it at a test DNS server would mean rewriting
    the machine's resolv.conf, which a benchmark on a shared machine must not do."""
    print("  -- several MX hosts (5 domains, dnsmasq on loopback, fastsink on "
          "127.0.0.201-205:25); ours only, C dma cannot be given a test DNS server", flush=True)
    try:
        from dnsd import DnsServer  # tests/dnsd.py
    except ImportError:
        sys.path.insert(0, str(B.ROOT / "tests"))
        sys.path.insert(1, str(next((B.VENV / "lib").glob("python*/site-packages"))))
        from dnsd import DnsServer
    ndom = 5
    addrs = [f"127.0.0.{201 + i}" for i in range(ndom)]
    mx = {f"d{i}.test": [(10, f"mx.d{i}.test")] for i in range(ndom)}
    hosts = {f"mx.d{i}.test": [addrs[i]] for i in range(ndom)}
    cells = [(10, 10)] if ctx.quick else [(10, 10), (100, 10), (100, 50)]
    results = []
    with contextlib.ExitStack() as st:
        dns = st.enter_context(DnsServer(mx=mx, hosts=hosts))
        sinks = [st.enter_context(B.FastSink(a, 25)) for a in addrs]
        ctx.ours.write(0, smarthost=None, extra=f"RESOLVER 127.0.0.1:{dns.port}\n")
        for size_mb, n in cells:
            msg = B.message_path(size_mb * MiB)
            wire = B.wire_path(msg)
            rcpts = [f"user{i}@d{i % ndom}.test" for i in range(n)]
            per = [[r for r in rcpts if r.endswith(f"@d{d}.test")] for d in range(ndom)]

            def raw_parallel() -> float:
                t0 = time.monotonic()
                with ThreadPoolExecutor(ndom) as ex:
                    list(ex.map(lambda d: B.raw_smtp(addrs[d], 25, wire, per[d]), range(ndom)))
                t = time.monotonic() - t0
                for sk in sinks:
                    sk.settle(1)
                return t

            label = f"MX {size_mb} MB x {n} / {ndom} hosts"
            try:
                cell = measure_pair(ctx, label, {
                    "ours": lambda: e2e(ctx, "ours", sinks, [1] * ndom, msg, rcpts,
                                        max(120.0, size_mb * n * 0.6))}, raw_parallel)
            except Exception as e:  # noqa: BLE001
                ctx.reset()
                cell = {"case": label, "error": str(e)[:500]}
            cell.update(size_mb=size_mb, rcpts=n, hosts=ndom, sink="fastsink")
            print_cell(cell)
            results.append(cell)
    ctx.reset()
    return results


def case_bytes(ctx: Ctx) -> Json:
    """100 MB x 50 into the hashing Python sink: every copy's body must be the input's."""
    print("  -- byte-exact check, 100 MB x 50 into a hashing Python sink (not timed against "
          "smtp-sink: the Python sink is slower)", flush=True)
    msg = B.message_path(100 * MiB)
    want, want_size = B.body_sha256_crlf(msg)
    rcpts = [f"user{i}@remote{i % 7}.test" for i in range(50)]
    out: Json = {"expected_body_sha256": want, "expected_body_size": want_size}
    for who in ("ours", "c"):
        with B.HashSink() as hs:
            ctx.ours.write(hs.port)
            ctx.cdma.write(hs.port)
            cmd, env, pending = ((OURS, ctx.ours.env(), ctx.ours.pending) if who == "ours"
                                 else (CDMA, B.bench_env(), ctx.cdma.pending))
            try:
                t0, _ = B.run_timed([cmd, *rcpts], msg, env)
                B.wait_until(lambda: pending() == 0, 900, f"{who} to deliver", 0.05)
                ctx.quiet()
                took = time.monotonic() - t0
                tx = list(hs.transactions)
                copies = sum(int(t["rcpts"]) for t in tx)
                good = sum(int(t["rcpts"]) for t in tx if t["body_sha256"] == want)
                out[who] = {"transactions": len(tx), "copies": copies, "identical": good,
                            "all_identical": good == 50 == copies,
                            "seconds_into_python_sink": took,
                            "bad_sizes": sorted({int(t["body_size"]) for t in tx
                                                 if t["body_sha256"] != want})[:10]}
            except Exception as e:  # noqa: BLE001
                ctx.reset()
                out[who] = {"error": str(e)[:500], "all_identical": False}
        print(f"     {who:>4}: {out[who]}", flush=True)
    ctx.reset()
    return out


# -- case 3: local delivery ---------------------------------------------------------------


def case_local(ctx: Ctx) -> Json:
    header("3. local mbox delivery, 100 MB message (ours: MAILSPOOL in benches/build/run; "
           "C dma: /var/mail, put back after each run)")
    msg = B.message_path(100 * MiB)
    size = msg.stat().st_size
    out: Json = {}
    with B.SmtpSink() as sink, B.mailbox_guard(LOCAL_USERS) as restore_var_mail:
        ctx.ours.write(sink.port)
        ctx.cdma.write(sink.port)

        def clean() -> None:
            restore_var_mail()
            for p in ctx.ours.mail.iterdir():
                p.unlink()

        def grown(mail_dir: str, users: Sequence[str]) -> bool:
            return all(os.path.exists(os.path.join(mail_dir, u)) and
                       os.path.getsize(os.path.join(mail_dir, u)) >= size for u in users)

        def local(who: str, users: Sequence[str]) -> Json:
            clean()
            cmd, env, pending, mdir = ((OURS, ctx.ours.env(), ctx.ours.pending,
                                        str(ctx.ours.mail)) if who == "ours" else
                                       (CDMA, B.bench_env(), ctx.cdma.pending, "/var/mail"))
            t0, t_sub = B.run_timed([cmd, *users], msg, env)
            t_end = B.wait_until(lambda: pending() == 0, 600, f"{who} local delivery")
            ctx.quiet()
            if not grown(mdir, users):
                raise RuntimeError(f"{who}: not every mailbox got the message")
            clean()
            return {"total": t_end - t0, "submit": t_sub - t0, "delivery": t_end - t_sub}

        cell = measure_pair(ctx, "100 MB x 10 local users", {
            "ours": lambda: local("ours", LOCAL_USERS),
            "c": lambda: local("c", LOCAL_USERS)}, None)
        print_cell(cell)
        out["10_users"] = cell

        # Issue 2's figure: one local user, foreground (-D), peak RSS of the one process.
        def one(who: str) -> Json:
            clean()
            cmd, env = (OURS, ctx.ours.env()) if who == "ours" else (CDMA, B.bench_env())
            wall, rss = B.run_rss([cmd, "-D", "root"], msg, env)
            ctx.quiet()
            mdir = str(ctx.ours.mail) if who == "ours" else "/var/mail"
            if not grown(mdir, ["root"]):
                raise RuntimeError(f"{who}: root's mailbox did not get the message")
            clean()
            return {"total": wall, "peak_rss_mb": rss}

        res: dict[str, list[Json]] = {"ours": [], "c": []}
        for i in range(1 + ctx.runs):
            for who in ctx.order(i):
                r = one(who)
                if i:
                    res[who].append(r)
        single: Json = {"case": "100 MB -> root, -D (submit + deliver, one process)"}
        for who, rs in res.items():
            single[who] = {"total": stats([r["total"] for r in rs]),
                           "peak_rss_mb": stats([r["peak_rss_mb"] for r in rs])}
        single["ratio_total"] = B.ratio(single["c"]["total"], single["ours"]["total"])
        out["1_user_foreground"] = single
        print(f"  {single['case']}: ours {ms(single['ours']['total']['median'])} "
              f"(RSS {single['ours']['peak_rss_mb']['max']:.1f} MB) | C "
              f"{ms(single['c']['total']['median'])} (RSS "
              f"{single['c']['peak_rss_mb']['max']:.1f} MB) | C/ours {single['ratio_total']:.1f}x")
    ctx.reset()
    return out


# -- case 4: queue flush --------------------------------------------------------------------


def case_flush(ctx: Ctx) -> Json:
    header("4. queue flush: 1,000 queued 4 KB messages to one smarthost (smtp-sink)")
    count = 1000
    msg = B.small_message(4096)
    snaps = {"ours": RUN / "snap-ours", "c": RUN / "snap-c"}
    with B.SmtpSink() as sink:
        ctx.ours.write(sink.port)
        ctx.cdma.write(sink.port)
        ctx.reset()
        # Fill each queue once, then restore that snapshot (cp -a) before every run.
        log("filling our queue (dma.send in the venv) and C dma's (dma -bq) with 1,000 each")
        fill = ("import dma, sys\nbody = open(sys.argv[1], 'rb').read()\n"
                "for _ in range(int(sys.argv[2])):\n"
                "    dma.send(body, recipients=['q@remote.test'], config=sys.argv[3],\n"
                "             deliver=False)\n")
        B.sh([B.VENV_PY, "-c", fill, msg, str(count), ctx.ours.path], env=ctx.ours.env())
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda _: B.run_timed([CDMA, "-bq", "q@remote.test"], msg,
                                              B.bench_env()), range(count)))
        if ctx.ours.pending() != count or ctx.cdma.pending() != 2 * count:
            raise RuntimeError(f"queue fill: ours {ctx.ours.pending()}, C dma "
                               f"{ctx.cdma.pending()} files")
        for who, src in (("ours", ctx.ours.spool), ("c", ctx.cdma.spool)):
            shutil.rmtree(snaps[who], ignore_errors=True)
            B.sh(["cp", "-a", src, snaps[who]])

        def flush(who: str) -> Json:
            spool = ctx.ours.spool if who == "ours" else ctx.cdma.spool
            shutil.rmtree(spool)
            B.sh(["cp", "-a", snaps[who], spool])
            mesg0 = sink.settle()
            sess0 = sink.counts()[0]
            if who == "ours":
                t0, t_ret = B.run_timed([OURS, "-q"], None, ctx.ours.env(), timeout=300)
                t_empty = B.wait_until(lambda: ctx.ours.pending() == 0, 300, "our queue",
                                       0.005)
            else:
                t0, t_ret = B.run_timed([CDMA, "-q"], None, B.bench_env(), timeout=300)
                t_empty = B.wait_until(lambda: ctx.cdma.pending() == 0, 300,
                                       "C dma's queue", 0.005)
            t_sink = sink.wait_mesg(mesg0 + count, 60)
            ctx.quiet(120)
            time.sleep(0.3)  # let the sink report the last sessions' ends
            sess1, mesg1 = sink.counts()
            if mesg1 - mesg0 != count:
                raise RuntimeError(f"{who}: sink got {mesg1 - mesg0} of {count}")
            sink.settle(count)
            return {"total": max(t_empty, t_ret) - t0, "last_message_at_sink": t_sink - t0,
                    "connections": float(sess1 - sess0)}

        cell = measure_pair(ctx, "flush 1,000 x 4 KB", {"ours": lambda: flush("ours"),
                                                        "c": lambda: flush("c")},
                            lambda: raw_counted(sink, lambda: B.raw_pipelined(
                                "127.0.0.1", sink.port, msg.read_bytes(), count), count))
    for s in snaps.values():
        shutil.rmtree(s, ignore_errors=True)
    ctx.reset()
    cell["ratio_total"] = B.ratio(cell["c"]["total"], cell["ours"]["total"])
    for who in ("ours", "c"):
        c = cell[who]
        print(row(f"{who} (until the queue is empty)", c["total"]) +
              f"   connections {c['connections']['median']:.0f}")
    print(row("raw: 1 connection, bare client", cell["raw_tcp"]))
    print(f"  ratio C dma / ours {cell['ratio_total']:.2f}")
    return cell


# -- case 5: peak RSS -----------------------------------------------------------------------


def case_rss(ctx: Ctx) -> Json:
    header("5. peak RSS (ru_maxrss of the one process, under GNU time)")
    msg = B.message_path(1024 * MiB)
    out: Json = {}
    runs = 1 if ctx.quick else 2
    with B.SmtpSink() as sink, B.mailbox_guard(["root"]) as restore_var_mail:
        ctx.ours.write(sink.port)
        ctx.cdma.write(sink.port)
        for who in ("ours", "c"):
            cmd, env = (OURS, ctx.ours.env()) if who == "ours" else (CDMA, B.bench_env())
            rows: dict[str, list[tuple[float, float]]] = {}
            for _ in range(runs):
                for dest in ("big@remote.test", "root"):
                    kind = "smtp" if "@" in dest else "local mbox"
                    rows.setdefault(f"submit 1 GB (-bq), {kind}", []).append(
                        B.run_rss([cmd, "-bq", dest], msg, env))
                    sink.settle()
                    rows.setdefault(f"deliver 1 GB (-q), {kind}", []).append(
                        B.run_rss([cmd, "-D", "-q"], None, env))
                    ctx.quiet()
                    if kind == "smtp":
                        sink.settle(1)
                    for p in ctx.ours.mail.iterdir():
                        p.unlink()
                    restore_var_mail()
                    ctx.reset()
            out[who] = {k: {"wall": stats([w for w, _ in v]),
                            "peak_rss_mb": stats([r for _, r in v])} for k, v in rows.items()}
            for k, v in out[who].items():
                print(f"  {who:>4} {k:<28} peak RSS {v['peak_rss_mb']['max']:7.1f} MB   "
                      f"wall {ms(v['wall']['median'])}", flush=True)
        # Issue 3's figures: RSS and wall of -D (submit + deliver) for 70x2 and 100x50.
        for size_mb, n, whom in ((70, 2, ("ours", "c")), (100, 50, ("ours",)),
                                 (100, 1, ("ours", "c"))):
            m = B.message_path(size_mb * MiB)
            rcpts = [f"user{i}@remote{i % 7}.test" for i in range(n)]
            for who in whom:
                cmd, env = (OURS, ctx.ours.env()) if who == "ours" else (CDMA, B.bench_env())
                sink.settle()
                wall, rss = B.run_rss([cmd, "-D", *rcpts], m, env)
                sink.settle(1 if who == "ours" else n, 600)
                ctx.quiet(600)
                key = f"-D {size_mb} MB x {n}"
                out.setdefault(who, {})[key] = {"wall_of_the_process": wall, "peak_rss_mb": rss}
                print(f"  {who:>4} {key:<28} peak RSS {rss:7.1f} MB   process wall {ms(wall)}"
                      + ("   (C dma: the parent only; it forks one process per recipient, "
                         "each like -D 100 MB x 1)" if who == "c" and n > 1 else ""), flush=True)
                ctx.reset()
    ctx.reset()
    return out


# -- case 6: raw limits ---------------------------------------------------------------------


def case_raw(ctx: Ctx) -> Json:
    header("6. raw limits: dd conv=fsync into the spool file system, one DATA over loopback "
           "into fastsink (the sink of case 2) and into Postfix's smtp-sink; spool write of "
           "ours and C dma (-bq) beside dd")
    sizes = (1, 10, 70, 100, 1024) if not ctx.quick else (70, 100)
    out: Json = {"dd_fsync": {}, "tcp_one_data": {}, "tcp_one_data_smtp_sink": {},
                 "spool_write": {}, "sink": "fastsink", "reference_sink": "smtp-sink"}
    with B.FastSink() as sink, B.SmtpSink() as ref:
        ctx.ours.write(sink.port)
        ctx.cdma.write(sink.port)
        for size_mb in sizes:
            msg = B.message_path(size_mb * MiB)
            wire = B.wire_path(msg)
            n = ctx.runs if size_mb < 1024 else 3
            dd = [B.dd_fsync(msg) for _ in range(1 + n)][1:]
            out["dd_fsync"][str(size_mb)] = stats(dd)
            print(row(f"{size_mb} MB dd conv=fsync", stats(dd)) +
                  f"  ({size_mb / statistics.median(dd):.0f} MB/s)")
            # The two sinks alternate, so that both see the same machine.
            tcp: dict[str, list[float]] = {sink.name: [], ref.name: []}
            for i in range(1 + n):
                for sk in (sink, ref) if i % 2 == 0 else (ref, sink):
                    t = raw_counted(sk, lambda: B.raw_smtp("127.0.0.1", sk.port, wire,
                                                           ["raw@remote.test"]))
                    if i:
                        tcp[sk.name].append(t)
            for key, sk in (("tcp_one_data", sink), ("tcp_one_data_smtp_sink", ref)):
                st = stats(tcp[sk.name])
                out[key][str(size_mb)] = st
                print(row(f"{size_mb} MB one DATA into {sk.name}", st) +
                      f"  ({size_mb / statistics.median(tcp[sk.name]):.0f} MB/s)", flush=True)
        # Spool write throughput (issue 2): -bq of 100 MB, ours vs C dma vs dd.
        msg = B.message_path(100 * MiB)

        def bq(who: str) -> Json:
            cmd, env = (OURS, ctx.ours.env()) if who == "ours" else (CDMA, B.bench_env())
            t0, t1 = B.run_timed([cmd, "-bq", "raw@remote.test"], msg, env)
            ctx.reset()
            return {"total": t1 - t0}

        cell = measure_pair(ctx, "spool write 100 MB (-bq)", {"ours": lambda: bq("ours"),
                                                               "c": lambda: bq("c")},
                            lambda: B.dd_fsync(msg))
        cell["dd_fsync"] = cell.pop("raw_tcp")
        out["spool_write"] = cell
        for who in ("ours", "c"):
            s = cell[who]["total"]
            print(row(f"spool write 100 MB -bq, {who}", s) +
                  f"  ({100 / s['median']:.0f} MB/s)")
        print(row("spool write 100 MB, dd conv=fsync", cell["dd_fsync"]) +
              f"  ({100 / cell['dd_fsync']['median']:.0f} MB/s)")
    ctx.reset()
    return out


# -- goals and report -----------------------------------------------------------------------


def find_cell(res: Json, size: int, n: int, key: str = "cells") -> Json | None:
    """Case 2's cell (``key="reference"``: the one measured against smtp-sink)."""
    cells: list[Json] = res.get("cases", {}).get("2_large", {}).get(key, [])
    for c in cells:
        if c.get("size_mb") == size and c.get("rcpts") == n and "error" not in c:
            return c
    return None


def sink_of(c: Json) -> str:
    """Results from before fastsink have no "sink": they were measured on smtp-sink."""
    return str(c.get("sink", "smtp-sink"))


def goals(res: Json) -> list[Json]:
    g: list[Json] = []
    cases = res.get("cases", {})
    c = find_cell(res, 70, 2)
    if c:
        raw = c["raw_tcp"]["median"]
        ceiling = c["c"]["total"]["median"] / raw
        value = (f"{c['ratio_total']:.2f}x on {sink_of(c)} (ours "
                 f"{ms(c['ours']['total']['median'])}, C dma {ms(c['c']['total']['median'])}, "
                 f"raw loopback copy {ms(raw)}; ceiling C dma / raw = {ceiling:.2f}x)")
        ref = find_cell(res, 70, 2, "reference")
        if ref:
            rraw = ref["raw_tcp"]["median"]
            value += (f"; on {sink_of(ref)}: {ref['ratio_total']:.2f}x (ours "
                      f"{ms(ref['ours']['total']['median'])}, C dma "
                      f"{ms(ref['c']['total']['median'])}, raw {ms(rraw)}; ceiling "
                      f"{ref['c']['total']['median'] / rraw:.2f}x): {sink_of(ref)} reads the "
                      f"DATA at {70 / rraw:.0f} MB/s where {sink_of(c)} reads "
                      f"{70 / raw:.0f} MB/s, so there the sink, not the MTA, bounds the ratio")
        dd = cases.get("6_raw", {}).get("dd_fsync", {}).get("70")
        if dd:
            # An MTA that makes the message durable before sending it (both do) needs at
            # least the spool write plus one copy to the sink.
            floor = dd["median"] + raw
            value += (f"; durable-first floor: dd conv=fsync {ms(dd['median'])} + one copy "
                      f"{ms(raw)} = {ms(floor)}, so at best "
                      f"{c['c']['total']['median'] / floor:.2f}x C dma")
        g.append({"goal": "70 MB x 2: >= 5x faster than C dma (end to end)",
                  "value": value, "met": c["ratio_total"] >= 5})
        d = c["ours"]["delivery"]["median"]
        g.append({"goal": "70 MB x 2: delivery phase within 2x of the raw loopback copy",
                  "value": f"{d / raw:.2f}x raw ({ms(d)} vs {ms(raw)}, both into "
                           f"{sink_of(c)})", "met": d <= 2 * raw})
    c = find_cell(res, 100, 50)
    if c:
        g.append({"goal": "100 MB x 50: >= 20x faster than C dma",
                  "value": f"{c['ratio_total']:.2f}x (on {sink_of(c)})",
                  "met": c["ratio_total"] >= 20})
    b = cases.get("2_large", {}).get("bytes", {}).get("ours")
    if b:
        g.append({"goal": "100 MB x 50: every copy byte-identical",
                  "value": f"{b.get('identical')} of {b.get('copies')} copies identical "
                           f"({b.get('transactions')} transaction(s))",
                  "met": bool(b.get("all_identical"))})
    r = cases.get("5_rss", {}).get("ours")
    if r:
        peak = max(v["peak_rss_mb"]["max"] for k, v in r.items() if "1 GB" in k)
        g.append({"goal": "peak RSS <= 64 MB for the 1 GB message",
                  "value": f"{peak:.1f} MB", "met": peak <= 64})
    f = cases.get("4_flush")
    if f and "ratio_total" in f:
        ceiling = f["c"]["total"]["median"] / f["raw_tcp"]["median"]
        g.append({"goal": "flush of 1,000 queued messages >= 5x faster than C dma",
                  "value": f"{f['ratio_total']:.2f}x ({ms(f['ours']['total']['median'])} vs "
                           f"{ms(f['c']['total']['median'])}; ceiling: C dma / bare pipelining "
                           f"client = {ceiling:.1f}x)", "met": f["ratio_total"] >= 5})
    lat = cases.get("1_latency")
    if lat:
        for mode in ("-bq", "default"):
            m = lat[f"ours {mode}"]["median"]
            g.append({"goal": f"submit latency 1 KB ({mode}) median <= 25 ms",
                      "value": f"{ms(m)} (venv python -c pass: "
                               f"{ms(lat['floor: venv python -c pass']['median'])})",
                      "met": m <= 0.025})
    return g


SINK_NAMES = {"fastsink": "fastsink (`benches/fastsink.py`)",
              "smtp-sink": "Postfix smtp-sink"}


def markdown(res: Json) -> str:
    cases = res.get("cases", {})
    L: list[str] = []
    meta = res.get("meta", {})
    L.append(f"Measured {meta.get('date', '?')} on {meta.get('cpus', '?')} CPUs "
             f"(ours: {meta.get('versions', {}).get('ours', '?')} at "
             f"{meta.get('versions', {}).get('git', '?')}; C dma "
             f"{meta.get('versions', {}).get('c_dma', '?')}); medians of "
             f"{meta.get('runs', '?')} runs after a warm-up; ratio = C dma / ours.\n")
    lat = cases.get("1_latency")
    if lat:
        L += ["| submit, 1 KB | ours | C dma | ratio |", "|---|---:|---:|---:|"]
        for mode in ("-bq", "default"):
            L.append(f"| `sendmail {mode}` returns | {ms(lat[f'ours {mode}']['median'])} | "
                     f"{ms(lat[f'C dma {mode}']['median'])} | {lat[f'ratio {mode}']:.2f} |")
        L.append(f"| floor: venv `python -c pass` | "
                 f"{ms(lat['floor: venv python -c pass']['median'])} | | |\n")
    large = cases.get("2_large")
    if large:
        def e2e_table(title: str, cells: list[Json]) -> None:
            nonlocal L
            L += [f"| {title} | ours | C dma | ratio | ours: submit + delivery | "
                  "raw loopback copy |", "|---|---:|---:|---:|---:|---:|"]
            for c in cells:
                if "error" in c:
                    L.append(f"| {c['case']} | error: {c['error'][:60]} | | | | |")
                    continue
                cm = ms(c["c"]["total"]["median"]) if "c" in c else "n/a"
                rt = f"{c['ratio_total']:.1f}x" if "ratio_total" in c else ""
                L.append(f"| {c['case']} | {ms(c['ours']['total']['median'])} | {cm} | {rt} | "
                         f"{ms(c['ours']['submit']['median'])} + "
                         f"{ms(c['ours']['delivery']['median'])} | "
                         f"{ms(c['raw_tcp']['median'])} |")

        sink = large.get("sink", "smtp-sink")
        e2e_table(f"end to end into {SINK_NAMES.get(sink, sink)}: submit .. last copy at "
                  "the sink", large["cells"] + large.get("mx", []))
        refs = [c for c in large.get("reference", []) if "error" not in c]
        if large.get("reference"):
            rs = large.get("reference_sink", "smtp-sink")
            rate = (f", one DATA at {refs[0]['size_mb'] / refs[0]['raw_tcp']['median']:.0f} "
                    "MB/s" if refs else "")
            L.append("")
            e2e_table(f"reference: the same into {SINK_NAMES.get(rs, rs)} (it reads slowly"
                      f"{rate}: the sink bounds these cells)", large["reference"])
        b = large.get("bytes", {})
        if b:
            L.append("")
            for who in ("ours", "c"):
                if who in b:
                    x = b[who]
                    L.append(f"Byte check 100 MB x 50 ({'ours' if who == 'ours' else 'C dma'}): "
                             f"{x.get('identical')} of {x.get('copies')} copies identical in "
                             f"{x.get('transactions')} transaction(s).")
        L.append("")
    loc = cases.get("3_local")
    if loc:
        L += ["| local mbox | ours | C dma | ratio |", "|---|---:|---:|---:|"]
        c = loc["10_users"]
        L.append(f"| 100 MB to 10 users | {ms(c['ours']['total']['median'])} | "
                 f"{ms(c['c']['total']['median'])} | {c['ratio_total']:.1f}x |")
        c = loc["1_user_foreground"]
        L.append(f"| 100 MB to root, `-D` (peak RSS) | {ms(c['ours']['total']['median'])} "
                 f"({c['ours']['peak_rss_mb']['max']:.0f} MB) | {ms(c['c']['total']['median'])} "
                 f"({c['c']['peak_rss_mb']['max']:.0f} MB) | {c['ratio_total']:.1f}x |\n")
    fl = cases.get("4_flush")
    if fl:
        L += ["| queue flush, 1,000 x 4 KB, one smarthost | ours | C dma | ratio | raw |",
              "|---|---:|---:|---:|---:|",
              f"| until the queue is empty | {ms(fl['ours']['total']['median'])} "
              f"({fl['ours']['connections']['median']:.0f} connection(s)) | "
              f"{ms(fl['c']['total']['median'])} ({fl['c']['connections']['median']:.0f}) | "
              f"{fl['ratio_total']:.1f}x | {ms(fl['raw_tcp']['median'])} (1 connection) |\n"]
    rss = cases.get("5_rss")
    if rss:
        L += ["| peak RSS, 1 GB message | ours | C dma |", "|---|---:|---:|"]
        for k in rss.get("ours", {}):
            if "1 GB" in k:
                o, c = rss["ours"][k], rss.get("c", {}).get(k)
                L.append(f"| {k} | {o['peak_rss_mb']['max']:.1f} MB "
                         f"({ms(o['wall']['median'])}) | "
                         + (f"{c['peak_rss_mb']['max']:.1f} MB ({ms(c['wall']['median'])}) |"
                            if c else "n/a |"))
        L.append("")
    raw = cases.get("6_raw")
    if raw:
        sink = raw.get("sink", "smtp-sink")

        def mbs(tab: Json) -> str:
            return " | ".join(f"{ms(v['median'])} ({float(k) / v['median']:.0f} MB/s)"
                              for k, v in tab.items())

        L += ["| raw limit | " + " | ".join(f"{s} MB" for s in raw["dd_fsync"]) + " |",
              "|---|" + "---:|" * len(raw["dd_fsync"]),
              f"| dd conv=fsync into the spool fs | {mbs(raw['dd_fsync'])} |",
              f"| one DATA over loopback (sendfile) into {SINK_NAMES.get(sink, sink)} | "
              f"{mbs(raw['tcp_one_data'])} |"]
        if raw.get("tcp_one_data_smtp_sink"):
            L.append(f"| one DATA over loopback (sendfile) into {SINK_NAMES['smtp-sink']} | "
                     f"{mbs(raw['tcp_one_data_smtp_sink'])} |")
        sw = raw.get("spool_write")
        if sw and "ours" in sw:
            L.append(f"\nSpool write of 100 MB (`-bq`): ours {ms(sw['ours']['total']['median'])}"
                     f", C dma {ms(sw['c']['total']['median'])}, dd conv=fsync "
                     f"{ms(sw['dd_fsync']['median'])}.")
        L.append("")
    g = res.get("goals", [])
    if g:
        L += ["| goal | measured | met |", "|---|---|---|"]
        L += [f"| {x['goal']} | {x['value']} | {'yes' if x['met'] else '**no**'} |" for x in g]
    return "\n".join(L) + "\n"


CASES: dict[str, tuple[str, Callable[[Ctx], Json]]] = {
    "1": ("1_latency", case_latency),
    "2": ("2_large", case_large),
    "3": ("3_local", case_local),
    "4": ("4_flush", case_flush),
    "5": ("5_rss", case_rss),
    "6": ("6_raw", case_raw),
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the matrix")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per pair (>= 5)")
    ap.add_argument("--cases", default="1,2,3,4,5,6")
    ap.add_argument("--no-setup", action="store_true")
    ap.add_argument("--report", action="store_true", help="only print results.md again")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(RESULTS.read_text())
        res["goals"] = goals(res)
        sys.stdout.write(markdown(res))
        return 0
    if os.geteuid() != 0:
        sys.exit("bench: run as root (C dma's config is /etc/dma/dma.conf)")
    if not args.no_setup:
        B.setup()
    for d in (RUN, B.DATA):
        d.mkdir(parents=True, exist_ok=True)
    res: Json = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res.setdefault("cases", {})
    ctx = Ctx(args)
    started = time.monotonic()

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        ctx.reset()
        for key in args.cases.split(","):
            name, fn = CASES[key.strip()]
            t = time.monotonic()
            res["cases"][name] = fn(ctx)
            res["cases"][name]["_meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                           "seconds": round(time.monotonic() - t, 1),
                                           "quick": args.quick, "runs": args.runs}
            res["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": args.runs,
                           "quick": args.quick, "cpus": os.cpu_count(),
                           "versions": B.versions(),
                           "sink": "fastsink (benches/fastsink.py) for case 2 and the raw "
                                   "copies of case 6; Postfix smtp-sink (Debian postfix "
                                   "package, dpkg -x) for the others and case 2's reference "
                                   "row"}
            res["goals"] = goals(res)
            RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    finally:
        stopped = B.stop_marked()
        if stopped:
            log(f"stopped {stopped} leftover process(es) started by this run")
        ctx.cdma.restore()
        with contextlib.suppress(OSError):
            ctx.cdma.clear()
            ctx.ours.clear()
    RESULTS_MD.write_text(markdown(res))
    header("goals")
    for x in res["goals"]:
        print(f"  [{'met' if x['met'] else 'NOT MET'}] {x['goal']}: {x['value']}")
    print(f"\nwall time {time.monotonic() - started:.0f} s; results in {RESULTS} and {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
