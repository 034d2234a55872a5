"""Delivering queued messages: claim one, work out who is still pending, hand each recipient
to local delivery or to SMTP (destinations in parallel), write every result to the journal
as soon as it is known, and finish the message when nobody is pending any more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dma import _core, bounce, route
from dma.config import Config
from dma.errors import ConfigError, DmaError, SpoolCorrupt
from dma.log import Log
from dma.outcome import Outcome
from dma.record import Record
from dma.spool import Claim, Envelope, RecipientState, Spool

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    from collections.abc import Iterator

    from dma import auth, smtp
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
    from dma import smtp

    return smtp.deliver(msg, env.sender, dest.recipients, hosts, dest, config,
                        _auth_table(config, log), log, queue_id=env.id, created=env.created,
                        pool=pool, wire=_wire(msg, env))


def _wire(msg: _core.MessageFile, env: Envelope) -> int | None:
    """The message's size with CRLF line ends (SMTP's SIZE=), when the envelope knows its
    line count."""
    return msg.size + env.lines if env.lines >= 0 else None


def _auth_table(config: Config, log: Log) -> auth.AuthTable | None:
    if not config.authpath:
        return None
    from dma import auth

    table = auth.load(config.authpath)
    if table.insecure_permissions:
        log.warning(f"{config.authpath} is readable by other users; it holds passwords "
                    f"(chmod 640, owner root:mail)")
    return table


class _Claimed:
    """A message locked for one delivery attempt, with who is still to be tried and where
    they go."""

    __slots__ = ("spool", "queue_id", "msg", "env", "states", "pending", "plan", "expired",
                 "_claim")

    def __init__(self, spool: Spool, claim: Claim, msg: _core.MessageFile, env: Envelope,
                 states: dict[str, RecipientState], config: Config, now: float) -> None:
        self.spool = spool
        self._claim = claim
        self.queue_id = env.id
        self.msg = msg
        self.env = env
        self.states = states
        self.pending = [r for r in env.recipients
                        if states[r].status in ("pending", "deferred")]
        self.plan = route.plan(self.pending, config)
        self.expired = now - env.created > config.lifetime

    # What smtp.deliver_many needs of a job (this message's one remote destination).
    @property
    def sender(self) -> str:
        return self.env.sender

    @property
    def recipients(self) -> tuple[str, ...]:
        # Distinct, as smtp.deliver makes them (one RCPT, one outcome per address).
        return tuple(dict.fromkeys(self.plan.remote[0].recipients))

    @property
    def created(self) -> float:
        return self.env.created

    @property
    def wire(self) -> int | None:
        return _wire(self.msg, self.env)

    @property
    def one_destination(self) -> route.Destination | None:
        """The message's only destination when all its pending recipients share one remote
        destination (and it is not past its lifetime): it can join a run of messages sent
        back to back to that destination."""
        if self.expired or self.plan.local or len(self.plan.remote) != 1:
            return None
        return self.plan.remote[0]

    def release(self) -> None:
        self._claim.__exit__(None, None, None)


def _claim(spool: Spool, qid: str, config: Config, *, check: bool = True) -> _Claimed | None:
    """Lock a message and read its state; None when another runner holds it or it is gone.
    Raises SpoolCorrupt (message unlocked) for a file damaged after it was accepted; with
    ``check`` False the whole-file check is left to the one every copy makes at its end
    (a cursor over the whole message refuses to return its last bytes if they do not match
    the footer, so no server sees the end of data and no mailbox a complete copy)."""
    claim = spool.locked(qid)
    got = claim.__enter__()
    if got is None:
        claim.__exit__(None, None, None)
        return None
    msg, env = got
    try:
        if check:
            # Never deliver a copy of a file that was damaged after it was accepted, and
            # say so before trying.
            msg.verify()
        return _Claimed(spool, claim, msg, env, spool.states(env), config, time.time())
    except BaseException:
        claim.__exit__(None, None, None)
        raise


def deliver_message(spool: Spool, qid: str, config: Config, log: Log,
                    pool: smtp.ConnectionPool | None = None, *,
                    fresh: bool = False) -> RunResult:
    """Attempt every pending recipient of one message now; bounce and remove it once no
    recipient is left to try.  ``pool`` keeps SMTP sessions open across messages.
    ``fresh``: the message was committed by this submission a moment ago, so it is not read
    once more just to check it before it is sent (each copy is still checked at its end;
    a 70 MB message reaches the server ~12 ms sooner)."""
    c = _claim(spool, qid, config, check=not fresh)
    if c is None:
        return RunResult(qid, [], claimed=False)
    try:
        outcomes = _attempt(c, config, log, pool)
        notice = _conclude(c, outcomes, config, log)
    finally:
        c.release()
    if notice is not None:
        # The sender hears at once, as with C dma; if this attempt defers, the queue retries.
        deliver_message(spool, notice, config, log, pool)
    return RunResult(qid, outcomes)


def _attempt(c: _Claimed, config: Config, log: Log,
             pool: smtp.ConnectionPool | None) -> list[Outcome]:
    """Try every pending recipient of a claimed message once: local users in this thread,
    remote destinations in parallel threads.  With more than one destination each result
    is journalled as soon as it is known (a crash then repeats only what was unfinished)."""
    msg, env, plan = c.msg, c.env, c.plan
    if len(plan.remote) == 1 and not plan.local:
        # The common case (one smarthost): no thread to start for a single destination.
        return _remote(msg, env, plan.remote[0], config, log, pool)
    if len(plan.remote) + len(plan.local) <= 1:
        return _deliver_local(msg, env, plan.local, config)
    outcomes: list[Outcome] = []

    def done(results: Sequence[Outcome]) -> None:
        results = _expire(c, results, config, log)
        for o in results:
            _journal(c, o, log)
        outcomes.extend(results)

    if not plan.remote:
        for user in plan.local:
            done(_deliver_local(msg, env, [user], config))
        return outcomes
    from concurrent.futures import ThreadPoolExecutor, as_completed

    workers = max(1, min(config.max_parallel, len(plan.remote)))
    with ThreadPoolExecutor(workers) as workers_pool:
        futures = [workers_pool.submit(_remote, msg, env, d, config, log, pool)
                   for d in plan.remote]
        # Local deliveries run meanwhile in this thread; results are journalled as soon as
        # each is known (only this thread writes the journal).
        for user in plan.local:
            done(_deliver_local(msg, env, [user], config))
        for f in as_completed(futures):
            done(f.result())
    return outcomes


def _expire(c: _Claimed, results: Sequence[Outcome], config: Config,
            log: Log) -> list[Outcome]:
    """Deferred past the message's lifetime becomes failed; local results are logged."""
    out = []
    for o in results:
        if o.status == "deferred" and c.expired:
            o = Outcome(o.recipient, "failed",
                        f"gave up after {config.lifetime / 86400:g} days in the queue; last "
                        f"error: {o.reply}", _permanent(o.dsn), o.relay)
        if o.relay.startswith(("mbox:", "maildir:")) or c.expired:
            # SMTP attempts are logged by smtp.deliver, one line per destination.
            log.info(f"{c.queue_id}: to=<{o.recipient}> relay={o.relay or 'none'} "
                     f"status={o.status} ({o.reply})")
        out.append(o)
    return out


def _journal(c: _Claimed, o: Outcome, log: Log) -> None:
    try:
        c.spool.record(c.queue_id, o)
    except OSError as e:
        # The outcome is lost, not the message: it stays queued and this recipient may get
        # a second copy on the next run.
        log.error(f"{c.queue_id}: cannot write the journal ({e.strerror}); "
                  f"<{o.recipient}> may receive this message again")
    st = c.states.get(o.recipient)
    if st is not None:
        st.status, st.reply, st.dsn, st.relay = o.status, o.reply, o.dsn, o.relay
        st.attempts += 1
        st.last_attempt = time.time()


def _conclude(c: _Claimed, outcomes: list[Outcome], config: Config, log: Log) -> str | None:
    """After an attempt: journal what is not journalled yet, then remove the message when
    nobody is left to try (after its bounce is spooled) or send a delay notice.  Returns the
    id of a notice to deliver next.  A message every recipient of which is now delivered is
    removed without writing its journal first: a crash in between repeats the delivery,
    as a crash before the journal write would."""
    journalled = len(c.plan.remote) + len(c.plan.local) > 1
    if not journalled:
        outcomes[:] = _expire(c, outcomes, config, log)
        tried = {o.recipient for o in outcomes}
        if all(o.status == "delivered" for o in outcomes) and all(
                c.states[r].status == "delivered" for r in c.env.recipients
                if r not in tried):
            c.spool.remove(c.queue_id, held=False)
            return None
        for o in outcomes:
            _journal(c, o, log)
    return _finish(c.spool, c.msg, c.env, c.states, config, log) or _warn_delay(
        c.spool, c.msg, c.env, c.states, config, log)


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


def _warn_delay(spool: Spool, msg: _core.MessageFile, env: Envelope,
                states: dict[str, RecipientState], config: Config, log: Log) -> str | None:
    """One "still trying" notice (Action: delayed) per message, once DELAY_WARNING is
    exceeded; never for notices dma generated itself."""
    if config.delay_warning is None or env.notice or not env.sender:
        return None
    if time.time() - env.created < config.delay_warning:
        return None
    deferred = [s for s in states.values() if s.status == "deferred"]
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


def _finish(spool: Spool, msg: _core.MessageFile, env: Envelope,
            states: dict[str, RecipientState], config: Config, log: Log) -> str | None:
    """Remove the message when nobody is left to try, after its bounce is safely spooled
    (never before: if the bounce cannot be spooled, the message stays and we try again)."""
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


def _deliver_local(msg: _core.MessageFile, env: Envelope, users: Sequence[str],
                   config: Config) -> list[Outcome]:
    if not users:
        return []
    from dma import local

    return [local.deliver(msg, env.sender, user, config, now=time.time()) for user in users]


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
    return _Run(spool, config, log, ids, due_only, now, pool).run()


class _Run:
    """One queue run.  Consecutive messages whose pending recipients all go to the same
    remote destination are sent back to back over one session (``smtp.deliver_many``);
    any other message is attempted on its own.  One message's trouble (a damaged file, a
    full spool disk) never stops the run for the others."""

    def __init__(self, spool: Spool, config: Config, log: Log, ids: Sequence[str],
                 due_only: bool, now: float, pool: smtp.ConnectionPool) -> None:
        self.spool = spool
        self.config = config
        self.log = log
        self.ids = iter(ids)
        self.due_only = due_only
        self.now = now
        self.pool = pool
        self.results: list[RunResult] = []
        self._stash: _Claimed | None = None

    def run(self) -> list[RunResult]:
        while (c := self._next()) is not None:
            dest = c.one_destination
            if dest is None:
                self._alone(c)
            else:
                self._batch(c, dest)
        return self.results

    def _next(self) -> _Claimed | None:
        """The next message to attempt, locked (None when the run is through)."""
        if self._stash is not None:
            stashed, self._stash = self._stash, None
            return stashed
        for qid in self.ids:
            try:
                c = _claim(self.spool, qid, self.config)
            except SpoolCorrupt as e:
                self.log.error(f"{qid}: refusing to deliver a damaged queue file ({e}); "
                               f"inspect it with 'dma queue show {qid}' or remove it with "
                               f"'dma queue delete {qid}'")
                self.results.append(RunResult(qid, [], claimed=False, error=str(e)))
                continue
            except ConfigError:
                raise  # the run's configuration, not this message: stop with it
            except (DmaError, OSError) as e:
                self.log.error(f"{qid}: unreadable queue file, not delivered: {e}")
                self.results.append(RunResult(qid, [], claimed=False, error=str(e)))
                continue
            if c is None:
                if not self.due_only:
                    self.results.append(RunResult(qid, [], claimed=False))
                continue
            if self.due_only and not is_due(c.states, self.config, self.now):
                c.release()
                continue
            return c
        return None

    def _alone(self, c: _Claimed) -> None:
        try:
            self._conclude(c, _attempt(c, self.config, self.log, self.pool))
        except OSError as e:
            self._failed(c, e)

    def _batch(self, first: _Claimed, dest: route.Destination) -> None:
        from dma import smtp

        try:
            hosts = route.resolve(dest, self.config)
        except route.RouteError:
            self._alone(first)  # which records and logs the routing failure
            return
        taken: list[_Claimed] = []

        def jobs() -> Iterator[_Claimed]:
            c: _Claimed | None = first
            while c is not None:
                taken.append(c)
                yield c
                c = self._next()
                if c is not None:
                    other = c.one_destination
                    if other is None or (other.kind, other.name) != (dest.kind, dest.name):
                        self._stash = c
                        return

        try:
            for c, outs in smtp.deliver_many(jobs(), hosts, dest, self.config,
                                             _auth_table(self.config, self.log), self.log,
                                             self.pool):
                taken.remove(c)
                try:
                    self._conclude(c, outs)
                except OSError as e:
                    self._failed(c, e)
        finally:
            for c in taken:  # taken but never answered: the run was cut short
                c.release()

    def _conclude(self, c: _Claimed, outcomes: list[Outcome]) -> None:
        try:
            notice = _conclude(c, outcomes, self.config, self.log)
        finally:
            c.release()
        self.results.append(RunResult(c.queue_id, outcomes))
        if notice is not None:
            deliver_message(self.spool, notice, self.config, self.log, self.pool)

    def _failed(self, c: _Claimed, e: OSError) -> None:
        c.release()
        self.log.error(f"{c.queue_id}: delivery attempt failed: {e}; the message stays queued")
        self.results.append(RunResult(c.queue_id, [], claimed=False, error=str(e)))


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
