"""``uipsec up|down|status|reload|config check``: the IKE daemon through the control socket.

Add to the group with ``for cmd in COMMANDS: main.add_command(cmd)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..config import ConfigError
from ..control import ControlError, request
from .common import EXIT_USAGE, Context, fail


def _call(obj: Context, command: str, args: dict[str, Any] | None = None,
          timeout: float = 60.0) -> Any:
    path = obj.run_dir.control_socket
    try:
        return request(path, command, args, timeout=timeout)
    except ControlError as exc:
        fail(str(exc))
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"no daemon answers on {path} (is `uipsec daemon` running with --run-dir "
             f"{obj.run_dir.path}?)")
    except TimeoutError:
        fail(f"the daemon did not answer {command} in {timeout:g} s")
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}")


@click.command()
@click.argument("name")
@click.option("--timeout", type=click.FloatRange(1, 600), default=30.0, show_default=True,
              help="Seconds to wait for the IKE SA and its Child SAs.")
@click.pass_obj
def up(obj: Context, name: str, timeout: float) -> None:
    """Initiate connection NAME and wait until it is established."""
    result = _call(obj, "up", {"name": name, "timeout": timeout}, timeout + 5)
    click.echo(f"{result['name']}[{result['uniqueid']}] {result['state']}, children: "
               f"{', '.join(result['children']) or '-'}")


@click.command()
@click.argument("name")
@click.pass_obj
def down(obj: Context, name: str) -> None:
    """Delete the IKE SAs (and Child SAs) of connection NAME."""
    result = _call(obj, "down", {"name": name})
    click.echo(f"{result['name']}: {result['ike_sas_deleted']} IKE SA(s) deleted")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("name", required=False)
@click.pass_obj
def status(obj: Context, as_json: bool, name: str | None) -> None:
    """IKE SAs and their Child SAs (all, or those of connection NAME)."""
    result = _call(obj, "status", {"name": name} if name else {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not result["ike_sas"]:
        click.echo(f"no IKE SA (connections: {', '.join(result['connections']) or '-'})")
    for ike in result["ike_sas"]:
        nat = ike["nat"]
        flags = [k for k in ("local_behind_nat", "remote_behind_nat") if nat[k]]
        click.echo(f"{ike['name']}[{ike['uniqueid']}]: {ike['state'].upper()}, "
                   f"{ike['local']} [{ike['local_id']}] -- {ike['remote']}:{ike['remote_port']}"
                   f" [{ike['remote_id']}]")
        click.echo(f"  {ike['algorithms']}, SPIs {ike['spi_i']}_i {ike['spi_r']}_r"
                   f"{', UDP-encapsulated' if nat['udp_encap'] else ''}"
                   f"{', ' + ', '.join(flags) if flags else ''}"
                   f"{', rekey in ' + str(ike['rekey_in']) + ' s' if ike['rekey_in'] else ''}")
        for child in ike["children"]:
            c = child["counters"]
            rekey = f", rekey in {child['rekey_in']} s" if child["rekey_in"] else ""
            click.echo(f"  {child['name']}: INSTALLED, {child['mode'].upper()}, reqid "
                       f"{child['reqid']}, ESP SPIs {child['spi_in']}_i {child['spi_out']}_o"
                       f"{', in UDP' if child['encap'] else ''}")
            click.echo(f"    {child['algorithms']}, {c.get('bytes_in', 0)} bytes_i "
                       f"({c.get('packets_in', 0)} pkts), {c.get('bytes_out', 0)} bytes_o "
                       f"({c.get('packets_out', 0)} pkts){rekey}")
            click.echo(f"    {child['local_ts']} === {child['remote_ts']}")


@click.command()
@click.pass_obj
def reload(obj: Context) -> None:
    """Re-read the configuration; unchanged connections keep their tunnels."""
    result = _call(obj, "reload")
    click.echo(", ".join(f"{k}: {', '.join(v) or '-'}" for k, v in result.items()))


@click.group("config")
def config_group() -> None:
    """Check configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Parse FILE as the daemon would (IKE connections and secrets included)."""
    from ike.connections import load

    try:
        _, conns = load(file)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    for conn in conns.connections.values():
        children = ", ".join(f"{c.name} ({c.mode}, {c.start_action})"
                             for c in conn.children.values())
        click.echo(f"{conn.name}: {', '.join(conn.local_addrs)} -- "
                   f"{', '.join(conn.remote_addrs)}; children: {children}")
    click.echo(f"{file}: ok, {len(conns.connections)} connection(s)")


COMMANDS = (up, down, status, reload, config_group)
