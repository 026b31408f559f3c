"""One status snapshot of a running server, in the SQL its version has.

- 12 and newer: everything from SQL (pg_stat_wal_receiver's sender_host/sender_port and
  pg_stat_replication's reply_time).
- 10 and 11 (Postgres-XL 10): the same functions, but no reply_time (12+): a downstream's
  reply age is unknown (None); on 10 the WAL receiver's upstream comes from its conninfo
  column (sender_host/sender_port are 11+).
- 9.x (Postgres-XC 1.2, PostgreSQL 9.3): the xlog/location spellings, no
  pg_control_system() and no pg_stat_wal_receiver. The system identifier and a standby's
  timeline come from global/pg_control (this process runs beside the server); the WAL
  receiver is the postmaster's child titled `wal receiver process`, and its upstream is the
  primary_conninfo xcha wrote into recovery.conf.
"""

import contextlib
import os
import re
import struct
import time
from pathlib import Path

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from xcha.pg.client import Conn
from xcha.pg.lsn import parse_lsn
from xcha.pg.status import Downstream, PgStatus, WalReceiver

# ControlFileData up to checkPointCopy.ThisTimeLineID, as PostgreSQL 9.3 lays it out on a
# 64-bit machine: system_identifier u64, pg_control_version u32, catalog_version_no u32,
# state i32 (+4 padding), time i64, checkPoint u64, prevCheckPoint u64, checkPointCopy.redo
# u64, checkPointCopy.ThisTimeLineID u32.
CONTROL_93 = struct.Struct("<QIIi4xqQQQI")
HISTORY_FILE = re.compile(r"([0-9A-F]{8})\.history")


def _lsn(text: object) -> int | None:
    return parse_lsn(str(text)) if text else None


async def take_snapshot(conn: Conn, version: int, data_dir: Path, pid: int, port: int) -> PgStatus:
    if version < 100000:
        return await _snapshot_9x(conn, data_dir, pid, port)
    return await _snapshot(conn, version, pid, port)


async def _snapshot(conn: Conn, version: int, pid: int, port: int) -> PgStatus:
    taken_at = time.monotonic()
    cur = await conn.execute(
        """SELECT pg_is_in_recovery(),
                  (SELECT system_identifier FROM pg_control_system()),
                  CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END,
                  CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_flush_lsn()::text END,
                  pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
                  CASE WHEN pg_is_in_recovery()
                       THEN (SELECT timeline_id FROM pg_control_checkpoint())
                       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
                  END,
                  current_setting('synchronous_standby_names')"""
    )
    row = await cur.fetchone()
    assert row is not None
    in_recovery, sysid, current, flushed, received, replayed, timeline, sync_names = row
    receiver = None
    if in_recovery:
        written = "written_lsn" if version >= 130000 else "received_lsn"
        upstream = "sender_host, sender_port" if version >= 110000 else "conninfo, NULL"
        cur = await conn.execute(
            sql.SQL(
                """SELECT status, {},
                          extract(epoch FROM clock_timestamp() - last_msg_receipt_time)::float8,
                          {}::text, received_tli FROM pg_stat_wal_receiver"""
            ).format(sql.SQL(upstream), sql.Identifier(written))
        )
        wal_row = await cur.fetchone()
        if wal_row is not None:
            status, host, port_value, age, written_lsn, received_tli = wal_row
            if version < 110000:
                host, port_value = _conninfo_endpoint(str(host or ""))
            receiver = WalReceiver(str(status), host, port_value, age)  # type: ignore[arg-type]
            timeline = received_tli or timeline
            received_text = written_lsn or received
        else:
            received_text = received
    else:
        received_text = None
    reply_age = (
        "extract(epoch FROM clock_timestamp() - reply_time)::float8" if version >= 120000 else "NULL::float8"
    )
    cur = await conn.execute(
        sql.SQL(
            """SELECT application_name, state, sync_state, flush_lsn::text, replay_lsn::text, {}, pid
               FROM pg_stat_replication ORDER BY application_name"""
        ).format(sql.SQL(reply_age))
    )
    downstreams = tuple(
        Downstream(str(name), str(state), str(sync_state), _lsn(flush), _lsn(replay), age, pid)  # type: ignore[arg-type]
        for name, state, sync_state, flush, replay, age, pid in await cur.fetchall()
    )
    after = await _position_after_senders(conn, "pg_current_wal_lsn", bool(in_recovery), downstreams)
    return PgStatus(
        running=True,
        postmaster_pid=pid,
        in_recovery=bool(in_recovery),
        timeline=int(timeline) if timeline is not None else None,  # type: ignore[call-overload]
        system_identifier=int(sysid) if sysid is not None else None,  # type: ignore[call-overload]
        current_lsn=_lsn(current),
        receive_lsn=_lsn(received_text),
        flush_lsn=_lsn(flushed if not in_recovery else received),
        replay_lsn=_lsn(replayed),
        wal_receiver=receiver,
        downstreams=downstreams,
        synchronous_standby_names=str(sync_names),
        port=port,
        position_after_senders=after,
        taken_at=taken_at,
    )


async def _snapshot_9x(conn: Conn, data_dir: Path, pid: int, port: int) -> PgStatus:
    taken_at = time.monotonic()
    cur = await conn.execute(
        """SELECT pg_is_in_recovery(),
                  CASE WHEN NOT pg_is_in_recovery() THEN pg_current_xlog_location()::text END,
                  pg_last_xlog_receive_location()::text, pg_last_xlog_replay_location()::text,
                  CASE WHEN NOT pg_is_in_recovery()
                       THEN ('x' || substr(pg_xlogfile_name(pg_current_xlog_location()), 1, 8))::bit(32)::int
                  END,
                  current_setting('synchronous_standby_names')"""
    )
    row = await cur.fetchone()
    assert row is not None
    in_recovery, current, received, replayed, timeline, sync_names = row
    sysid, checkpoint_timeline = read_control_93(data_dir)
    receiver = None
    if in_recovery:
        timeline = max(checkpoint_timeline or 1, newest_history_timeline(data_dir / "pg_xlog"))
        receiver = wal_receiver_9x(pid, data_dir)
    cur = await conn.execute(
        """SELECT application_name, state, sync_state, flush_location::text, replay_location::text, pid
           FROM pg_stat_replication ORDER BY application_name"""
    )
    downstreams = tuple(
        Downstream(str(name), str(state), str(sync_state), _lsn(flush), _lsn(replay), None, pid)  # type: ignore[arg-type]
        for name, state, sync_state, flush, replay, pid in await cur.fetchall()
    )
    after = await _position_after_senders(conn, "pg_current_xlog_location", bool(in_recovery), downstreams)
    return PgStatus(
        running=True,
        postmaster_pid=pid,
        in_recovery=bool(in_recovery),
        timeline=int(timeline) if timeline is not None else None,  # type: ignore[call-overload]
        system_identifier=sysid,
        current_lsn=_lsn(current),
        receive_lsn=_lsn(received) if in_recovery else None,
        flush_lsn=_lsn(current if not in_recovery else received),
        replay_lsn=_lsn(replayed),
        wal_receiver=receiver,
        downstreams=downstreams,
        synchronous_standby_names=str(sync_names),
        port=port,
        position_after_senders=after,
        taken_at=taken_at,
    )


async def _position_after_senders(
    conn: Conn, function: str, in_recovery: bool, downstreams: tuple[Downstream, ...]
) -> int | None:
    """A master's WAL position read after pg_stat_replication (its own statement: no reading
    order inside one statement to rely on). A standby that picture shows confirming and has
    flushed up to it holds every commit acknowledged without it (syncrep.CatchUp)."""
    if in_recovery or not downstreams:
        return None
    cur = await conn.execute(sql.SQL("SELECT {}()::text").format(sql.Identifier(function)))
    row = await cur.fetchone()
    return _lsn(row[0]) if row is not None else None


def _conninfo_endpoint(conninfo: str) -> tuple[str | None, int | None]:
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return None, None
    host = params.get("host")
    port = params.get("port")
    return (str(host) if host else None), (int(str(port)) if port and str(port).isdigit() else None)


def read_control_93(data_dir: Path) -> tuple[int | None, int | None]:
    """(system identifier, timeline of the last checkpoint or restartpoint) from pg_control."""
    try:
        with open(data_dir / "global" / "pg_control", "rb") as control:
            head = control.read(CONTROL_93.size)
    except OSError:
        return None, None
    if len(head) < CONTROL_93.size:
        return None, None
    fields = CONTROL_93.unpack(head)
    return fields[0], fields[-1]


def newest_history_timeline(wal_dir: Path) -> int:
    """The newest timeline whose history file the server has (1 when none): a standby that
    follows a promoted server fetches that server's history file first."""
    newest = 1
    with contextlib.suppress(OSError):
        for entry in os.listdir(wal_dir):
            match = HISTORY_FILE.fullmatch(entry)
            if match is not None:
                newest = max(newest, int(match.group(1), 16))
    return newest


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except OSError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat_file:
                    if int(stat_file.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def wal_receiver_9x(postmaster: int, data_dir: Path) -> WalReceiver | None:
    """The WAL receiver as its process title shows it ('wal receiver process   streaming
    0/3000090'), streaming from the primary_conninfo of recovery.conf."""
    for child in _children(postmaster):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                title = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "wal receiver process" not in title:
            continue
        words = title.split("wal receiver process", 1)[1].split()
        status = words[0] if words else "starting"
        host, port = _recovery_conf_upstream(data_dir)
        return WalReceiver(status, host, port, None)
    return None


def _recovery_conf_upstream(data_dir: Path) -> tuple[str | None, int | None]:
    try:
        text = (data_dir / "recovery.conf").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == "primary_conninfo":
            return _conninfo_endpoint(_guc_string(value.strip()))
    return None, None


def _guc_string(value: str) -> str:
    """The string a postgresql.conf value stands for ('...' with '' and \\ escapes)."""
    if not value.startswith("'"):
        return value.split("#", 1)[0].strip()
    out: list[str] = []
    index = 1
    while index < len(value):
        char = value[index]
        if char == "\\" and index + 1 < len(value):
            out.append(value[index + 1])
            index += 2
        elif char == "'" and value[index + 1 : index + 2] == "'":
            out.append("'")
            index += 2
        elif char == "'":
            break
        else:
            out.append(char)
            index += 1
    return "".join(out)
