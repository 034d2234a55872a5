"""Four ``dma -q`` runners at once over 500 queued messages with 3 remote recipients each,
against a smarthost that defers recipients at random: in the end every recipient has
exactly one copy (per-message locks, per-recipient journal)."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections import Counter

import pytest

import dma
from conftest import DmaSite
from smtpd import Behaviour, ScriptedServer

pytestmark = pytest.mark.usefixtures("root_only")

MESSAGES = 500
ROUNDS = 25


def test_four_runners_random_deferrals(site: DmaSite) -> None:
    rng = random.Random(1234)
    lock = threading.Lock()

    def rcpt_reply(addr: str) -> bytes:
        with lock:
            defer = rng.random() < 0.3
        return b"451 4.3.0 try again later\r\n" if defer else b"250 2.1.5 Ok\r\n"

    with ScriptedServer(Behaviour(rcpt_reply=rcpt_reply)) as server:
        site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {server.port}\n")
        cfg = dma.load_config(str(site.conf))
        expected = Counter[tuple[str, str]]()
        for i in range(MESSAGES):
            rcpts = [f"m{i}r{j}@example.org" for j in range(3)]
            dma.send(f"Subject: n{i}\n\nmessage {i}\n".encode(), recipients=rcpts,
                     sender="root@mail.test", config=cfg, deliver=False)
            expected.update((r, f"message {i}") for r in rcpts)
        assert len(site.queue_ids()) == MESSAGES

        deadline = time.monotonic() + 240
        rounds = 0
        while site.queue_ids() and rounds < ROUNDS and time.monotonic() < deadline:
            rounds += 1
            runners = [subprocess.Popen([site.exe, "-q"], env=site.env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                       for _ in range(4)]
            for p in runners:
                _, err = p.communicate(timeout=240)
                assert p.returncode == 0, err
        assert site.queue_ids() == [], f"still queued after {rounds} rounds"

        got = Counter[tuple[str, str]]()
        for t in server.transactions:
            text = t.data.split(b"\r\n\r\n", 1)[1].decode().strip()
            got.update((r, text) for r in t.rcpts)
    duplicates = {k: n for k, n in got.items() if n > 1}
    assert not duplicates
    assert got == expected
    print(f"{MESSAGES} messages x 3 recipients, 4 runners: {rounds} rounds, "
          f"{len(server.sessions)} connections, {len(server.transactions)} transactions")
