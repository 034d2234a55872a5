"""Header rewriting at submission (dma.message), on real byte strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dma import message

IDENT = message.Identity(sender="alice@mail.test", user="alice", uid=1000,
                         mailname="mail.test", version="9")
NOW = 1_700_000_000.0


def rewrite(head: bytes, ident: message.Identity = IDENT) -> bytes:
    return message.rewrite(message.parse_head(head), ident, "QID1", NOW)


def test_received_first_and_missing_headers_added() -> None:
    out = rewrite(b"Subject: hi\n\nbody\n")
    assert out.startswith(b"Received: from alice (uid 1000)\n\t(envelope-from <alice@mail.test>)")
    assert b"\tid QID1\n\tby mail.test (dma 9);\n" in out
    head, body = out.split(b"\n\n", 1)
    assert body == b"body\n"
    lines = head.split(b"\n")
    assert lines[-3].startswith(b"Date: ")
    assert lines[-2] == b"Message-ID: <QID1@mail.test>"
    assert lines[-1] == b"From: alice@mail.test"


def test_existing_headers_are_kept_case_insensitively() -> None:
    out = rewrite(b"FROM: Bob <bob@x>\ndate: Mon, 1 Jan 2024 00:00:00 +0000\n"
                  b"message-id: <a@b>\n\nbody\n")
    assert out.count(b"From:") + out.count(b"FROM:") == 1
    assert b"\nDate:" not in out and b"Message-ID:" not in out


def test_bcc_removed_with_continuations() -> None:
    out = rewrite(b"To: a@x\nBcc: secret@x,\n  other@x\nSubject: s\n\nb\n")
    assert b"secret" not in out and b"other@x" not in out
    assert b"To: a@x\nSubject: s\n" in out


def test_recipient_headers_unfolded() -> None:
    head = message.parse_head(b"To: a@x,\n\tb@x\ncc: c@x\nBCC: d@x\nResent-To: e@x\n\n")
    assert message.header_recipients(head) == ["a@x, b@x", "c@x", "d@x"]


def test_leading_from_line_dropped() -> None:
    out = rewrite(b"From alice Mon Jan  1 00:00:00 2024\nSubject: s\n\nb\n")
    assert b"From alice Mon" not in out
    assert b"Subject: s\n" in out


def test_no_separator_gets_one() -> None:
    out = rewrite(b"hello there\nsecond\n")
    head, body = out.split(b"\n\n", 1)
    assert body == b"hello there\nsecond\n"
    assert b"Message-ID" in head


def test_headers_then_body_without_empty_line() -> None:
    out = rewrite(b"Subject: s\nthis is body\n")
    head, body = out.split(b"\n\n", 1)
    assert head.endswith(b"From: alice@mail.test") and b"Subject: s" in head
    assert body == b"this is body\n"


def test_headers_only_message_and_missing_final_newline() -> None:
    out = rewrite(b"Subject: only")
    assert b"Subject: only\n" in out
    assert b"\n\n" not in out


def test_empty_message() -> None:
    out = rewrite(b"")
    assert out.startswith(b"Received:") and out.endswith(b"From: alice@mail.test\n")


def test_full_name_and_null_sender() -> None:
    named = message.Identity(sender="a@b", user="a", uid=1, full_name="Ann O'Neil, Jr.",
                             mailname="m")
    assert b'From: "Ann O\'Neil, Jr." <a@b>\n' in rewrite(b"\n", named)
    utf8 = message.Identity(sender="a@b", user="a", uid=1, full_name="Jos\u00e9", mailname="m")
    assert b"From: =?utf-8?b?Sm9zw6k=?= <a@b>\n" in rewrite(b"\n", utf8)
    null = message.Identity(sender="", user="MAILER-DAEMON", uid=0, mailname="m")
    assert b"From: <>\n" in rewrite(b"\n", null)


@given(st.lists(st.sampled_from([b"Subject: x\n", b"To: a@b\n", b" cont\n", b"junk\n",
                                 b"\n", b"From y\n", b"Bcc: z@b\n", b"X:\n"]), max_size=12))
def test_rewrite_keeps_everything_but_bcc(parts: list[bytes]) -> None:
    head = b"".join(parts)
    out = rewrite(head)
    parsed = message.parse_head(head)
    kept = b"".join(h.raw for h in parsed.headers if h.key != b"bcc")
    assert kept in out
    assert out.endswith(parsed.rest)
