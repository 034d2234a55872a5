"""Retry timing and the in-process retry used where no queue runner is installed."""

from __future__ import annotations

import time

import pytest

from conftest import DmaSite
from dma import config as config_mod
from dma.log import Log
from dma.queue import is_due, next_attempt, retry_until_done
from dma.spool import RecipientState, Spool
from smtpd import Behaviour, ScriptedServer

CFG = config_mod.Config().replace(retry_min=300.0, retry_max=10800.0)


def deferred(attempts: int, last: float) -> RecipientState:
    return RecipientState("a@b", "deferred", attempts, "451 later", "4.0.0", "", last)


def test_backoff_doubles_up_to_the_cap() -> None:
    waits = [next_attempt(deferred(n, 1000.0), CFG) - 1000.0 for n in range(1, 9)]  # type: ignore[operator]
    assert waits == [300, 600, 1200, 2400, 4800, 9600, 10800, 10800]
    assert next_attempt(RecipientState("a@b"), CFG) == 0.0
    assert next_attempt(RecipientState("a@b", "delivered", 1), CFG) is None


def test_due_and_clock_jumps() -> None:
    now = 100_000.0
    assert not is_due({"a": deferred(1, now - 10)}, CFG, now)
    assert is_due({"a": deferred(1, now - 301)}, CFG, now)
    # The clock went back a day: the last attempt looks far in the future. It must not
    # postpone the retry by a day.
    assert is_due({"a": deferred(1, now + 86400)}, CFG, now)
    assert not is_due({"a": RecipientState("a", "delivered", 1)}, CFG, now)


def test_retry_until_done_waits_for_the_server(site: DmaSite, root_only: None) -> None:
    with ScriptedServer(Behaviour()) as probe:
        port = probe.port  # now closed: connections are refused
    site.write_conf(f"SMARTHOST 127.0.0.1\nPORT {port}\nRETRY_MIN 1s\nRETRY_MAX 2s\n")
    r = site.run("-bq", "-f", "root@mail.test", "a@example.org", input=b"Subject: r\n\nx\n")
    assert r.returncode == 0, r.stderr
    (qid,) = site.queue_ids()
    cfg = config_mod.load(str(site.conf))
    servers: list[ScriptedServer] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if not servers:
            servers.append(ScriptedServer(Behaviour(), port=port).start())
        time.sleep(seconds)

    try:
        result = retry_until_done(Spool(cfg.spooldir), qid, cfg, Log(use_syslog=False,
                                  fallback_path=str(site.root / "dma.log")), sleep=sleep)
        assert not result.pending
        assert len(waits) == 1 and 0.5 <= waits[0] <= 1.5
        (t,) = servers[0].transactions
        assert t.rcpts == ["a@example.org"]
        assert site.queue_ids() == []
        assert "no queue runner is installed" in (site.root / "dma.log").read_text()
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("installed", [False, True])
def test_runner_detection(tmp_path: object, installed: bool) -> None:
    from pathlib import Path

    from dma import hostsetup

    root = Path(str(tmp_path))
    cron = root / "etc/cron.d/dma"
    cron.parent.mkdir(parents=True)
    cron.write_text((hostsetup.MARKER + "\n" if installed else "") + "* * * * * root x\n")
    assert hostsetup.runner_installed(str(root)) is installed
