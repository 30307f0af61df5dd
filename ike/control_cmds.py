"""Control-socket commands of the IKE daemon: `up`, `down`, `status`, `reload`.

`register(server, service)` adds them to the daemon's `ControlServer`. Answers are JSON-able
dicts; counters of each Child SA come from a PF_KEY GET of its SAs (keys dropped at once).
"""

from __future__ import annotations

import time
from typing import Any

from ike.connections import format_identity
from ike.service import ChildRecord, IkeRecord, IkeService, IkeServiceError, suite_name, ts_text
from userspace_ipsec.config import ConfigError
from userspace_ipsec.control import ControlError, ControlServer

UP_TIMEOUT = 30.0


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        raise ControlError("a connection name is required")
    return name


async def up(service: IkeService, args: dict[str, Any]) -> dict[str, Any]:
    """Initiate connection `name`; wait for its IKE SA and Child SAs (or report why not)."""
    name = _name(args)
    timeout = float(args.get("timeout", UP_TIMEOUT))
    try:
        rec = await service.initiate(name)
    except IkeServiceError as exc:
        raise ControlError(str(exc)) from None
    if not await service.wait_established(rec, timeout):
        raise ControlError(f"{name}: not established (state {rec.sa.state.value}; see the log)")
    return {"name": name, "uniqueid": rec.uid, "state": rec.sa.state.value,
            "children": [c.child.name for c in rec.children.values()]}


async def down(service: IkeService, args: dict[str, Any]) -> dict[str, Any]:
    name = _name(args)
    try:
        count = await service.terminate(name, float(args.get("timeout", 10.0)))
    except IkeServiceError as exc:
        raise ControlError(str(exc)) from None
    return {"name": name, "ike_sas_deleted": count}


async def reload(service: IkeService, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return await service.reload()
    except ConfigError as exc:
        raise ControlError(f"configuration refused, nothing changed: {exc}") from None


def _left(at: float | None, now: float) -> float | None:
    return None if at is None else round(max(0.0, at - now), 1)


async def _child_status(service: IkeService, child: ChildRecord) -> dict[str, Any]:
    p = child.params
    counters: dict[str, int] = {}
    for direction, (src, dst, spi) in (
            ("in", (p.remote, p.local, child.inbound_spi)),
            ("out", (p.local, p.remote, child.outbound_spi))):
        msg = await service.keying.get_sa(src, dst, int.from_bytes(spi, "big"))
        ext = msg.uipsec if msg is not None else None
        if ext is not None:
            counters[f"bytes_{direction}"] = ext.bytes_in if direction == "in" else ext.bytes_out
            counters[f"packets_{direction}"] = (ext.packets_in if direction == "in"
                                                else ext.packets_out)
            if direction == "in":
                counters["replay_drops"] = ext.replay_drops
                counters["auth_failures"] = ext.auth_failures
    now = time.time()
    return {
        "name": child.child.name, "spi_in": child.inbound_spi.hex(),
        "spi_out": child.outbound_spi.hex(), "mode": child.mode.name.lower(),
        "reqid": child.reqid, "algorithms": suite_name(child.transforms),
        "encap": p.encap, "local_ts": ts_text(child.local_ts),
        "remote_ts": ts_text(child.remote_ts), "installed": round(now - child.installed_at),
        "rekey_in": _left(child.rekey_at or None, now), "counters": counters,
    }


async def _ike_status(service: IkeService, rec: IkeRecord) -> dict[str, Any]:
    sa = rec.sa
    loop_now = service._now()  # noqa: SLF001 - the loop clock the timers use
    return {
        "name": rec.conn.name, "uniqueid": rec.uid, "state": sa.state.value,
        "initiator": sa.initiator, "local": f"{rec.local_ip}", "remote": sa.remote_addr[0],
        "remote_port": sa.remote_addr[1],
        "local_id": format_identity(sa.config.local_id),
        "remote_id": format_identity(rec.remote_id),
        "spi_i": sa.spi_i.hex(), "spi_r": sa.spi_r.hex(),
        "algorithms": suite_name(rec.transforms),
        "nat": {"udp_encap": rec.natt, "local_behind_nat": sa.local_behind_nat,
                "remote_behind_nat": sa.remote_behind_nat},
        "established": None if rec.established_at is None
        else round(time.time() - rec.established_at),
        "rekey_in": _left(rec.rekey_at, loop_now),
        # A copy: the children change while we await the kernel's answers (a rekey, a delete).
        "children": [await _child_status(service, c) for c in list(rec.children.values())],
    }


async def status(service: IkeService, args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("name")
    sas = [await _ike_status(service, r) for r in service.records
           if name is None or r.conn.name == name]
    return {"connections": sorted(service.connections.connections), "ike_sas": sas,
            "counters": dict(service.counters)}


def register(server: ControlServer, service: IkeService) -> None:
    server.register("up", lambda args: up(service, args))
    server.register("down", lambda args: down(service, args))
    server.register("status", lambda args: status(service, args))
    server.register("reload", lambda args: reload(service, args))
