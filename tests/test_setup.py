"""``dma setup``: run the installed ``dma`` executable against a system image under
``--root`` (a temporary directory), never against this machine."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dma import config
from dma.hostsetup import DIRECTIVE_DOCS, is_dma_script

DMA = shutil.which("dma")
pytestmark = [
    pytest.mark.skipif(DMA is None, reason="dma is not installed (pip install -e .)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="checks owners: needs root"),
]

try:
    MAIL_GID = grp.getgrnam("mail").gr_gid
except KeyError:  # pragma: no cover - every Debian-like system has it
    MAIL_GID = 0

SPOOL = "var/spool/dma"
UNITS = "etc/systemd/system"
LINKS = ("usr/sbin/sendmail", "usr/bin/mailq", "usr/bin/newaliases")


def run(root: Path, *args: str, conf: Path | None = None,
        check: int | None = 0) -> subprocess.CompletedProcess[str]:
    assert DMA
    env = {k: v for k, v in os.environ.items() if k != "DMA_CONF"}
    if conf is not None:
        env["DMA_CONF"] = str(conf)
    proc = subprocess.run([DMA, "setup", "--root", str(root), *args], capture_output=True,
                          text=True, env=env, timeout=60)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about every entry under root: type, mode, owner, mtime, content/target."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            result[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid,
                                                   st.st_mtime_ns, extra)
    return result


def lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


def assert_dir(path: Path, mode: int, uid: int, gid: int) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode), path
    assert (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid) == (oct(mode), uid, gid), path


def assert_our_link(path: Path, name: str) -> None:
    assert path.is_symlink(), path
    target = os.readlink(path)
    assert os.path.isabs(target) and os.path.basename(target) == name
    assert is_dma_script(target), target


# --- dry run, first run, second run -------------------------------------------------------


def test_dry_run_changes_nothing_and_lists_every_action(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    proc = run(tmp_path, "--dry-run", "--init", "cron")
    assert snapshot(tmp_path) == before == {}
    would = lines(proc.stdout, "would: ")
    expected = [f"{SPOOL}", f"{SPOOL}/tmp", f"{SPOOL}/queue", f"{SPOOL}/journal",
                f"{SPOOL}/incoming", "var/mail", "etc/dma/dma.conf", *LINKS, "etc/cron.d/dma"]
    for rel in expected:
        assert any(f"{tmp_path}/{rel} " in f"{w} " for w in would), (rel, proc.stdout)
    assert any("incoming (root:mail 1733)" in w for w in would)
    assert "nothing was changed" in proc.stdout
    assert not lines(proc.stdout, "done: ")


def test_dry_run_systemd_lists_units_and_systemctl(tmp_path: Path) -> None:
    proc = run(tmp_path, "-n", "--init", "systemd")
    assert snapshot(tmp_path) == {}
    for unit in ("dma-queue.service", "dma-queue.timer", "dma-pickup.path"):
        assert f"would: write {tmp_path}/{UNITS}/{unit}" in proc.stdout
    assert "would: run systemctl daemon-reload (not run: under --root)" in proc.stdout
    assert "would: run systemctl enable --now dma-queue.timer dma-pickup.path" in proc.stdout


def test_first_run_creates_everything_with_exact_modes(tmp_path: Path) -> None:
    proc = run(tmp_path, "--init", "cron")
    assert "dma is this host's MTA" in proc.stdout
    assert not lines(proc.stdout, "would: ")
    spool = tmp_path / SPOOL
    assert_dir(spool, 0o755, 0, 0)
    for sub in ("tmp", "queue", "journal", "hold"):
        assert_dir(spool / sub, 0o700, 0, 0)
    assert_dir(spool / "incoming", 0o1733, 0, MAIL_GID)
    assert_dir(tmp_path / "var/mail", 0o2775, 0, MAIL_GID)
    conf = tmp_path / "etc/dma/dma.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    for rel in LINKS:
        assert_our_link(tmp_path / rel, os.path.basename(rel))
    assert not (tmp_path / "usr/lib/sendmail").exists()  # only replaced when there is one
    assert not list(tmp_path.rglob("*.pre-dma"))
    assert not list(tmp_path.rglob(".*.dma-setup"))  # no temporary debris


def test_second_run_changes_nothing_and_says_so(tmp_path: Path) -> None:
    run(tmp_path, "--init", "cron")
    before = snapshot(tmp_path)
    proc = run(tmp_path, "--init", "cron")
    assert snapshot(tmp_path) == before
    assert "nothing to do" in proc.stdout
    assert not lines(proc.stdout, "done: ")
    assert len(lines(proc.stdout, "ok: ")) >= 12
    dry = run(tmp_path, "--init", "cron", "--dry-run")
    assert not lines(dry.stdout, "would: ")
    assert "nothing to do" in dry.stdout


def test_wrong_modes_and_owners_are_fixed_and_content_kept(tmp_path: Path) -> None:
    spool = tmp_path / SPOOL
    (spool / "queue").mkdir(parents=True)
    (spool / "incoming").mkdir()
    queued = spool / "queue" / "ABC123"
    queued.write_bytes(b"a queued message")
    os.chmod(spool, 0o777)
    os.chmod(spool / "queue", 0o755)
    os.chmod(spool / "incoming", 0o777)
    os.chown(spool / "incoming", 65534, 65534)
    proc = run(tmp_path, "--init", "cron")
    assert f"done: fix directory {spool}/queue: mode 0755 -> 0700" in proc.stdout
    assert "owner nobody:" in proc.stdout
    assert_dir(spool, 0o755, 0, 0)
    assert_dir(spool / "queue", 0o700, 0, 0)
    assert_dir(spool / "incoming", 0o1733, 0, MAIL_GID)
    assert queued.read_bytes() == b"a queued message"


def test_existing_mail_spool_is_left_alone_with_a_warning(tmp_path: Path) -> None:
    mail = tmp_path / "var/mail"
    mail.mkdir(parents=True)
    os.chmod(mail, 0o777)
    proc = run(tmp_path, "--init", "cron")
    assert stat.S_IMODE(mail.stat().st_mode) == 0o777
    assert "world-writable without the sticky bit" in proc.stderr
    assert proc.stderr.startswith("dma: setup: warning: ")
    os.chmod(mail, 0o1777)
    assert run(tmp_path, "--init", "cron").stderr == ""


def test_a_file_where_a_directory_belongs_is_refused_before_any_change(tmp_path: Path) -> None:
    (tmp_path / "var/spool").mkdir(parents=True)
    (tmp_path / SPOOL).write_text("not a directory")
    before = snapshot(tmp_path)
    proc = run(tmp_path, "--init", "cron", check=73)
    assert proc.stderr.strip() == (f"dma: setup: directory {tmp_path}/{SPOOL} failed:"
                                   " it exists and is not a directory")
    assert snapshot(tmp_path) == before


# --- links and backups -----------------------------------------------------------------------


def test_existing_sendmail_is_backed_up_and_restored_on_uninstall(tmp_path: Path) -> None:
    sbin = tmp_path / "usr/sbin"
    sbin.mkdir(parents=True)
    old = sbin / "sendmail"
    old.write_text("#!/bin/sh\necho other MTA\n")
    old.chmod(0o755)
    lib = tmp_path / "usr/lib"
    lib.mkdir()
    (lib / "sendmail").write_text("a copy\n")
    (tmp_path / "usr/bin").mkdir()
    (tmp_path / "usr/bin/mailq").symlink_to("/usr/sbin/exim4")  # some other MTA's link

    proc = run(tmp_path, "--init", "cron")
    assert f"(moving what is there to {old}.pre-dma)" in proc.stdout
    backup = sbin / "sendmail.pre-dma"
    assert backup.read_text() == "#!/bin/sh\necho other MTA\n"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o755
    assert_our_link(old, "sendmail")
    assert_our_link(lib / "sendmail", "sendmail")  # it existed, so it is ours now
    assert (lib / "sendmail.pre-dma").read_text() == "a copy\n"
    assert os.readlink(tmp_path / "usr/bin/mailq.pre-dma") == "/usr/sbin/exim4"

    before = snapshot(tmp_path)
    assert "nothing to do" in run(tmp_path, "--init", "cron").stdout
    assert snapshot(tmp_path) == before  # the backups are made once

    proc = run(tmp_path, "--uninstall")
    assert f"done: restore {old} from {backup}" in proc.stdout
    assert not old.is_symlink() and old.read_text() == "#!/bin/sh\necho other MTA\n"
    assert (lib / "sendmail").read_text() == "a copy\n"
    assert os.readlink(tmp_path / "usr/bin/mailq") == "/usr/sbin/exim4"
    assert not (tmp_path / "usr/bin/newaliases").exists()
    assert not list(tmp_path.rglob("*.pre-dma"))


@pytest.mark.parametrize("dest", ["../sbin/sendmail", "/usr/sbin/sendmail"])
def test_usr_lib_sendmail_linking_to_usr_sbin_sendmail_is_left_as_is(tmp_path: Path,
                                                                     dest: str) -> None:
    lib = tmp_path / "usr/lib"
    lib.mkdir(parents=True)
    (lib / "sendmail").symlink_to(dest)
    proc = run(tmp_path, "--init", "cron")
    assert f"ok: link {lib}/sendmail" in proc.stdout
    assert os.readlink(lib / "sendmail") == dest
    assert "nothing to do" in run(tmp_path, "--init", "cron").stdout
    run(tmp_path, "--uninstall")
    assert os.readlink(lib / "sendmail") == dest  # not dma's to remove
    assert not (tmp_path / "usr/sbin/sendmail").exists()


def test_an_existing_backup_is_never_overwritten(tmp_path: Path) -> None:
    sbin = tmp_path / "usr/sbin"
    sbin.mkdir(parents=True)
    (sbin / "sendmail").write_text("the current one\n")
    (sbin / "sendmail.pre-dma").write_text("an older backup\n")
    before = snapshot(tmp_path)
    proc = run(tmp_path, "--init", "cron", check=73)
    assert proc.stderr.startswith(f"dma: setup: link {sbin}/sendmail failed: ")
    assert "backup" in proc.stderr and "move one of them away" in proc.stderr
    assert snapshot(tmp_path) == before  # planned first: nothing was done


def test_a_link_to_another_dma_installation_is_replaced_without_backup(tmp_path: Path) -> None:
    other = tmp_path / "old-venv/bin"
    other.mkdir(parents=True)
    script = other / "sendmail"
    script.write_text("#!/usr/bin/python3\nfrom dma.cli import main\nmain()\n")
    script.chmod(0o755)
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "usr/sbin/sendmail").symlink_to(script)
    proc = run(tmp_path, "--init", "cron")
    assert f"done: update {tmp_path}/usr/sbin/sendmail -> " in proc.stdout
    assert_our_link(tmp_path / "usr/sbin/sendmail", "sendmail")
    assert os.readlink(tmp_path / "usr/sbin/sendmail") != str(script)
    assert not (tmp_path / "usr/sbin/sendmail.pre-dma").exists()


# --- queue runner -------------------------------------------------------------------------


def test_systemd_units(tmp_path: Path) -> None:
    proc = run(tmp_path, "--init", "systemd")
    units = tmp_path / UNITS
    service = (units / "dma-queue.service").read_text()
    timer = (units / "dma-queue.timer").read_text()
    pickup = (units / "dma-pickup.path").read_text()
    exec_start = [ln for ln in service.splitlines() if ln.startswith("ExecStart=")]
    assert len(exec_start) == 1
    dma, *args = exec_start[0].removeprefix("ExecStart=").split()
    assert os.path.isabs(dma) and os.path.basename(dma) == "dma" and is_dma_script(dma)
    assert args == ["queue", "run"]
    assert "Type=oneshot" in service.splitlines()
    assert any(ln.startswith("Nice=") for ln in service.splitlines())
    assert any(ln.startswith("TimeoutStartSec=") for ln in service.splitlines())
    assert "DMA_CONF" not in service  # the default configuration file
    for setting in ("OnBootSec=1min", "OnUnitActiveSec=1min", "Persistent=true"):
        assert setting in timer.splitlines()
    assert "PathChanged=/var/spool/dma/incoming" in pickup.splitlines()
    assert "Unit=dma-queue.service" in pickup.splitlines()
    for unit in units.iterdir():
        assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    # under --root systemctl is printed, never run
    assert "skipped: systemctl daemon-reload (under --root" in proc.stdout
    assert "skipped: systemctl enable --now dma-queue.timer dma-pickup.path" in proc.stdout
    assert not (tmp_path / "etc/cron.d/dma").exists()

    before = snapshot(tmp_path)
    again = run(tmp_path, "--init", "systemd")
    assert "nothing to do" in again.stdout and "systemctl" not in again.stdout
    assert snapshot(tmp_path) == before


def test_an_outdated_unit_is_updated(tmp_path: Path) -> None:
    run(tmp_path, "--init", "systemd")
    service = tmp_path / UNITS / "dma-queue.service"
    service.write_text(service.read_text().replace("Nice=10", "Nice=0"))
    proc = run(tmp_path, "--init", "systemd")
    assert f"done: update {service}" in proc.stdout
    assert "Nice=10" in service.read_text()
    assert "skipped: systemctl daemon-reload" in proc.stdout
    assert not (tmp_path / UNITS / "dma-queue.service.pre-dma").exists()


def test_custom_config_file_gives_spool_and_unit_environment(tmp_path: Path) -> None:
    conf = tmp_path / "etc/dma/custom.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("SPOOLDIR /srv/dma-spool\nMAILSPOOL /srv/mail\n")
    run(tmp_path, "--init", "systemd", conf=conf)
    assert_dir(tmp_path / "srv/dma-spool/incoming", 0o1733, 0, MAIL_GID)
    assert_dir(tmp_path / "srv/mail", 0o2775, 0, MAIL_GID)
    assert not (tmp_path / SPOOL).exists()
    assert not (tmp_path / "etc/dma/dma.conf").exists()  # a file was named: it is the config
    units = tmp_path / UNITS
    assert "PathChanged=/srv/dma-spool/incoming" in (units / "dma-pickup.path").read_text()
    # the runner reads the same file, named as the installed system sees it
    assert "Environment=DMA_CONF=/etc/dma/custom.conf" in \
        (units / "dma-queue.service").read_text().splitlines()


def test_cron_variant(tmp_path: Path) -> None:
    run(tmp_path, "--init", "cron")
    cron = tmp_path / "etc/cron.d/dma"
    assert stat.S_IMODE(cron.stat().st_mode) == 0o644
    entries = [ln for ln in cron.read_text().splitlines()
               if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(entries) == 2
    every_minute, reboot = entries
    fields = every_minute.split()
    assert fields[:6] == ["*", "*", "*", "*", "*", "root"]
    assert is_dma_script(fields[6]) and os.path.basename(fields[6]) == "dma"
    assert fields[7:] == ["queue", "run", ">/dev/null", "2>&1"]
    assert reboot.split() == ["@reboot", "root", fields[6], "queue", "run"]
    assert not (tmp_path / UNITS).exists()


def test_moving_from_cron_to_systemd_removes_our_cron_entry(tmp_path: Path) -> None:
    run(tmp_path, "--init", "cron")
    proc = run(tmp_path, "--init", "systemd")
    assert f"done: remove {tmp_path}/etc/cron.d/dma" in proc.stdout
    assert not (tmp_path / "etc/cron.d/dma").exists()


def test_a_foreign_cron_file_is_kept_as_backup(tmp_path: Path) -> None:
    crond = tmp_path / "etc/cron.d"
    crond.mkdir(parents=True)
    (crond / "dma").write_text("*/5 * * * * root /usr/sbin/dma -q1\n")  # Debian's C dma
    run(tmp_path, "--init", "cron")
    # cron ignores file names with a dot: the backup is inert
    assert (crond / "dma.pre-dma").read_text() == "*/5 * * * * root /usr/sbin/dma -q1\n"
    assert "queue run" in (crond / "dma").read_text()
    run(tmp_path, "--uninstall")
    assert (crond / "dma").read_text() == "*/5 * * * * root /usr/sbin/dma -q1\n"
    assert not (crond / "dma.pre-dma").exists()


# --- the configuration file ----------------------------------------------------------------


def test_generated_config_lists_every_directive_and_means_the_defaults(tmp_path: Path) -> None:
    run(tmp_path, "--init", "cron")
    path = tmp_path / "etc/dma/dma.conf"
    text = path.read_text()
    listed = {ln[1:].split()[0] for ln in text.splitlines()
              if ln.startswith("#") and ln[1:2].isupper()}
    assert listed == config.DIRECTIVES
    loaded = config.load(str(path))
    assert loaded.replace(path=None, mailname="localhost") == config.Config()
    # every value shown as a default is the default
    for d in DIRECTIVE_DOCS:
        if d.is_default:
            line = f"#{d.key} {d.value}\n"
            assert line in text
            text = text.replace(line, line[1:])
    uncommented = config.parse(text, "dma.conf")
    assert uncommented.replace(path=None, mailname="localhost") == config.Config()


def test_an_existing_config_is_never_overwritten(tmp_path: Path) -> None:
    conf = tmp_path / "etc/dma/dma.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("SMARTHOST relay.example.org\n")
    proc = run(tmp_path, "--init", "cron")
    assert conf.read_text() == "SMARTHOST relay.example.org\n"
    assert f"ok: {conf} exists (never overwritten)" in proc.stdout


# --- uninstall ---------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["cron", "systemd"])
def test_uninstall_keeps_spool_mail_and_config(tmp_path: Path, init: str) -> None:
    run(tmp_path, "--init", init)
    queued = tmp_path / SPOOL / "queue" / "18C0FFEE0000012345"
    queued.write_bytes(b"From: a@b\n\nqueued mail\n")
    journal = tmp_path / SPOOL / "journal" / "18C0FFEE0000012345"
    journal.write_text('{"rcpt": "root", "status": "deferred"}\n')
    mailbox = tmp_path / "var/mail/root"
    mailbox.write_text("From x\n\nhello\n")
    conf = tmp_path / "etc/dma/dma.conf"
    conf_text = conf.read_text()

    dry_before = snapshot(tmp_path)
    dry = run(tmp_path, "--uninstall", "--dry-run")
    assert snapshot(tmp_path) == dry_before
    assert len(lines(dry.stdout, "would: remove ")) == 3 + (3 if init == "systemd" else 1)

    proc = run(tmp_path, "--uninstall")
    for rel in LINKS:
        assert not os.path.lexists(tmp_path / rel)
    assert not (tmp_path / "etc/cron.d/dma").exists()
    assert not (tmp_path / UNITS).exists() or not list((tmp_path / UNITS).iterdir())
    if init == "systemd":
        assert "skipped: systemctl disable --now dma-queue.timer dma-pickup.path" in proc.stdout
    assert queued.read_bytes() == b"From: a@b\n\nqueued mail\n"
    assert journal.read_text() == '{"rcpt": "root", "status": "deferred"}\n'
    assert mailbox.read_text() == "From x\n\nhello\n"
    assert conf.read_text() == conf_text
    assert_dir(tmp_path / SPOOL / "incoming", 0o1733, 0, MAIL_GID)
    kept = lines(proc.stdout, "kept: ")
    assert any(f"{tmp_path}/{SPOOL}" in k and "queue" in k for k in kept)
    assert any(f"{tmp_path}/var/mail" in k for k in kept)
    assert any(str(conf) in k for k in kept)
    assert "dma is removed" in proc.stdout

    before = snapshot(tmp_path)
    again = run(tmp_path, "--uninstall")
    assert "nothing to do" in again.stdout
    assert snapshot(tmp_path) == before


def test_uninstall_leaves_a_file_that_is_not_ours(tmp_path: Path) -> None:
    run(tmp_path, "--init", "cron")
    sendmail = tmp_path / "usr/sbin/sendmail"
    sendmail.unlink()
    sendmail.write_text("installed by someone else later\n")
    proc = run(tmp_path, "--uninstall")
    assert sendmail.read_text() == "installed by someone else later\n"
    assert f"ok: {sendmail} is not dma's: left alone" in proc.stdout


# --- privileges and the command line ------------------------------------------------------------

_AS_NOBODY = """
import os, sys
import dma.admin, dma.cli, dma.hostsetup  # everything imported while root can read it
pw = __import__("pwd").getpwnam("nobody")
os.setgroups([])
os.setgid(pw.pw_gid)
os.setuid(pw.pw_uid)
os.chdir("/")
sys.exit(dma.cli.main(["dma", "setup", *sys.argv[1:]]))
"""


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``dma setup ARGS`` in a child that drops to ``nobody`` after importing dma (the
    interpreter lives under /root, which nobody cannot read)."""
    env = {k: v for k, v in os.environ.items() if k != "DMA_CONF"}
    return subprocess.run([sys.executable, "-c", _AS_NOBODY, *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_not_root_without_root_or_dry_run_is_refused() -> None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:  # pragma: no cover
        pytest.skip("no user nobody")
    proc = _as_nobody()
    assert proc.returncode == 77, proc.stderr
    assert proc.stderr.strip() == ("dma: setup must run as root (--dry-run shows what it"
                                   " would do)")
    assert proc.stdout == ""
    proc = _as_nobody("--uninstall")
    assert proc.returncode == 77
    proc = _as_nobody("--dry-run")  # allowed: gets past the check
    assert proc.returncode != 77 and "must run as root" not in proc.stderr


def test_help_lists_the_options() -> None:
    assert DMA
    proc = subprocess.run([DMA, "setup", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--dry-run", "--uninstall", "--root", "--init"):
        assert option in proc.stdout


def test_bad_init_is_a_usage_error(tmp_path: Path) -> None:
    proc = run(tmp_path, "--init", "upstart", check=64)
    assert "upstart" in proc.stderr
    assert snapshot(tmp_path) == {}


def test_an_unreadable_named_config_is_one_clear_line(tmp_path: Path) -> None:
    proc = run(tmp_path, conf=tmp_path / "missing.conf", check=78)
    assert proc.stderr.strip() == (f"dma: setup: reading the configuration failed:"
                                   f" {tmp_path}/missing.conf: cannot read: No such file or"
                                   " directory")
    assert snapshot(tmp_path) == {}
