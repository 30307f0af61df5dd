"""``uipsec setkey``: setkey(8) of ipsec-tools against the daemon's PF_KEY socket.

A script is parsed whole before anything is sent: an error names file, line and token and
applies nothing. Then each statement's messages go out in order; a refusal by the kernel names
the statement's line and stops the run with status 1, as setkey does.
"""

from __future__ import annotations

import select
import sys
import time
from pathlib import Path

import click

from ..pfkey.client import PfkeyClient, PfkeyReplyError
from ..pfkey.constants import MsgType, SaType
from ..pfkey.messages import Message
from ..setkey import (
    Command,
    CommandKind,
    SetkeyError,
    deleteall_requests,
    format_message_debug,
    format_policy,
    format_sa,
    parse_script,
)
from .common import EXIT_USAGE, Context, fail, runtime_errors


def _trace(msg: Message, raw: bytes) -> None:
    click.echo(format_message_debug(msg, raw), nl=False)


def _print_dump(client: PfkeyClient, policies: bool, satype: int = SaType.UNSPEC,
                show_keys: bool = False) -> None:
    now = time.time()
    entries = client.spddump() if policies else client.dump(satype)
    printed = False
    for msg in entries:
        printed = True
        if policies:
            click.echo(format_policy(msg, now), nl=False)
        else:
            click.echo(format_sa(msg, now=now, show_keys=show_keys), nl=False)
    if not printed:
        click.echo("No SPD entries." if policies else "No SAD entries.")


def _execute(client: PfkeyClient, command: Command, show_keys: bool) -> None:
    kind = command.kind
    if kind in (CommandKind.DUMP, CommandKind.SPDDUMP):
        _print_dump(client, kind is CommandKind.SPDDUMP, command.messages[0].satype, show_keys)
        return
    if kind is CommandKind.GET:
        reply = client.request(command.messages[0])
        click.echo(format_sa(reply, now=time.time(), show_keys=show_keys), nl=False)
        return
    if kind is CommandKind.DELETEALL:
        dump = list(client.dump(command.messages[0].satype))
        for request in deleteall_requests(command, dump):
            client.request(request)
        return
    for msg in command.messages:
        reply = client.request(msg)
        if kind is CommandKind.GETSPI and reply.sa is not None:
            click.echo(f"spi=0x{reply.sa.spi:08x}")


def _run_script(client: PfkeyClient, commands: list[Command], show_keys: bool) -> None:
    for command in commands:
        try:
            _execute(client, command, show_keys)
        except PfkeyReplyError as exc:
            fail(f"{command.filename}:{command.line}: {command.kind.value}: {exc}")


def _monitor(client: PfkeyClient, seconds: float | None) -> None:
    """setkey -x: register and print every message the kernel sends until interrupted."""
    client.send(Message(type=MsgType.REGISTER, satype=SaType.ESP))
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return
            ready, _, _ = select.select([client], [], [], timeout)
            if ready:
                client.receive()  # printed by the trace callback
                sys.stdout.flush()
    except KeyboardInterrupt:
        return


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("-c", "from_stdin", is_flag=True, help="Read the script from standard input.")
@click.option("-f", "script", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the script from FILE ('-' for standard input).")
@click.option("-D", "dump", is_flag=True, help="Dump the SAD (with -P: the SPD).")
@click.option("-F", "flush", is_flag=True, help="Flush the SAD (with -P: the SPD).")
@click.option("-P", "policy", is_flag=True, help="With -D or -F: act on the SPD.")
@click.option("-x", "trace", is_flag=True,
              help="Print every PF_KEY message as it passes; alone: monitor until Ctrl-C.")
@click.option("-n", "parse_only", is_flag=True, help="Parse the script, send nothing.")
@click.option("-k", "kernel_mode", is_flag=True,
              help="Kernel semantics: an 'in' policy does not get a twin 'fwd' policy.")
@click.option("-r", "rfc_mode", is_flag=True,
              help="RFC semantics (the default): every 'in' policy gets a twin 'fwd' policy.")
@click.option("--show-keys", is_flag=True,
              help="Print keys in dumps (setkey prints them always; we only when asked).")
@click.option("--monitor-seconds", type=float, default=None,
              help="With -x alone: stop monitoring after this many seconds.")
@click.pass_obj
@runtime_errors
def setkey(
    obj: Context,
    from_stdin: bool,
    script: Path | None,
    dump: bool,
    flush: bool,
    policy: bool,
    trace: bool,
    parse_only: bool,
    kernel_mode: bool,
    rfc_mode: bool,
    show_keys: bool,
    monitor_seconds: float | None,
) -> None:
    """Manage the SAD and SPD with setkey(8) syntax and options."""
    if sum((from_stdin or script is not None, dump, flush)) > 1:
        fail("use only one of -c/-f, -D and -F", EXIT_USAGE)
    if kernel_mode and rfc_mode:
        fail("-k and -r exclude each other", EXIT_USAGE)
    if policy and not (dump or flush):
        fail("-P goes with -D or -F", EXIT_USAGE)

    commands: list[Command] | None = None
    if from_stdin or script is not None:
        if script is None or str(script) == "-":
            text, name = sys.stdin.read(), "<stdin>"
        else:
            try:
                text, name = script.read_text(encoding="utf-8"), str(script)
            except (OSError, UnicodeDecodeError) as exc:
                fail(f"{script}: cannot read: {exc}", EXIT_USAGE)
        try:
            commands = parse_script(text, name, rfc_mode=not kernel_mode)
        except SetkeyError as exc:
            fail(str(exc), EXIT_USAGE)
        for command in commands:
            for warning in command.warnings:
                click.echo(f"uipsec setkey: {command.filename}:{command.line}: {warning}",
                           err=True)
        if parse_only:
            return
    elif parse_only:
        fail("-n needs a script (-f FILE or -c)", EXIT_USAGE)
    elif not (dump or flush or trace):
        fail("nothing to do: give -f FILE, -c, -D, -F or -x", EXIT_USAGE)

    with obj.client(on_message=_trace if trace else None) as client:
        if commands is not None:
            _run_script(client, commands, show_keys)
        elif dump:
            _print_dump(client, policy, show_keys=show_keys)
        elif flush:
            flush_type = MsgType.X_SPDFLUSH if policy else MsgType.FLUSH
            client.request(Message(type=flush_type, satype=SaType.UNSPEC))
        else:
            _monitor(client, monitor_seconds)
