"""The ``sendmail`` start-up path stays lean: every message submitted pays for what it
imports (issue 5: a 1 KB submission in ≤ 25 ms).  These tests count imports, not time, so
they do not flake on a busy machine."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dma
from dma.address import Address
from dma.aliases import Target
from dma.cli import Options
from dma.message import Head, Header, Identity
from dma.outcome import Outcome
from dma.spool import Envelope, QueueEntry, RecipientState
from dma.submit import DropRequest, Request, Submitter

HEAVY = ("dataclasses", "typing", "inspect", "json", "email", "click", "dns", "ssl", "smtplib",
         "logging")
REPORT = f"import sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"


def _run(code: str, **env: str) -> str:
    # -S: without ``site``, whose .pth files (certifi's, outside a venv) import typing and
    # re themselves; dma is found through PYTHONPATH instead.
    where = os.path.dirname(os.path.dirname(os.path.abspath(dma.__file__)))
    path = os.pathsep.join(p for p in (where, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env, "PYTHONPATH": path}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_submission_modules_import_nothing_heavy() -> None:
    code = "import dma.cli, dma.submit, dma.spool, dma.config, dma.log\n" + REPORT
    assert _run(code) == "[]"


def test_a_queued_submission_imports_nothing_heavy(tmp_path: Path) -> None:
    conf = tmp_path / "dma.conf"
    conf.write_text(f"SPOOLDIR {tmp_path / 'spool'}\nMAILSPOOL {tmp_path / 'mail'}\n"
                    f"LOGFILE {tmp_path / 'dma.log'}\n")
    msg = tmp_path / "msg"
    msg.write_bytes(b"Subject: hi\n\n" + b"x" * 1000 + b"\n")
    code = ("import sys\nfrom dma.cli import main\n"
            f"sys.stdin = open({str(msg)!r})\n"
            "rc = main(['sendmail', '-bq', 'root'])\nassert rc == 0, rc\n" + REPORT)
    assert _run(code, DMA_CONF=str(conf)) == "[]"
    assert len(os.listdir(tmp_path / "spool" / "queue")) == 1


LAUNCHERS = ("dma", "sendmail", "mailq", "newaliases")


def _installed(name: str) -> str:
    """The program installed beside the running interpreter (this venv's), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return found


@pytest.mark.parametrize("name", LAUNCHERS)
def test_installed_launchers_are_ours(name: str) -> None:
    # pip's generated entry-point script imports re on every start; ours does not.
    path = _installed(name)
    text = Path(path).read_text()
    assert text.startswith("#!/") and "from dma.cli import main" in text, text
    assert "import re" not in text


def _reported(stderr: bytes) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.decode().splitlines()
            if line.startswith("import time:") and "|" in line}


def test_the_installed_sendmail_imports_nothing_heavy(tmp_path: Path) -> None:
    """The real program, as cron runs it: every module it imports, as Python reports them."""
    conf = tmp_path / "dma.conf"
    conf.write_text(f"SPOOLDIR {tmp_path / 'spool'}\nMAILSPOOL {tmp_path / 'mail'}\n"
                    f"LOGFILE {tmp_path / 'dma.log'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(DMA_CONF=str(conf), PYTHONPROFILEIMPORTTIME="1")
    launcher = _installed("sendmail")
    proc = subprocess.run([launcher, "-bq", "root"], env=env, timeout=60,
                          input=b"Subject: hi\n\n" + b"x" * 1000 + b"\n", capture_output=True)
    assert proc.returncode == 0, proc.stderr
    imported = _reported(proc.stderr)
    assert "dma.submit" in imported  # the report is real
    # What the interpreter itself loads at start (site, and .pth files of whatever else is
    # installed in that environment) is not ours to trim: only what our code adds counts.
    interpreter = Path(launcher).read_text().splitlines()[0][2:].split()
    bare = subprocess.run([*interpreter, "-c", "pass"], env=env, timeout=60,
                          capture_output=True)
    ours = imported - _reported(bare.stderr)
    assert not ours & {*HEAVY, "re", "enum", "functools"}, sorted(ours)
    assert len(os.listdir(tmp_path / "spool" / "queue")) == 1


# --- the hand-written classes keep their dataclass behaviour ---------------------------

FROZEN = [
    Address("root", "example.org"),
    Target("root", "address", 3),
    Identity("a@b", "root", 0, "Root", "mail.test", "0.1"),
    Outcome("a@b", "delivered", "250 ok", "2.0.0", "mx[192.0.2.1]:25"),
    Envelope("ID1", "a@b", ("c@d", "root"), 1.5, 0, "root", 10, True, "bounce"),
    Request(("root",), "a@b", "Root", True, False),
    DropRequest(("root",), "a@b", "Root", True),
    Submitter("root", 0, "Root"),
]


@pytest.mark.parametrize("obj", FROZEN, ids=lambda o: type(o).__name__)
def test_frozen_classes(obj: object) -> None:
    names = type(obj).__slots__  # type: ignore[attr-defined]
    twin = copy.copy(obj)
    assert twin == obj and twin is not obj and hash(twin) == hash(obj)
    assert pickle.loads(pickle.dumps(obj)) == obj == copy.deepcopy(obj)
    assert obj != object() and obj != tuple(getattr(obj, n) for n in names)
    with pytest.raises(AttributeError):
        setattr(obj, names[0], None)
    with pytest.raises(AttributeError):
        delattr(obj, names[0])
    with pytest.raises(AttributeError):
        obj.extra = 1  # type: ignore[attr-defined]
    shown = repr(obj)
    assert shown.startswith(type(obj).__name__ + "(")
    for n in names:
        assert f"{n}={getattr(obj, n)!r}" in shown


def test_keyword_construction_and_defaults() -> None:
    assert Address(local="a") == Address("a", None)
    assert Request() == Request(recipients=(), sender=None, full_name="", from_headers=False,
                                dot_ends=True)
    assert Envelope(id="I", sender="", recipients=(), created=0.0, uid=0, user="u") == \
        Envelope("I", "", (), 0.0, 0, "u", 0, False, "")
    assert Outcome(recipient="a", status="failed") == Outcome("a", "failed", "", "", "")
    assert Identity(sender="", user="u", uid=1).mailname == "localhost"


def test_mutable_classes() -> None:
    o, p = Options(), Options()
    assert o == p and o.recipients is not p.recipients and o.queue_ids is not p.queue_ids
    o.recipients.append("root")
    assert o != p and "recipients=['root']" in repr(o)
    h1, h2 = Head(), Head()
    assert h1 == h2 and h1.headers is not h2.headers
    h1.headers.append(Header(b"To", b"To: a\n"))
    assert h1 != h2 and "Header(name=b'To'" in repr(h1)
    s = RecipientState("a")
    s.attempts += 1
    assert s == RecipientState("a", attempts=1)
    q1, q2 = QueueEntry("I", None, 1, 2.0), QueueEntry("I", None, 1, 2.0)
    assert q1 == q2 and q1.states is not q2.states
    for obj in (o, h1, Header(b"a", b"a: b\n"), s, q1):
        with pytest.raises(TypeError):
            hash(obj)
        with pytest.raises(AttributeError):
            obj.extra = 1  # type: ignore[attr-defined]


# --- the envelope is encoded by hand, exactly as json.dumps did ------------------------


def _json_envelope(e: Envelope) -> bytes:
    doc: dict[str, object] = {
        "v": 1, "id": e.id, "sender": e.sender, "recipients": list(e.recipients),
        "created": e.created, "uid": e.uid, "user": e.user, "size": e.size,
        "8bit": e.eight_bit,
    }
    if e.notice:
        doc["notice"] = e.notice
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))


@given(_TEXT, _TEXT, st.lists(_TEXT, max_size=4), st.floats() | st.integers(0, 2**40),
       st.integers(0, 2**32), _TEXT, st.integers(0, 2**63), st.booleans(), _TEXT)
def test_envelope_encoding_matches_json(qid: str, sender: str, rcpts: list[str],
                                        created: float, uid: int, user: str, size: int,
                                        eight_bit: bool, notice: str) -> None:
    e = Envelope(qid, sender, tuple(rcpts), created, uid, user, size, eight_bit, notice)
    data = e.to_bytes()
    assert data == _json_envelope(e)
    if created == created:  # NaN never equals itself
        assert Envelope.from_bytes(data, "x") == Envelope(
            qid, sender, tuple(rcpts), float(created), uid, user, size, eight_bit, notice)


def test_envelope_encoding_of_control_characters() -> None:
    text = "".join(chr(i) for i in range(0x80)) + "\u2028\xa0é\U0001f600\"\\"
    e = Envelope(text, text, (text, ""), 1e300, 0, text, 0, False, text)
    assert e.to_bytes() == _json_envelope(e)
