"""End to end: the installed ``dma``/``sendmail``/``mailq``/``newaliases`` executables, a
private configuration, real spool files and real mailboxes."""

from __future__ import annotations

import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DmaSite, run_measured

pytestmark = pytest.mark.usefixtures("root_only")


def messages(mbox: bytes) -> list[bytes]:
    parts = re.split(rb"(?m)^From (?=\S+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n)", mbox)
    return [p for p in parts if p]


def body_of(msg: bytes) -> bytes:
    return msg.split(b"\n\n", 1)[1]


def test_version(site: DmaSite) -> None:
    r = site.run("--version")
    assert r.returncode == 0
    assert r.stdout.startswith(b"dma ")


def test_first_mail_reaches_root_mbox(site: DmaSite) -> None:
    r = site.run("root", input=b"Subject: hello\n\nfirst mail\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    data = site.wait_mailbox("root")
    assert re.match(rb"From root@mail\.test \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n", data)
    (msg,) = messages(data)
    assert b"\nReceived: from root (uid 0)\n" in msg
    assert b"\nSubject: hello\n" in msg
    assert re.search(rb"\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\n", msg)
    assert re.search(rb"\nMessage-ID: <[0-9A-F]+@mail\.test>\n", msg)
    assert b"\nFrom: " in msg
    assert data.endswith(b"\n\nfirst mail\n\n")
    st = site.mailbox("root").stat()
    assert st.st_mode & 0o777 == 0o660
    assert st.st_uid == 0
    # delivered: the spool is empty again
    assert site.queue_ids() == []


def test_foreground_delivery_exit_status(site: DmaSite) -> None:
    r = site.run("-D", "root", input=b"Subject: fg\n\nbody\n")
    assert r.returncode == 0, r.stderr
    assert b"Subject: fg" in site.mailbox("root").read_bytes()


def test_queue_only_then_mailq_then_flush(site: DmaSite) -> None:
    assert site.run(prog="mailq").stdout == b"Mail queue is empty\n"
    r = site.run("-bq", "-f", "alice@example.org", "root", input=b"Subject: q\n\nqueued\n")
    assert r.returncode == 0, r.stderr
    (qid,) = site.queue_ids()
    listing = site.run(prog="mailq")
    assert listing.returncode == 0
    assert qid.encode() in listing.stdout
    assert b"alice@example.org" in listing.stdout
    assert b"root" in listing.stdout
    def without_age(out: bytes) -> bytes:  # the age column moves with the clock
        return re.sub(rb"\(age \w+", b"(age", out)

    assert without_age(site.run("-bp").stdout) == without_age(listing.stdout)
    assert not site.mailbox().exists()
    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    assert b"queued" in site.mailbox().read_bytes()
    assert site.queue_ids() == []


def test_defer_directive_only_queues(site: DmaSite) -> None:
    site.write_conf("DEFER\n")
    assert site.run("root", input=b"\nx\n").returncode == 0
    assert len(site.queue_ids()) == 1
    assert site.run("-qI" + site.queue_ids()[0]).returncode == 0
    assert site.queue_ids() == []
    assert site.mailbox().exists()


def test_sendmail_name_and_real_caller_flags(site: DmaSite) -> None:
    # cron, mutt, PHP mail(), git send-email, mailx
    calls = [
        ("sendmail", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]),
        ("sendmail", ["-oem", "-oi", "--", "root"]),
        ("sendmail", ["-t", "-i"]),
        ("sendmail", ["-i", "root"]),
        ("dma", ["root", "-oi", "-odi"]),
    ]
    for prog, args in calls:
        body = b"To: root\nSubject: " + " ".join(args).encode() + b"\n\nhi\n"
        r = site.run("-D" if prog == "dma" else "-odi", *args, input=body, prog=prog)
        assert r.returncode == 0, (prog, args, r.stderr)
    data = site.mailbox().read_bytes()
    assert len(messages(data)) == len(calls)
    assert b"From: CronDaemon <root@mail.test>" in data


def test_newaliases_checks_the_file(site: DmaSite) -> None:
    assert site.run(prog="newaliases").returncode == 0
    site.aliases.write_text("root: \n: broken\n")
    r = site.run(prog="newaliases")
    assert r.returncode == 78
    assert str(site.aliases).encode() in r.stderr


def test_aliases_expand(site: DmaSite) -> None:
    r = site.run("-D", "abuse", input=b"Subject: a\n\nb\n")
    assert r.returncode == 0, r.stderr
    assert b"Subject: a" in site.mailbox("root").read_bytes()
    assert b"Subject: a" in site.mailbox("daemon").read_bytes()
    assert site.mailbox("daemon").stat().st_uid == pwd.getpwnam("daemon").pw_uid


def test_t_takes_recipients_and_drops_bcc(site: DmaSite) -> None:
    msg = (b"To: Root <root@mail.test>\nCc: daemon\nBcc: nobody@localhost\n"
           b"Subject: t\n\nbody\n")
    r = site.run("-D", "-t", input=msg)
    assert r.returncode == 0, r.stderr
    for user in ("root", "daemon", "nobody"):
        got = site.mailbox(user).read_bytes()
        assert b"Subject: t" in got
        assert b"Bcc" not in got


def test_sender_rules(site: DmaSite) -> None:
    site.run("-D", "-f", "someone@example.org", "root", input=b"\n1\n")
    site.run("-D", "root", input=b"\n2\n", env=site.env(EMAIL="env@example.net"))
    site.run("-D", "-f", "bob", "root", input=b"\n3\n")
    site.write_conf("MASQUERADE masq.example\n")
    site.run("-D", "-f", "carol@elsewhere", "root", input=b"\n4\n")
    senders = re.findall(rb"(?m)^From (\S+) ", site.mailbox().read_bytes())
    assert senders == [b"someone@example.org", b"env@example.net", b"bob@mail.test",
                       b"carol@masq.example"]


def test_dot_line_ends_input_unless_i(site: DmaSite) -> None:
    site.run("-D", "root", input=b"Subject: d\n\nbefore\n.\nafter\n")
    site.run("-D", "-i", "root", input=b"Subject: i\n\nbefore\n.\nafter\n")
    a, b = messages(site.mailbox().read_bytes())
    assert body_of(a) == b"before\n\n"
    assert body_of(b) == b"before\n.\nafter\n\n"


def test_bytes_kept_exact_long_lines_nul_crlf(site: DmaSite) -> None:
    long_line = b"x" * 10_000
    body = b"a\x00b\n" + long_line + b"\r\n\xff\xfe 8-bit\r\nFrom me\nlast"
    r = site.run("-D", "root", input=b"Subject: raw\r\n\r\n" + body)
    assert r.returncode == 0, r.stderr
    (msg,) = messages(site.mailbox().read_bytes())
    assert body_of(msg) == (b"a\x00b\n" + long_line + b"\n\xff\xfe 8-bit\n>From me\nlast\n\n")


def test_crlf_input_gets_missing_headers(site: DmaSite) -> None:
    r = site.run("-D", "root", input=b"Subject: crlf\r\n\r\nbody\r\n")
    assert r.returncode == 0
    (msg,) = messages(site.mailbox().read_bytes())
    head = msg.split(b"\n\n", 1)[0]
    for name in (b"Date:", b"Message-ID:", b"From:", b"Subject: crlf"):
        assert b"\n" + name in head
    assert b"\r" not in msg


def test_message_without_separator(site: DmaSite) -> None:
    r = site.run("-D", "root", input=b"just a line of text\nand another\n")
    assert r.returncode == 0, r.stderr
    (msg,) = messages(site.mailbox().read_bytes())
    head, body = msg.split(b"\n\n", 1)
    assert b"Message-ID:" in head
    assert body == b"just a line of text\nand another\n\n"


def test_empty_message(site: DmaSite) -> None:
    r = site.run("-D", "root", input=b"")
    assert r.returncode == 0, r.stderr
    (msg,) = messages(site.mailbox().read_bytes())
    assert b"Message-ID:" in msg


# --- bad input: one clear line, the right sysexits code, nothing spooled -------------

def assert_one_line(stderr: bytes, *needles: bytes) -> None:
    assert stderr.count(b"\n") == 1, stderr
    assert stderr.startswith(b"dma: ")
    for n in needles:
        assert n in stderr, (n, stderr)


def test_malformed_config_line(site: DmaSite) -> None:
    site.write_conf("PORT abc\n")
    r = site.run("root", input=b"\nx\n")
    assert r.returncode == 78
    line = len(site.conf.read_text().splitlines())
    assert_one_line(r.stderr, f"{site.conf}:{line}:".encode(), b"PORT")
    assert site.queue_ids() == []


def test_unknown_directive(site: DmaSite) -> None:
    site.write_conf("SECURE\n")
    r = site.run("root", input=b"\nx\n")
    assert r.returncode == 78
    assert_one_line(r.stderr, str(site.conf).encode(), b"SECURE")


def test_unreadable_config(site: DmaSite) -> None:
    env = site.env(DMA_CONF=str(site.root))  # a directory
    r = site.run("root", input=b"\nx\n", env=env)
    assert r.returncode == 78
    assert_one_line(r.stderr, str(site.root).encode())
    r = site.run("-C", str(site.root / "missing.conf"), "root", input=b"\nx\n")
    assert r.returncode == 78
    assert_one_line(r.stderr, b"missing.conf")


@pytest.mark.parametrize("rcpt", ["a@@b", "bad address@example.org", "x@-bad-.org",
                                  "../../etc/passwd", "a\rb@example.org"])
def test_bad_address(site: DmaSite, rcpt: str) -> None:
    r = site.run(rcpt, input=b"\nx\n")
    assert r.returncode == 65, r.stderr
    assert_one_line(r.stderr)
    assert site.queue_ids() == [] and site.tmp_debris() == []


def test_unknown_local_user(site: DmaSite) -> None:
    r = site.run("root", "no-such-user-xyz", input=b"\nx\n")
    assert r.returncode == 65
    assert_one_line(r.stderr, b"no-such-user-xyz")
    assert site.queue_ids() == []


def test_no_recipients(site: DmaSite) -> None:
    r = site.run(input=b"\nx\n")
    assert r.returncode == 66
    assert_one_line(r.stderr, b"no recipients")
    r = site.run("-t", input=b"Subject: none\n\nx\n")
    assert r.returncode == 66
    assert_one_line(r.stderr, b"no recipients")
    assert site.queue_ids() == [] and site.tmp_debris() == []


def test_invalid_option(site: DmaSite) -> None:
    r = site.run("-x", "root")
    assert r.returncode == 64
    assert_one_line(r.stderr, b"-x")
    r = site.run("-bp", "root")
    assert r.returncode == 64
    r = site.run("root", prog="mailq")
    assert r.returncode == 64


@pytest.fixture
def tiny_spool(site: DmaSite) -> Iterator[Path]:
    site.spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(site.spool)],
                   check=True)
    yield site.spool
    subprocess.run(["umount", str(site.spool)], check=True)


def test_spool_full(site: DmaSite, tiny_spool: Path) -> None:
    big = b"Subject: big\n\n" + b"y" * 1_000_000 + b"\n"
    r = site.run("root", input=big)
    assert r.returncode == 75, r.stderr
    assert_one_line(r.stderr, b"spool is full")
    assert site.queue_ids() == [] and site.tmp_debris() == []
    # a small one still fits: the failure left nothing behind
    r = site.run("-bq", "root", input=b"Subject: small\n\nok\n")
    assert r.returncode == 0, r.stderr
    assert len(site.queue_ids()) == 1


def test_mailbox_symlink_is_refused(site: DmaSite) -> None:
    target = site.root / "victim"
    target.write_bytes(b"precious\n")
    site.mailbox("root").symlink_to(target)
    r = site.run("-D", "root", input=b"Subject: s\n\nx\n")
    assert r.returncode != 0
    assert target.read_bytes() == b"precious\n"
    assert site.mailbox("root").is_symlink()


def test_large_message_memory_stays_flat(site: DmaSite, tmp_path: Path) -> None:
    src = tmp_path / "big.eml"
    line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 2)[:71] + b"\n"
    with open(src, "wb") as f:
        f.write(b"Subject: big\n\n")
        chunk = line * (1 << 14)
        for _ in range(200 * (1 << 20) // len(chunk)):
            f.write(chunk)
    exe = shutil.which("dma")
    assert exe
    with open(src, "rb") as stdin:
        code, peak_mb, err = run_measured([exe, "-D", "root"], stdin=stdin.fileno(),
                                          env=site.env())
    assert code == 0, err
    print(f"peak RSS submitting + delivering 200 MB: {peak_mb:.1f} MB")
    assert peak_mb < 80
    size = site.mailbox().stat().st_size
    assert size > src.stat().st_size


def _fill_up(tiny_spool: Path) -> Path:
    filler = tiny_spool / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the spool's filesystem to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_full_spool_after_delivery_loses_nothing(site: DmaSite, tiny_spool: Path) -> None:
    # One recipient delivered in one go: the message is removed without a journal write,
    # so a full spool disk neither fails it nor causes a second copy later.
    r = site.run("-bq", "root", input=b"Subject: j\n\njournal me\n")
    assert r.returncode == 0, r.stderr
    filler = _fill_up(tiny_spool)
    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    assert site.mailbox().read_bytes().count(b"journal me") == 1
    assert site.queue_ids() == []
    filler.unlink()
    assert site.run("-q").returncode == 0
    assert site.mailbox().read_bytes().count(b"journal me") == 1


def test_full_spool_while_journaling_loses_nothing(site: DmaSite, tiny_spool: Path) -> None:
    # Two mailboxes are two steps, each journalled as it completes: the journal cannot be
    # written, which is logged; both copies are delivered once and the message is finished.
    r = site.run("-bq", "root", "daemon", input=b"Subject: j\n\njournal me\n")
    assert r.returncode == 0, r.stderr
    filler = _fill_up(tiny_spool)
    r = site.run("-q")
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    assert "cannot write the journal" in (site.root / "dma.log").read_text()
    for user in ("root", "daemon"):
        assert site.mailbox(user).read_bytes().count(b"journal me") == 1
    assert site.queue_ids() == []
    filler.unlink()
    assert site.run("-q").returncode == 0
    for user in ("root", "daemon"):
        assert site.mailbox(user).read_bytes().count(b"journal me") == 1


def test_full_spool_when_bouncing_keeps_the_original(site: DmaSite, tiny_spool: Path) -> None:
    (site.mail / "daemon").symlink_to(site.root / "elsewhere")  # daemon fails for good
    r = site.run("-bq", "-f", "root@mail.test", "daemon", input=b"Subject: b\n\nbounce me\n")
    assert r.returncode == 0, r.stderr
    (qid,) = site.queue_ids()
    # A journal page allocated beforehand: the result fits in it on the full disk, the
    # bounce (a new file) does not.
    (tiny_spool / "journal" / qid).write_bytes(b'{"t":0,"event":"test"}\n')
    filler = tiny_spool / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    r = site.run("-q")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert site.queue_ids() == [qid]  # never deleted before its bounce is spooled
    assert "cannot spool the bounce" in (site.root / "dma.log").read_text()
    filler.unlink()
    assert site.run("-q").returncode == 0
    assert site.queue_ids() == []
    assert b"Undelivered Mail Returned to Sender" in site.mailbox("root").read_bytes()


def test_unexpected_os_error_is_one_line(site: DmaSite) -> None:
    not_a_dir = site.root / "spool-is-a-file"
    not_a_dir.write_text("x")
    site.write_conf(f"SPOOLDIR {not_a_dir}\n")
    r = site.run(prog="mailq")
    assert r.returncode == 71, r.stderr
    assert_one_line(r.stderr, b"Not a directory")
