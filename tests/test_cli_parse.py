"""The sendmail persona's option parsing: C dma's getopt string, glibc permutation."""

from __future__ import annotations

import pytest

from dma.cli import parse
from dma.errors import UsageError


def test_cron_flags() -> None:
    o = parse(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], "sendmail")
    assert o.full_name == "CronDaemon" and not o.dot_ends and o.recipients == ["root"]


def test_mutt_and_options_after_operands() -> None:
    o = parse(["root", "-oem", "-oi", "--", "-notanoption"], "sendmail")
    assert o.recipients == ["root", "-notanoption"] and not o.dot_ends


def test_attached_and_separate_values() -> None:
    o = parse(["-f", "a@b", "-rc@d", "-tv", "-Lmyident", "-Cx.conf", "u"], "dma")
    assert o.sender == "c@d" and o.from_headers and o.verbose
    assert o.ident == "myident" and o.config_path == "x.conf"


@pytest.mark.parametrize("argv", [["-q"], ["-q30m"], ["-q", "-v"], ["-v", "-q"]])
def test_q_optional_value(argv: list[str]) -> None:
    o = parse(argv, "dma")
    assert o.mode == "queue-run" and o.recipients == []


def test_q_with_id() -> None:
    assert parse(["-qIABC123"], "dma").queue_ids == ["ABC123"]


def test_modes() -> None:
    assert parse(["-bp"], "dma").mode == "list"
    assert parse(["-bi"], "dma").mode == "newaliases"
    assert parse(["-bq", "x"], "dma").queue_only
    assert parse(["-odq", "x"], "dma").queue_only
    assert parse(["-D", "x"], "dma").foreground
    assert parse(["-odi", "x"], "dma").foreground
    assert parse([], "mailq").mode == "list"
    assert parse(["-whatever"], "newaliases").mode == "newaliases"


@pytest.mark.parametrize("argv,needle", [
    (["-x"], "-x"), (["-f"], "-f"), (["-bp", "root"], "mutually exclusive"),
    (["root", "-q"], "mutually exclusive"), (["-bz"], "-bz"), (["-bs"], "-bs"),
])
def test_usage_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse(argv, "sendmail")


def test_mailq_takes_no_arguments() -> None:
    with pytest.raises(UsageError):
        parse(["x"], "mailq")


def test_ignored_flags_accepted() -> None:
    o = parse(["-Ac", "-Am", "-dX", "-hN", "-NNEVER", "-O", "x=y", "-RHDRS", "-U", "-n",
               "-Vabc", "-Xlog", "-oem", "-odb", "u"], "sendmail")
    assert o.recipients == ["u"] and o.mode == "send"
