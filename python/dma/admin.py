"""The ``dma`` administration commands (``dma queue …``, ``dma setup``): a click group,
imported only when one of them is asked for, so that the sendmail persona stays lean."""

from __future__ import annotations

import click

from dma import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dma")
@click.option("-C", "--config", "config_path", metavar="FILE",
              help="dma.conf to use (default: $DMA_CONF or /etc/dma/dma.conf).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """dma administration. As sendmail: dma [flags] recipient..."""
    ctx.obj = config_path


class _Ctx:
    """What the commands share: the configuration, read once, and where logs go."""

    def __init__(self, config_path: str | None) -> None:
        from dma import config
        from dma.log import Log
        from dma.spool import Spool

        self.config = config.load(config_path)
        self.spool = Spool(self.config.spooldir)
        self.log = Log("dma", fallback_path=self.config.log_path)


def _ctx(ctx: click.Context) -> _Ctx:
    obj = ctx.find_root().obj
    if not isinstance(obj, _Ctx):
        obj = _Ctx(obj)
        ctx.find_root().obj = obj
    return obj


@main.group()
def queue() -> None:
    """Inspect and manage the mail queue."""


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for monitoring.")
@click.pass_context
def queue_list(ctx: click.Context, as_json: bool) -> None:
    """Every queued message: id, age, size, sender, and per recipient its state,
    attempts, last reply and next retry."""
    from dma import mailq

    c = _ctx(ctx)
    entries = c.spool.listing()
    if as_json:
        import json

        click.echo(json.dumps(mailq.as_json(entries, c.config), indent=2, ensure_ascii=False))
    else:
        click.echo(mailq.render_entries(entries, c.config), nl=False)


def _existing(c: _Ctx, qid: str) -> bool:
    where = c.spool.find(qid)
    if where is None:
        raise click.ClickException(f"no message {qid} in the queue")
    return where


@queue.command("show")
@click.argument("qid")
@click.pass_context
def queue_show(ctx: click.Context, qid: str) -> None:
    """Envelope, journal and headers of one message."""
    import json

    c = _ctx(ctx)
    held = _existing(c, qid)
    msg, env = c.spool.open(qid, held=held)
    try:
        click.echo(f"id: {env.id}{' (held)' if held else ''}")
        click.echo(f"sender: <{env.sender}>")
        click.echo(f"submitted by: {env.user} (uid {env.uid})")
        click.echo(f"size: {msg.size}")
        click.echo(f"delivery log: {c.log.destination}")
        click.echo("recipients:")
        for st in c.spool.states(env).values():
            click.echo(f"  {st.recipient}: {st.status}, {st.attempts} attempt(s)"
                       + (f", last reply: {st.reply}" if st.reply else ""))
        click.echo("journal:")
        try:
            with open(f"{c.spool.journal_dir}/{qid}", "rb") as f:
                for line in f.read().splitlines():
                    try:
                        click.echo("  " + json.dumps(json.loads(line), ensure_ascii=False))
                    except ValueError:
                        click.echo(f"  (torn line: {line!r})")
        except FileNotFoundError:
            click.echo("  (empty)")
        click.echo("headers:")
        click.echo(msg.read_head(1 << 20).decode("utf-8", "replace").rstrip("\n"))
    finally:
        msg.close()


def _locked_op(ctx: click.Context, qid: str, op: str) -> None:
    c = _ctx(ctx)
    held = _existing(c, qid)
    with c.spool.locked(qid, held=held) as claimed:
        if claimed is None:
            raise click.ClickException(f"{qid} is being delivered right now; try again")
        if op == "delete":
            c.spool.remove(qid)
        elif op == "hold" and not held:
            c.spool.move(qid, to_hold=True)
        elif op == "release" and held:
            c.spool.move(qid, to_hold=False)
    c.log.info(f"{qid}: {op} by administrator")
    click.echo(f"{qid}: {op}{'d' if op.endswith('e') else 'ed'}")


@queue.command("delete")
@click.argument("qids", nargs=-1, required=True)
@click.pass_context
def queue_delete(ctx: click.Context, qids: tuple[str, ...]) -> None:
    """Remove messages from the queue without delivering or bouncing them."""
    for qid in qids:
        _locked_op(ctx, qid, "delete")


@queue.command("hold")
@click.argument("qids", nargs=-1, required=True)
@click.pass_context
def queue_hold(ctx: click.Context, qids: tuple[str, ...]) -> None:
    """Keep messages in the queue without delivering them."""
    for qid in qids:
        _locked_op(ctx, qid, "hold")


@queue.command("release")
@click.argument("qids", nargs=-1, required=True)
@click.pass_context
def queue_release(ctx: click.Context, qids: tuple[str, ...]) -> None:
    """Put held messages back in the queue."""
    for qid in qids:
        _locked_op(ctx, qid, "release")


@queue.command("flush")
@click.argument("qids", nargs=-1)
@click.pass_context
def queue_flush(ctx: click.Context, qids: tuple[str, ...]) -> None:
    """Deliver messages now (all queued ones without arguments), whatever their retry time."""
    from dma import queue as q

    c = _ctx(ctx)
    for qid in qids:
        if _existing(c, qid):
            raise click.ClickException(f"{qid} is on hold; release it first")
    if not qids:
        from dma import pickup

        pickup.pickup(c.spool, c.config, c.log)
    q.run_queue(c.spool, c.config, c.log, list(qids) or None)


@queue.command("run")
@click.pass_context
def queue_run(ctx: click.Context) -> None:
    """The timer-driven runner: deliver the messages whose retry time has come."""
    from dma import pickup
    from dma import queue as q

    c = _ctx(ctx)
    pickup.pickup(c.spool, c.config, c.log)
    q.run_queue(c.spool, c.config, c.log, due_only=True)


def _register() -> None:
    from dma import hostsetup

    main.add_command(hostsetup.command, "setup")


_register()


def run(args: list[str]) -> int:
    """Run an administration command; click's errors become sysexits codes."""
    from dma.errors import EX_USAGE

    try:
        rv = main.main(args=args, prog_name="dma", standalone_mode=False)
    except click.exceptions.UsageError as e:
        e.show()
        return EX_USAGE
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return int(e.exit_code)
    except click.exceptions.Abort:
        return 1
    return int(rv or 0)
