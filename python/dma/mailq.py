"""What ``mailq`` / ``sendmail -bp`` / ``dma queue list`` print: Postfix's layout, one block per
message, with each recipient's state, attempts, last reply and next retry, read from the spool
without locks; and the same as JSON for monitoring."""

from __future__ import annotations

import time

from dma.config import Config
from dma.queue import next_attempt
from dma.spool import QueueEntry, Spool


def _clock(t: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(t))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render_entries(entries: list[QueueEntry], config: Config, now: float | None = None) -> str:
    if not entries:
        return "Mail queue is empty\n"
    now = time.time() if now is None else now
    out = ["-Queue ID-          --Size-- ----Arrival Time---- -Sender/Recipient-------\n"]
    total = 0
    pad = " " * 50
    for e in entries:
        total += e.size
        mark = "!" if e.held else " "
        if e.envelope is None:
            out.append(f"{e.id:<18}{mark} {e.size:>8} {_clock(e.mtime)}  "
                       f"(unreadable: {e.error})\n\n")
            continue
        env = e.envelope
        out.append(f"{e.id:<18}{mark} {e.size:>8} {_clock(env.created)}  {env.sender or '<>'}"
                   f"  (age {_age(now - env.created)}{', on hold' if e.held else ''})\n")
        for rcpt, st in e.states.items():
            if st.status in ("delivered", "failed"):
                continue
            if st.attempts:
                nxt = next_attempt(st, config)
                when = f"; next try {_clock(nxt)}" if nxt and not e.held else ""
                out.append(f"{pad}({st.status} after {st.attempts} attempt"
                           f"{'s' if st.attempts != 1 else ''}{when}: {st.reply})\n")
            out.append(f"{pad}{rcpt}\n")
        out.append("\n")
    kbytes = (total + 1023) // 1024
    n = len(entries)
    out.append(f"-- {kbytes} Kbytes in {n} Request{'s' if n != 1 else ''}.\n")
    return "".join(out)


def as_json(entries: list[QueueEntry], config: Config, now: float | None = None
            ) -> dict[str, object]:
    now = time.time() if now is None else now
    messages = []
    for e in entries:
        doc: dict[str, object] = {"id": e.id, "size": e.size, "held": e.held}
        if e.envelope is None:
            doc["error"] = e.error
        else:
            env = e.envelope
            doc.update(sender=env.sender, created=env.created, age=now - env.created,
                       submitted_by=env.user, uid=env.uid, recipients=[
                           {"recipient": st.recipient, "status": st.status,
                            "attempts": st.attempts, "last_reply": st.reply, "dsn": st.dsn,
                            "relay": st.relay, "last_attempt": st.last_attempt,
                            "next_attempt": next_attempt(st, config)}
                           for st in e.states.values()])
        messages.append(doc)
    return {"count": len(messages), "size": sum(e.size for e in entries), "messages": messages}


def render(config: Config) -> str:
    return render_entries(Spool(config.spooldir).listing(), config)
