"""Delivering queued messages: claim one, work out who is still pending, hand each recipient
to local delivery or to SMTP (destinations in parallel), write every result to the journal
as soon as it is known, and finish the message when nobody is pending any more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dma import _core, bounce, route
from dma.config import Config
from dma.errors import DmaError, SpoolCorrupt
from dma.log import Log
from dma.outcome import Outcome
from dma.record import Record
from dma.spool import Envelope, RecipientState, Spool

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    from dma import smtp
    from dma.outcome import Status


class RunResult(Record):
    __slots__ = ("queue_id", "outcomes", "claimed", "error")

    queue_id: str
    outcomes: list[Outcome]
    claimed: bool
    """False when another runner held the message, or it could not be read."""
    error: str

    def __init__(self, queue_id: str, outcomes: list[Outcome], claimed: bool = True,
                 error: str = "") -> None:
        self.queue_id = queue_id
        self.outcomes = outcomes
        self.claimed = claimed
        self.error = error

    @property
    def pending(self) -> bool:
        return any(o.status == "deferred" for o in self.outcomes)

    @property
    def failed(self) -> bool:
        return any(o.status == "failed" for o in self.outcomes)


def _remote(msg: _core.MessageFile, env: Envelope, dest: route.Destination, config: Config,
            log: Log, pool: smtp.ConnectionPool | None) -> list[Outcome]:
    """One destination: resolve it, then one SMTP transaction with all its recipients."""
    try:
        hosts = route.resolve(dest, config)
    except route.RouteError as e:
        status: Status = "failed" if e.permanent else "deferred"
        log.info(f"{env.id}: to={','.join(f'<{r}>' for r in dest.recipients)}, "
                 f"relay=none, status={status} ({e.reason})")
        return [Outcome(r, status, e.reason, e.dsn) for r in dest.recipients]
    from dma import auth, smtp

    table = None
    if config.authpath:
        table = auth.load(config.authpath)
        if table.insecure_permissions:
            log.warning(f"{config.authpath} is readable by other users; it holds passwords "
                        f"(chmod 640, owner root:mail)")
    return smtp.deliver(msg, env.sender, dest.recipients, hosts, dest, config, table, log,
                        queue_id=env.id, created=env.created, pool=pool)


def deliver_message(spool: Spool, qid: str, config: Config, log: Log,
                    pool: smtp.ConnectionPool | None = None) -> RunResult:
    """Attempt every pending recipient of one message now; bounce and remove it once no
    recipient is left to try.  ``pool`` keeps SMTP sessions open across messages."""
    with spool.locked(qid) as claimed:
        if claimed is None:
            return RunResult(qid, [], claimed=False)
        msg, env = claimed
        # Never deliver a copy of a file that was damaged after it was accepted.
        msg.verify()
        states = spool.states(env)
        pending = [r for r in env.recipients if states[r].status in ("pending", "deferred")]
        plan = route.plan(pending, config)
        outcomes: list[Outcome] = []
        expired = time.time() - env.created > config.lifetime

        def done(results: Sequence[Outcome]) -> None:
            for o in results:
                if o.status == "deferred" and expired:
                    o = Outcome(o.recipient, "failed",
                                f"gave up after {config.lifetime / 86400:g} days in the "
                                f"queue; last error: {o.reply}", _permanent(o.dsn), o.relay)
                try:
                    spool.record(qid, o)
                except OSError as e:
                    # The outcome is lost, not the message: it stays queued and this
                    # recipient may get a second copy on the next run.
                    log.error(f"{qid}: cannot write the journal ({e.strerror}); "
                              f"<{o.recipient}> may receive this message again")
                if o.relay.startswith(("mbox:", "maildir:")) or expired:
                    # SMTP attempts are logged by smtp.deliver, one line per destination.
                    log.info(f"{qid}: to=<{o.recipient}> relay={o.relay or 'none'} "
                             f"status={o.status} ({o.reply})")
                outcomes.append(o)

        if len(plan.remote) == 1 and not plan.local:
            # The common case (one smarthost): no thread to start for a single destination.
            done(_remote(msg, env, plan.remote[0], config, log, pool))
        elif plan.remote:
            from concurrent.futures import ThreadPoolExecutor, as_completed

            workers = max(1, min(config.max_parallel, len(plan.remote)))
            with ThreadPoolExecutor(workers) as workers_pool:
                futures = [workers_pool.submit(_remote, msg, env, d, config, log, pool)
                           for d in plan.remote]
                # Local deliveries run meanwhile in this thread; results are journalled as
                # soon as each is known (only this thread writes the journal).
                _deliver_local(msg, env, plan.local, config, done)
                for f in as_completed(futures):
                    done(f.result())
        else:
            _deliver_local(msg, env, plan.local, config, done)
        notice = _finish(spool, msg, env, config, log) or _warn_delay(spool, msg, env, config,
                                                                        log)
    if notice is not None:
        # The sender hears at once, as with C dma; if this attempt defers, the queue retries.
        deliver_message(spool, notice, config, log, pool)
    return RunResult(qid, outcomes)


def next_attempt(state: RecipientState, config: Config) -> float | None:
    """When a recipient is due again: at once when never tried, after an exponential
    backoff from RETRY_MIN up to RETRY_MAX when deferred, never when final."""
    if state.status == "pending":
        return 0.0
    if state.status != "deferred" or state.last_attempt is None:
        return None
    backoff = config.retry_min * 2.0 ** min(max(state.attempts - 1, 0), 32)
    return state.last_attempt + min(config.retry_max, backoff)


def is_due(states: dict[str, RecipientState], config: Config, now: float) -> bool:
    times = [t for t in (next_attempt(s, config) for s in states.values()) if t is not None]
    # A clock that jumped backwards must not postpone a retry beyond one backoff cap.
    return any(t <= now or t - now > config.retry_max for t in times)


def _warn_delay(spool: Spool, msg: _core.MessageFile, env: Envelope, config: Config,
                log: Log) -> str | None:
    """One "still trying" notice (Action: delayed) per message, once DELAY_WARNING is
    exceeded; never for notices dma generated itself."""
    if config.delay_warning is None or env.notice or not env.sender:
        return None
    if time.time() - env.created < config.delay_warning:
        return None
    deferred = [s for s in spool.states(env).values() if s.status == "deferred"]
    if not deferred or "delay-warning" in spool.events(env.id):
        return None
    try:
        nid = bounce.send(env, msg, deferred, config, delayed=True)
    except (DmaError, OSError) as e:
        log.error(f"{env.id}: cannot spool the delay notice ({e})")
        return None
    try:
        spool.mark(env.id, "delay-warning")
    except OSError as e:
        log.error(f"{env.id}: cannot write the journal ({e.strerror}); the delay notice "
                  f"may be sent again")
    log.info(f"{env.id}: delay notice to <{env.sender}> as {nid}")
    return nid


def _permanent(dsn: str) -> str:
    return "5" + dsn[1:] if dsn[:1] == "4" else (dsn or "5.4.7")


def _finish(spool: Spool, msg: _core.MessageFile, env: Envelope, config: Config,
            log: Log) -> str | None:
    """Remove the message when nobody is left to try, after its bounce is safely spooled
    (never before: if the bounce cannot be spooled, the message stays and we try again)."""
    states = spool.states(env)
    if any(s.status not in ("delivered", "failed") for s in states.values()):
        return None
    bid = None
    failed = [s for s in states.values() if s.status == "failed"]
    if failed:
        if env.notice == bounce.NOTICE_POSTMASTER:
            log.error(f"{env.id}: undeliverable notice to the postmaster dropped "
                      f"({failed[0].reply})")
        else:
            try:
                bid = bounce.send(env, msg, failed, config)
            except (DmaError, OSError) as e:
                log.error(f"{env.id}: cannot spool the bounce ({e}); message kept")
                return None
            log.info(f"{env.id}: bounced to <{env.sender or bounce.POSTMASTER}> as {bid}")
    spool.remove(env.id)
    return bid


def _deliver_local(msg: _core.MessageFile, env: Envelope, users: Sequence[str], config: Config,
                   done: Callable[[Sequence[Outcome]], None]) -> None:
    if not users:
        return
    from dma import local

    for user in users:
        done([local.deliver(msg, env.sender, user, config, now=time.time())])


def run_queue(spool: Spool, config: Config, log: Log, ids: Sequence[str] | None = None, *,
              due_only: bool = False, now: float | None = None) -> list[RunResult]:
    """Run the given messages (default: every queued message) now; with ``due_only`` (the
    timer-driven runner) only those whose retry time has come."""
    from dma import smtp

    spool.clean_debris()
    with smtp.ConnectionPool() as pool:
        return _run_all(spool, config, log, ids or spool.ids(), due_only,
                        time.time() if now is None else now, pool)


def _run_all(spool: Spool, config: Config, log: Log, ids: Sequence[str], due_only: bool,
             now: float, pool: smtp.ConnectionPool) -> list[RunResult]:
    results = []
    for qid in ids:
        if due_only:
            try:
                msg, env = spool.open(qid)
            except FileNotFoundError:
                continue
            except (DmaError, OSError) as e:
                log.error(f"{qid}: unreadable queue file, not delivered: {e}")
                continue
            msg.close()
            if not is_due(spool.states(env), config, now):
                continue
        try:
            results.append(deliver_message(spool, qid, config, log, pool))
        except SpoolCorrupt as e:
            log.error(f"{qid}: refusing to deliver a damaged queue file ({e}); "
                      f"inspect it with 'dma queue show {qid}' or remove it with "
                      f"'dma queue delete {qid}'")
            results.append(RunResult(qid, [], claimed=False, error=str(e)))
        except OSError as e:
            # One message's trouble (a full spool disk, an unreadable file) must not stop
            # the run for the others; the message stays queued.
            log.error(f"{qid}: delivery attempt failed: {e}; the message stays queued")
            results.append(RunResult(qid, [], claimed=False, error=str(e)))
    return results


def retry_until_done(spool: Spool, qid: str, config: Config, log: Log,
                     sleep: Callable[[float], None] = time.sleep) -> RunResult:
    """C dma's behaviour where no queue runner is installed: keep retrying this message in
    this (detached) process with the usual backoff until it is delivered, bounced or taken
    by another runner; the lifetime bounds it."""
    while True:
        result = deliver_message(spool, qid, config, log)
        if not result.claimed or not result.pending:
            return result
        try:
            msg, env = spool.open(qid)
        except (DmaError, OSError):
            return result
        msg.close()
        times = [t for t in (next_attempt(s, config) for s in spool.states(env).values())
                 if t is not None]
        if not times:
            return result
        wait = min(max(min(times) - time.time(), 1.0), config.retry_max)
        log.info(f"{qid}: no queue runner is installed ('dma setup' installs one); "
                 f"this process retries in {wait:.0f}s")
        sleep(wait)
