"""The one class that operates a PostgreSQL instance.

It runs the postmaster as its own child process (so a crash is seen at once and the
dead process is reaped, see BRIEF section 5), writes the configuration rendered by
`xcha.pg.render`, and does what the specification describes by hand: base backup,
synchronous standby, promotion, port takeover, plus pg_rewind rejoin.
"""

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from xcha.errors import InvalidInput, PostgresError
from xcha.names import Endpoint, check_host, check_name, check_port
from xcha.pg.client import bounded, close
from xcha.pg.lsn import parse_lsn
from xcha.pg.render import (
    INCLUDE_LINE,
    AuthMethod,
    ReplicationSpec,
    Role,
    check_path,
    render,
)
from xcha.pg.runner import Runner
from xcha.pg.status import Downstream, PgStatus, WalReceiver
from xcha.pg.syncrep import SyncStandbys

StopMode = Literal["smart", "fast", "immediate"]
CloneMethod = Literal["basebackup", "lowlevel"]

STOP_SIGNALS: dict[StopMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
# Settings that must never travel from one server to another in postgresql.auto.conf:
# a clone or rewind copies the source's file, and a promoted clone that inherited
# synchronous_standby_names would hang every commit.
NODE_LOCAL_AUTO_SETTINGS = ("synchronous_standby_names", "primary_conninfo", "restore_command")
# What a file-level copy of a running cluster leaves out (PostgreSQL docs, "Making a base backup
# using the low level API").
LOWLEVEL_EXCLUDES = (
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "standby.signal",
    "recovery.signal",
    "recovery.conf",
    "pg_internal.init",
)
LOWLEVEL_EMPTIED = (
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
)
SOCKET_PATH_MAX = 107

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceSpec:
    """Where one instance lives and how others reach it."""

    name: str
    data_dir: Path
    port: int
    archive_dir: Path
    socket_dir: Path
    log_file: Path
    password_file: Path
    passfile: Path
    host: str = "127.0.0.1"
    listen_addresses: str = "127.0.0.1"
    replication_user: str = "xcha_repl"
    auth: AuthMethod = "scram-sha-256"
    superuser: str = "postgres"
    allowed_networks: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_name(self.name)
        check_port(self.port)
        check_host(self.host)
        for path in (
            self.data_dir,
            self.archive_dir,
            self.socket_dir,
            self.log_file,
            self.password_file,
            self.passfile,
        ):
            check_path(str(path))
        if len(f"{self.socket_dir}/.s.PGSQL.{self.port}.lock") > SOCKET_PATH_MAX:
            raise InvalidInput(f"socket directory {self.socket_dir} is too long for a Unix socket path")

    @classmethod
    def under(
        cls, base: Path, name: str, port: int, archive_dir: Path, password_file: Path, **options: Any
    ) -> "InstanceSpec":
        """The conventional layout: data, run (socket), postgresql.log and pgpass under base."""
        return cls(
            name=name,
            data_dir=base / "data",
            port=port,
            archive_dir=archive_dir,
            socket_dir=base / "run",
            log_file=base / "postgresql.log",
            password_file=password_file,
            passfile=base / "pgpass",
            **options,
        )

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)


@dataclass(frozen=True)
class Timings:
    """What an operation took, in seconds, step by step."""

    steps: tuple[tuple[str, float], ...]

    def __getitem__(self, step: str) -> float:
        return dict(self.steps)[step]


def _process_state(pid: int) -> str | None:
    """The /proc state letter of pid ('Z' = zombie), or None when no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    state = _process_state(pid)
    return state is not None and state not in ("Z", "X")


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


class PostgresInstance:
    def __init__(self, spec: InstanceSpec, runner: Runner, version: int) -> None:
        self.spec = spec
        self.runner = runner
        self.version = version
        self.port = spec.port
        self._child: subprocess.Popen[bytes] | None = None
        self._session: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    # ---- files -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.spec.data_dir

    def has_cluster(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def replication_password(self) -> str:
        try:
            password = self.spec.password_file.read_text().strip("\n")
        except OSError as error:
            raise InvalidInput(
                f"cannot read replication password file {self.spec.password_file}: {error.strerror}"
            ) from None
        if not password:
            raise InvalidInput(f"replication password file {self.spec.password_file} is empty")
        return password

    def replication_spec(
        self, role: Role, upstream: Endpoint | None = None, sync: SyncStandbys | None = None
    ) -> ReplicationSpec:
        current_user = pwd.getpwuid(os.geteuid()).pw_name
        return ReplicationSpec(
            version=self.version,
            role=role,
            name=self.spec.name,
            port=self.port,
            archive_dir=str(self.spec.archive_dir),
            socket_dir=str(self.spec.socket_dir),
            listen_addresses=self.spec.listen_addresses,
            primary_host=upstream.host if upstream else None,
            primary_port=upstream.port if upstream else None,
            replication_user=self.spec.replication_user,
            passfile=str(self.spec.passfile),
            auth=self.spec.auth,
            superuser=self.spec.superuser,
            local_os_users=(self.runner.user.name, current_user),
            allowed_networks=self.spec.allowed_networks,
            sync=sync,
        )

    def _write_passfile(self) -> None:
        password = self.replication_password().replace("\\", "\\\\").replace(":", "\\:")
        self.runner.make_dir(self.spec.passfile.parent)
        self.runner.write_file(self.spec.passfile, f"*:*:*:{self.spec.replication_user}:{password}\n")

    def configure(self, role: Role, upstream: Endpoint | None = None) -> None:
        """Write the files for role; a standby streams from upstream."""
        rendering = render(self.replication_spec(role, upstream))
        for warning in rendering.warnings:
            log.warning("%s: %s", self.spec.name, warning)
        for rendered in rendering.files:
            if rendered.name == "postgresql.conf":
                self._ensure_include()
            elif rendered.name == str(self.spec.passfile):
                self._write_passfile()
            else:
                self.runner.write_file(self.data_dir / rendered.name, rendered.content)
        if role == "master":
            for marker in ("standby.signal", "recovery.signal", "recovery.conf"):
                (self.data_dir / marker).unlink(missing_ok=True)
        self._drop_auto_settings(
            NODE_LOCAL_AUTO_SETTINGS if role == "standby" else NODE_LOCAL_AUTO_SETTINGS[1:]
        )

    def _ensure_include(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text()
        if INCLUDE_LINE not in text:
            self.runner.write_file(conf, text.rstrip("\n") + "\n" + INCLUDE_LINE + "\n")

    def _drop_auto_settings(self, names: tuple[str, ...]) -> None:
        auto = self.data_dir / "postgresql.auto.conf"
        if not auto.exists():
            return
        lines = auto.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.split("=")[0].strip() not in names]
        if kept != lines:
            self.runner.write_file(auto, "".join(kept))

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.spec.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # ---- the postmaster process -------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """The live postmaster's PID, whether xcha started it or found it running."""
        if self._child is not None:
            if self._child.poll() is None:
                return self._child.pid
            self._child = None
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if _alive(pid) and _cwd(pid) == os.path.realpath(self.data_dir):
            return pid
        return None

    def is_child(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def reap(self) -> int | None:
        """Collect the exit status of a postmaster xcha started; None while it runs."""
        if self._child is None:
            return None
        code = self._child.poll()
        if code is not None:
            self._child = None
        return code

    def processes(self) -> list[int]:
        """Every live process of this instance: PostgreSQL processes run in the data directory,
        which finds the backends and WAL senders of a postmaster that has died too."""
        target = os.path.realpath(self.data_dir)
        found = []
        for entry in os.listdir("/proc"):
            if (
                entry.isdigit()
                and int(entry) != os.getpid()
                and _cwd(int(entry)) == target
                and _alive(int(entry))
            ):
                found.append(int(entry))
        return found

    async def _wait_gone(self, pids: list[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if not any(_alive(pid) for pid in pids):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)

    async def _clear_leftovers(self) -> None:
        """Before a start: kill what a dead postmaster left behind, and drop lock files that
        name a dead or zombie PID (PostgreSQL takes a zombie for a running postmaster)."""
        leftovers = self.processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self._wait_gone(leftovers, 10)
        lock_files = (self.data_dir / "postmaster.pid", self.spec.socket_dir / f".s.PGSQL.{self.port}.lock")
        for lock in lock_files:
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if not _alive(pid):
                lock.unlink(missing_ok=True)

    async def start(self, timeout: float = 60) -> float:
        """Start the postmaster as a child and wait until it accepts connections."""
        if not self.has_cluster():
            raise InvalidInput(f"{self.data_dir} holds no PostgreSQL cluster")
        started = time.monotonic()
        if self.postmaster_pid() is None:
            await self._clear_leftovers()
            self.runner.make_dir(self.spec.socket_dir)
            self.runner.make_dir(self.spec.log_file.parent, 0o755)
            self._child = self.runner.spawn("postgres", ["-D", str(self.data_dir)], self.spec.log_file)
        await self.wait_ready(timeout)
        return time.monotonic() - started

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last_error = "not started"
        while time.monotonic() < deadline:
            if self.postmaster_pid() is None:
                raise PostgresError(f"PostgreSQL {self.spec.name} exited during start-up:\n{self.log_tail()}")
            try:
                async with await self.connect(timeout=2) as conn:
                    await conn.execute("SELECT 1")
                return
            except (psycopg.Error, TimeoutError) as error:
                last_error = str(error).strip()
            await asyncio.sleep(0.02)
        raise PostgresError(
            f"PostgreSQL {self.spec.name} did not accept connections within {timeout:.0f} s "
            f"({last_error}):\n{self.log_tail()}"
        )

    async def stop(self, mode: StopMode = "fast", timeout: float = 60) -> None:
        """Stop the instance; waits for every process of it to exit."""
        await self._close_session()
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, STOP_SIGNALS[mode])
            if not await self._wait_gone([pid], timeout):
                raise PostgresError(f"{self.spec.name} (PID {pid}) did not stop within {timeout:.0f} s")
        leftovers = self.processes()
        if not await self._wait_gone(leftovers, 5):
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL the postmaster and every process of the instance (fencing a hung server)."""
        await self._close_session()
        victims = self.processes()
        pid = self.postmaster_pid()
        if pid is not None and pid not in victims:
            victims.append(pid)
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        await self._wait_gone(victims, 10)

    async def restart(self, timeout: float = 60) -> None:
        await self.stop("fast")
        await self.start(timeout)

    # ---- SQL ------------------------------------------------------------------------------

    async def connect(self, timeout: float = 5) -> psycopg.AsyncConnection[tuple[object, ...]]:
        """A superuser connection over the instance's private Unix socket, in autocommit."""
        return await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                host=str(self.spec.socket_dir),
                port=self.port,
                user=self.spec.superuser,
                dbname="postgres",
                application_name="xcha",
                autocommit=True,
            ),
            timeout,
        )

    @contextlib.asynccontextmanager
    async def session(self, timeout: float = 5) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        """A kept connection for frequent small queries; dropped after any error."""
        if self._session is None or self._session.closed:
            self._session = await self.connect(timeout)
        try:
            yield self._session
        except BaseException:
            await self._close_session()
            raise

    async def _close_session(self) -> None:
        """Drop the kept session, also while the watch loop's status query is on it."""
        if self._session is not None:
            session, self._session = self._session, None
            await close(session)

    async def control_data(self) -> dict[str, str]:
        """pg_controldata of the (stopped) instance, as a dict of its lines."""
        result = await self.runner.run("pg_controldata", "-D", str(self.data_dir))
        fields = (line.partition(":") for line in result.output.splitlines())
        return {key.strip(): value.strip() for key, sep, value in fields if sep}

    async def shutdown_checkpoint_lsn(self) -> int:
        """Where the last checkpoint of a cleanly stopped server is: every WAL record up to
        it reached the standbys that were streaming at shutdown."""
        return parse_lsn((await self.control_data())["Latest checkpoint location"])

    async def _stopped_in_recovery(self) -> bool:
        """Was this stopped server a standby? (pg_controldata's cluster state)"""
        try:
            state = (await self.control_data()).get("Database cluster state", "")
        except PostgresError:
            return False
        return "recovery" in state

    async def reload(self) -> None:
        async with self.session() as conn:
            await conn.execute("SELECT pg_reload_conf()")

    async def checkpoint(self) -> None:
        async with self.session() as conn:
            await conn.execute("CHECKPOINT")

    async def status(self, timeout: float = 2) -> PgStatus:
        """One snapshot: role, timeline, system id, LSNs, WAL receiver, downstreams."""
        pid = self.postmaster_pid()
        if pid is None:
            return PgStatus(running=False, port=self.port)
        async with self.session(timeout) as conn:
            return await bounded(conn, self._snapshot(conn, pid), timeout)

    async def _snapshot(self, conn: psycopg.AsyncConnection[tuple[object, ...]], pid: int) -> PgStatus:
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
            written = "written_lsn" if self.version >= 130000 else "received_lsn"
            cur = await conn.execute(
                sql.SQL("""SELECT status, sender_host, sender_port,
                                  extract(epoch FROM clock_timestamp() - last_msg_receipt_time)::float8,
                                  {}::text, received_tli FROM pg_stat_wal_receiver""").format(
                    sql.Identifier(written)
                )
            )
            wal_row = await cur.fetchone()
            if wal_row is not None:
                status, host, port, age, written_lsn, received_tli = wal_row
                receiver = WalReceiver(str(status), host, port, age)  # type: ignore[arg-type]
                timeline = received_tli or timeline
                received_text = written_lsn or received
            else:
                received_text = received
        else:
            received_text = None
        cur = await conn.execute(
            """SELECT application_name, state, sync_state, flush_lsn::text, replay_lsn::text,
                      host(client_addr),
                      extract(epoch FROM clock_timestamp() - reply_time)::float8
               FROM pg_stat_replication ORDER BY application_name"""
        )
        downstreams = tuple(
            Downstream(str(name), str(state), str(sync_state), _lsn(flush), _lsn(replay), addr, age)  # type: ignore[arg-type]
            for name, state, sync_state, flush, replay, addr, age in await cur.fetchall()
        )
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
            port=self.port,
        )

    # ---- roles ---------------------------------------------------------------------------------

    async def initdb(self) -> float:
        """Create a new cluster (data checksums on, peer for local, scram for TCP)."""
        if self.has_cluster():
            raise InvalidInput(f"{self.data_dir} already holds a PostgreSQL cluster")
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise InvalidInput(f"{self.data_dir} is not empty")
        self.runner.make_dir(self.data_dir)
        result = await self.runner.run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            self.spec.superuser,
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
            "--data-checksums",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )
        return result.seconds

    async def bootstrap_master(self) -> Timings:
        """initdb, configure as master, start, and create the replication role."""
        initdb = await self.initdb()
        self.configure("master")
        self.runner.make_dir(self.spec.archive_dir, 0o750)
        start = await self.start()
        await self.ensure_replication_role()
        return Timings((("initdb", initdb), ("start", start)))

    async def ensure_replication_role(self) -> None:
        """The role standbys stream with; it may also run pg_rewind, a low-level backup and
        CHECKPOINT (PostgreSQL 15) against this server, without being a superuser."""
        role = sql.Identifier(self.spec.replication_user)
        password = sql.Literal(self.replication_password())
        async with self.session() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", [self.spec.replication_user]
            )
            verb = "ALTER" if await cur.fetchone() else "CREATE"
            await conn.execute(
                sql.SQL(verb + " ROLE {} WITH LOGIN REPLICATION PASSWORD {}").format(role, password)
            )
            functions = [
                "pg_catalog.pg_ls_dir(text, boolean, boolean)",
                "pg_catalog.pg_stat_file(text, boolean)",
                "pg_catalog.pg_read_binary_file(text)",
                "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
            ]
            if self.version >= 150000:
                functions += [
                    "pg_catalog.pg_backup_start(text, boolean)",
                    "pg_catalog.pg_backup_stop(boolean)",
                ]
            else:
                functions += [
                    "pg_catalog.pg_start_backup(text, boolean, boolean)",
                    "pg_catalog.pg_stop_backup(boolean, boolean)",
                ]
            for function in functions:
                await conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION " + function + " TO {}").format(role))
            if self.version >= 150000:
                await conn.execute(sql.SQL("GRANT pg_checkpoint TO {}").format(role))

    async def promote(self, timeout: float = 30) -> float:
        """Promote a standby and wait until it accepts writes; returns the seconds it took.
        Polls itself: pg_promote(wait => true) polls only every 100 ms."""
        started = time.monotonic()
        async with self.session() as conn:
            cur = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0.0
            await conn.execute("SELECT pg_promote(wait => false)")
            while time.monotonic() - started < timeout:
                cur = await conn.execute("SELECT pg_is_in_recovery()")
                row = await cur.fetchone()
                if row is not None and not row[0]:
                    return time.monotonic() - started
                await asyncio.sleep(0.005)
        raise PostgresError(
            f"{self.spec.name} did not finish promotion within {timeout:.0f} s:\n{self.log_tail()}"
        )

    async def take_over_port(self, port: int) -> Timings:
        """The specification's "fallback to slave": a promoted standby restarts on the former
        master's port, so clients need no change (standby.signal / recovery.conf are gone)."""
        check_port(port)
        promote = await self.promote()
        if not self._port_free(port):
            raise PostgresError(
                f"port {port} is still in use (the former master holds it): "
                f"{self.spec.name} stays master on port {self.port}"
            )
        await self.stop("fast")
        self.port = port
        self.configure("master")
        start = await self.start()
        return Timings((("promote", promote), ("restart", start)))

    def _port_free(self, port: int) -> bool:
        address = self.spec.listen_addresses.split(",")[0].strip()
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            # As PostgreSQL binds: connections of the old server in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("" if address in ("*", "localhost") else address, port))
            except OSError:
                return False
        return True

    async def set_synchronous_standbys(self, sync: SyncStandbys | None, timeout: float = 10) -> str:
        """Set (or, with None or no names, clear) synchronous_standby_names and wait until it
        is in effect. Clearing it releases commits that wait for a missing standby."""
        value = sync.render(self.version) if sync is not None else ""
        async with self.session() as conn:
            await conn.execute(
                sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value))
            )
            await conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                cur = await conn.execute("SELECT current_setting('synchronous_standby_names')")
                row = await cur.fetchone()
                if row is not None and row[0] == value:
                    return value
                await asyncio.sleep(0.005)
        raise PostgresError(f"synchronous_standby_names did not take effect on {self.spec.name}")

    # ---- standbys ---------------------------------------------------------------------------

    def _source_conninfo(self, upstream: Endpoint, replication: bool) -> str:
        params: dict[str, str | int] = {
            "host": upstream.host,
            "port": upstream.port,
            "user": self.spec.replication_user,
            "passfile": str(self.spec.passfile),
            "application_name": self.spec.name,
            "connect_timeout": 10,
        }
        if not replication:
            params["dbname"] = "postgres"
        return make_conninfo("", **params)

    def _prepare_empty_data_dir(self) -> None:
        if self.has_cluster():
            raise InvalidInput(f"{self.data_dir} already holds a PostgreSQL cluster")
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise InvalidInput(f"{self.data_dir} is not empty")
        self.runner.make_dir(self.data_dir)

    async def clone_from(
        self, upstream: Endpoint, method: CloneMethod = "basebackup", source_data_dir: Path | None = None
    ) -> float:
        """Make this (empty) instance a standby of upstream; returns the seconds the copy took."""
        if method not in ("basebackup", "lowlevel"):
            raise InvalidInput(f"invalid clone method {method!r}: expected basebackup or lowlevel")
        if method == "lowlevel" and source_data_dir is None:
            raise InvalidInput("the low-level clone copies files: it needs the source's data directory")
        self._prepare_empty_data_dir()
        self._write_passfile()
        started = time.monotonic()
        try:
            if method == "basebackup":
                await self.runner.run(
                    "pg_basebackup",
                    "-D",
                    str(self.data_dir),
                    "-d",
                    self._source_conninfo(upstream, replication=True),
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-password",
                )
            else:
                assert source_data_dir is not None
                await self._lowlevel_copy(upstream, source_data_dir)
        except BaseException:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        self.configure("standby", upstream)
        return seconds

    async def _lowlevel_copy(self, upstream: Endpoint, source: Path) -> None:
        """The specification's method: pg_backup_start, copy the files, pg_backup_stop, and
        write backup_label / tablespace_map from what pg_backup_stop returns."""
        if not (source / "PG_VERSION").exists():
            raise InvalidInput(f"{source} holds no PostgreSQL cluster")
        start, stop = (
            ("pg_backup_start(%s, true)", "pg_backup_stop(true)")
            if self.version >= 150000
            else ("pg_start_backup(%s, true, false)", "pg_stop_backup(false, true)")
        )
        async with await psycopg.AsyncConnection.connect(
            self._source_conninfo(upstream, replication=False), autocommit=True
        ) as conn:
            await conn.execute(f"SELECT {start}", [f"xcha clone {self.spec.name}"])
            try:
                await self._copy_tree(source, self.data_dir)
            finally:
                cur = await conn.execute(f"SELECT labelfile, spcmapfile FROM {stop}")
                row = await cur.fetchone()
        assert row is not None
        labelfile, spcmapfile = row
        self.runner.write_file(self.data_dir / "backup_label", str(labelfile))
        if spcmapfile:
            self.runner.write_file(self.data_dir / "tablespace_map", str(spcmapfile))

    async def _copy_tree(self, source: Path, target: Path) -> None:
        rsync = shutil.which("rsync")
        if rsync is not None:
            excludes = [f"--exclude=/{name}/*" for name in LOWLEVEL_EMPTIED]
            excludes += [f"--exclude={name}" for name in LOWLEVEL_EXCLUDES] + ["--exclude=pgsql_tmp*"]
            process = await asyncio.create_subprocess_exec(
                rsync,
                "-a",
                *excludes,
                f"{source}/",
                f"{target}/",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            output, _ = await process.communicate()
            # 24: some files vanished during the copy, which a running cluster does.
            if process.returncode not in (0, 24):
                raise PostgresError(f"rsync failed (exit {process.returncode}): {output.decode()[-2000:]}")
        else:
            await asyncio.to_thread(_python_copy, source, target)
        self.runner.own_tree(target)
        target.chmod(0o700)

    async def rewind_from(self, source: Endpoint) -> float:
        """pg_rewind this (stopped) former master onto source's timeline, then configure it as
        source's standby. CHECKPOINT on the source first: without it pg_rewind can report
        success and leave a server that fails to start (BRIEF section 5)."""
        await self.stop("fast")
        self._write_passfile()
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(
            self._source_conninfo(source, replication=False), autocommit=True
        ) as conn:
            await conn.execute("CHECKPOINT")
        # --restore-target-wal: crash recovery of the target can recycle WAL that pg_rewind
        # still needs; the archive has it.
        restore = ("--restore-target-wal",) if self.version >= 130000 else ()
        await self.runner.run(
            "pg_rewind",
            "--target-pgdata",
            str(self.data_dir),
            "--source-server",
            self._source_conninfo(source, replication=False),
            *restore,
        )
        seconds = time.monotonic() - started
        self.configure("standby", source)
        return seconds

    def set_aside(self) -> Path:
        """Rename the data directory out of the way (never deleted: it may hold the only copy
        of something an operator wants)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        aside = self.data_dir.with_name(f"{self.data_dir.name}.old-{stamp}")
        self.data_dir.rename(aside)
        return aside

    async def follow(
        self, upstream: Endpoint, method: CloneMethod = "basebackup", source_data_dir: Path | None = None
    ) -> Timings:
        """Become a running standby of upstream by whatever it takes: keep a standby that
        already follows it, rewind a former master, or clone afresh (setting aside data that
        could not be rewound)."""
        steps: list[tuple[str, float]] = []
        if not self.has_cluster():
            steps.append(("clone", await self.clone_from(upstream, method, source_data_dir)))
            steps.append(("start", await self.start()))
            return Timings(tuple(steps))
        status = await self.status() if self.postmaster_pid() else None
        was_standby = status.in_recovery if status is not None else await self._stopped_in_recovery()
        if was_standby:
            await self.stop("fast")
            self.configure("standby", upstream)
            try:
                steps.append(("restart", await self.start()))
                return Timings(tuple(steps))
            except PostgresError:
                await self.stop("immediate")  # e.g. it cannot follow the new timeline: rewind
                steps.append(("restart failed", 0.0))
        try:
            steps.append(("rewind", await self.rewind_from(upstream)))
            steps.append(("start", await self.start()))
        except PostgresError as error:
            await self.stop("immediate")
            aside = self.set_aside()
            steps.append((f"rewind failed ({str(error).splitlines()[0]}); set aside {aside}", 0.0))
            steps.append(("clone", await self.clone_from(upstream, method, source_data_dir)))
            steps.append(("start", await self.start()))
        return Timings(tuple(steps))


def _lsn(text: object) -> int | None:
    return parse_lsn(str(text)) if text else None


def _python_copy(source: Path, target: Path) -> None:
    """A copy of a running cluster's files that tolerates files vanishing under it."""
    for directory, dirnames, filenames in os.walk(source):
        relative = Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        dirnames[:] = [d for d in dirnames if not d.startswith("pgsql_tmp")]
        if relative.parts and relative.parts[0] in LOWLEVEL_EMPTIED:
            continue
        for filename in filenames:
            if filename in LOWLEVEL_EXCLUDES:
                continue
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(Path(directory) / filename, target / relative / filename)
