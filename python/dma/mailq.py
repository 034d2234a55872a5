"""What ``mailq`` / ``sendmail -bp`` prints: Postfix's layout, one block per message, with
each recipient's state and the last reply, read from the spool without locks."""

from __future__ import annotations

import time

from dma.config import Config
from dma.spool import QueueEntry, Spool


def _arrival(t: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(t))


def render_entries(entries: list[QueueEntry]) -> str:
    if not entries:
        return "Mail queue is empty\n"
    out = ["-Queue ID-          --Size-- ----Arrival Time---- -Sender/Recipient-------\n"]
    total = 0
    for e in entries:
        total += e.size
        if e.envelope is None:
            out.append(f"{e.id:<19} {e.size:>8} {_arrival(e.mtime)}  (unreadable: {e.error})\n\n")
            continue
        env = e.envelope
        out.append(f"{e.id:<19} {e.size:>8} {_arrival(env.created)}  {env.sender or '<>'}\n")
        for rcpt, st in e.states.items():
            if st.status in ("delivered", "failed"):
                continue
            if st.attempts:
                out.append(f"{'':<50}({st.status} after {st.attempts} attempt"
                           f"{'s' if st.attempts != 1 else ''}: {st.reply})\n")
            out.append(f"{'':<50}{rcpt}\n")
        out.append("\n")
    kbytes = (total + 1023) // 1024
    n = len(entries)
    out.append(f"-- {kbytes} Kbytes in {n} Request{'s' if n != 1 else ''}.\n")
    return "".join(out)


def render(config: Config) -> str:
    return render_entries(Spool(config.spooldir).listing())
