"""``uipsec``: the command line. Every command speaks to the daemon through its sockets.

Exit codes: 0 ok, 1 runtime failure (daemon not running, kernel said no), 2 usage or config
error. Failures are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import click

from .. import rundir
from ..config import ConfigError
from ..inspect import policy_record, sa_record, table
from ..pfkey.constants import MsgType, SaType
from ..pfkey.messages import Message
from .common import EXIT_USAGE, Context, fail, runtime_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=rundir.ENV_RUN_DIR,
    default=rundir.DEFAULT_RUN_DIR,
    show_default=True,
    help="Directory of the daemon's sockets (one per daemon / network namespace).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, run_dir: Path, verbose: int) -> None:
    """userspace-ipsec: IPsec in user space (SAD/SPD over PF_KEYv2, ESP on TUN, IKEv2)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(run_dir)


# -- daemon ------------------------------------------------------------------------------------


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML configuration file.")
@click.option("--no-datapath", is_flag=True,
              help="PF_KEY only: no TUN, no ESP sockets (overrides datapath.enabled).")
@click.pass_obj
def daemon(obj: Context, config_path: Path | None, no_datapath: bool) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from ike import connections as ike_connections

    from ..daemon import Daemon
    from ..ike_process import IkeProcessError
    from ..rundir import RunDirError

    config = connections = None
    try:
        if config_path is not None:
            config, connections = ike_connections.load(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    if config is not None:
        logging.getLogger().setLevel(config.daemon.log_level.upper())
    elif logging.getLogger().level == logging.WARNING:
        logging.getLogger().setLevel(logging.INFO)
    server = Daemon(obj.run_dir.path, config, datapath=not no_datapath, connections=connections)
    try:
        asyncio.run(server.run())
    except (RunDirError, IkeProcessError) as exc:
        fail(str(exc))
    except OSError as exc:  # TUN, sockets or routes could not be set up
        fail(f"datapath: {exc}")
    if server.failure is not None:
        fail(server.failure)


@main.command()
@click.option("--pings", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Echo requests sent through the tunnel.")
@click.option("--keying", type=click.Choice(["ike", "manual"]), default="ike", show_default=True,
              help="Negotiate with IKEv2 (PSK) or load setkey scripts (manual keys).")
def demo(pings: int, keying: str) -> None:
    """Build two gateways in network namespaces, tunnel them, ping through, clean up."""
    from ..demo import Demo
    from ..lab import HarnessError

    try:
        ok = Demo(click.echo, pings=pings, keying=keying).run()
    except HarnessError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
    if not ok:
        fail("the ping through the tunnel failed")
    click.echo("demo: success")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def stats(obj: Context, as_json: bool) -> None:
    """Global counters of the datapath and the PF_KEY socket."""
    from ..control import ControlError, request

    try:
        result = request(obj.run_dir.control_socket, "stats")
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"no uipsec daemon is listening on {obj.run_dir.control_socket}")
    except ControlError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    for section, counters in sorted(result.items()):
        click.echo(f"{section}:")
        if not isinstance(counters, dict):
            click.echo(f"  {counters}")
            continue
        width = max((len(k) for k in counters), default=0)
        for key, value in sorted(counters.items()):
            click.echo(f"  {key.ljust(width)}  {value}")


# -- sa / spd ----------------------------------------------------------------------------------


@main.group()
def sa() -> None:
    """Inspect and flush Security Associations."""


@sa.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--show-keys", is_flag=True, help="Include the keys (they are secrets).")
@click.pass_obj
@runtime_errors
def sa_list(obj: Context, as_json: bool, show_keys: bool) -> None:
    """List the SAD."""
    with obj.client() as client:
        records = [sa_record(m, show_keys=show_keys) for m in client.dump()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    headers = ["SPI", "PROTO", "MODE", "SRC", "DST", "ENCAP", "REQID", "STATE", "ENC", "INTEG",
               "PKTS IN/OUT", "BYTES IN/OUT"]
    if show_keys:
        headers += ["ENC KEY", "INTEG KEY"]
    rows = []
    for r in records:
        counters = r.get("counters") or {}
        row = [
            r["spi_hex"], r["protocol"], r["mode"], r["src"], r["dst"], r["encap"] or "-",
            str(r["reqid"]), r["state"] or "-", r["encryption"] or "-", r["integrity"] or "-",
            f"{counters.get('packets_in', 0)}/{counters.get('packets_out', 0)}",
            f"{counters.get('bytes_in', 0)}/{counters.get('bytes_out', 0)}",
        ]
        if show_keys:
            row += [r["encryption_key"] or "-", r["integrity_key"] or "-"]
        rows.append(row)
    click.echo(table(rows, headers))


@sa.command("flush")
@click.pass_obj
@runtime_errors
def sa_flush(obj: Context) -> None:
    """Remove every SA."""
    with obj.client() as client:
        client.request(Message(type=MsgType.FLUSH, satype=SaType.UNSPEC))


@main.group()
def spd() -> None:
    """Inspect and flush Security Policies."""


@spd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@runtime_errors
def spd_list(obj: Context, as_json: bool) -> None:
    """List the SPD in lookup order."""
    with obj.client() as client:
        records = [policy_record(m) for m in client.spddump()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    rows = []
    for r in records:
        templates = ", ".join(
            "/".join([q["protocol"], q["mode"], q["endpoints"],
                      q["level"] + (f":{q['reqid']}" if q["reqid"] else "")])
            for q in r["requests"]
        )
        rows.append([
            str(r["id"]), r["direction"] or "-", r["src"]["prefix"] or "-",
            r["dst"]["prefix"] or "-", r["upper_protocol"], r["action"] or "-",
            str(r["priority"]), templates or "-",
        ])
    click.echo(table(rows, ["ID", "DIR", "SRC", "DST", "PROTO", "ACTION", "PRIO", "TEMPLATES"]))


@spd.command("flush")
@click.pass_obj
@runtime_errors
def spd_flush(obj: Context) -> None:
    """Remove every policy."""
    with obj.client() as client:
        client.request(Message(type=MsgType.X_SPDFLUSH, satype=SaType.UNSPEC))


# Each big command lives in its own module.
from .ike_cmds import COMMANDS as IKE_COMMANDS  # noqa: E402
from .setkey_cmd import setkey  # noqa: E402

main.add_command(setkey)
for _command in IKE_COMMANDS:
    main.add_command(_command)
