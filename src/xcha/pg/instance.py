"""The one class that operates a PostgreSQL instance.

It runs the postmaster as its own child process (so a crash is seen at once and the
dead process is reaped), writes the configuration rendered by `xcha.pg.render`, and does
what the specification describes by hand: base backup, synchronous standby, promotion, port
takeover, plus pg_rewind rejoin. Plain PostgreSQL 12+, Postgres-XL 10 and Postgres-XC 1.2
(PostgreSQL 9.3) datanodes alike: what differs by version is in `xcha.pg.versions`, what
differs by flavour in `xcha.pg.flavor`.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from xcha.errors import InvalidInput, PostgresError
from xcha.names import Endpoint, check_port
from xcha.pg import versions
from xcha.pg.client import Conn, bounded, close, connect
from xcha.pg.filecopy import copy_cluster
from xcha.pg.flavor import check_supported
from xcha.pg.ipc import remove_orphaned_segments
from xcha.pg.lsn import parse_lsn
from xcha.pg.render import (
    ALTER_SYSTEM_SINCE,
    INCLUDE_LINE,
    SYNC_CONF,
    ReplicationSpec,
    Role,
    guc_quote,
    render,
)
from xcha.pg.runner import Runner
from xcha.pg.snapshot import take_snapshot
from xcha.pg.spec import InstanceSpec as InstanceSpec  # re-exported: callers build both here
from xcha.pg.spec import Timings as Timings
from xcha.pg.status import PgStatus
from xcha.pg.syncrep import SyncStandbys
from xcha.pg.version import version_text

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
log = logging.getLogger(__name__)
STREAM_WAIT = 5.0  # a restarted standby that does not stream by then cannot follow: rewind it


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
        """version: server_version_num of the runner's binaries (`runner.server_version(bindir,
        spec.flavor)` checks that they are of the spec's flavour)."""
        if spec.pgxc is not None and version:
            check_supported(spec.pgxc.flavor, version)
        self.spec = spec
        self.runner = runner
        self.version = version
        self.port = spec.port
        self._child: subprocess.Popen[bytes] | None = None
        self._session: Conn | None = None

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
        self,
        role: Role,
        upstream: Endpoint | None = None,
        sync: SyncStandbys | None = None,
        detached: bool = False,
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
            pgxc=self.spec.pgxc,
            detached=detached,
        )

    def _write_passfile(self) -> None:
        password = self.replication_password().replace("\\", "\\\\").replace(":", "\\:")
        self.runner.make_dir(self.spec.passfile.parent)
        self.runner.write_file(self.spec.passfile, f"*:*:*:{self.spec.replication_user}:{password}\n")

    def _libpq_env(self) -> dict[str, str]:
        """Before PostgreSQL 10 libpq has no passfile= option: the programs of such a server
        (pg_basebackup, and the WAL receiver inside the postmaster) find the replication
        password through PGPASSFILE."""
        return {} if self.version >= versions.PASSFILE_SINCE else {"PGPASSFILE": str(self.spec.passfile)}

    def configure(self, role: Role, upstream: Endpoint | None = None, detached: bool = False) -> None:
        """Write the files for role; a standby streams from upstream (detached: from no one)."""
        rendering = render(self.replication_spec(role, upstream, detached=detached))
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
        else:
            (self.data_dir / SYNC_CONF).unlink(missing_ok=True)  # before 9.4: copied from the source
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
        lock_files = [self.data_dir / "postmaster.pid", self.spec.socket_dir / f".s.PGSQL.{self.port}.lock"]
        if self.spec.pgxc is not None:  # the XL/XC pooler's socket has a lock file of its own
            lock_files.append(self.spec.socket_dir / f".s.PGPOOL.{self.spec.pgxc.pooler_port}.lock")
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
            self._child = self.runner.spawn(
                "postgres",
                [*versions.postmaster_mode(self.spec.pgxc), "-D", str(self.data_dir)],
                self.spec.log_file,
                env=self._libpq_env(),
            )
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
        if pid is not None:
            await remove_orphaned_segments(pid)

    # ---- SQL ------------------------------------------------------------------------------

    async def connect(self, timeout: float = 5) -> Conn:
        """A superuser connection over the instance's private Unix socket, in autocommit.
        (On an XL/XC datanode such a session's transactions are read-only: status, reload
        and ALTER SYSTEM are what xcha uses it for.)"""
        return await connect(
            "",
            timeout,
            host=str(self.spec.socket_dir),
            port=self.port,
            user=self.spec.superuser,
            dbname="postgres",
            application_name="xcha",
            autocommit=True,
        )

    @contextlib.asynccontextmanager
    async def session(self, timeout: float = 5) -> AsyncIterator[Conn]:
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
        """pg_controldata of the (stopped) instance, as a dict of its lines. The data directory
        is given positionally: 9.3's pg_controldata (Postgres-XC) has no -D."""
        result = await self.runner.run("pg_controldata", str(self.data_dir))
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

    async def status(self, timeout: float = 2, pid: int | None = None) -> PgStatus:
        """One snapshot: role, timeline, system id, LSNs, WAL receiver, downstreams.
        pid: the postmaster's PID when the caller has just looked it up."""
        pid = pid or self.postmaster_pid()
        if pid is None:
            return PgStatus(running=False, port=self.port)
        async with self.session(timeout) as conn:
            return await bounded(
                conn, take_snapshot(conn, self.version, self.data_dir, pid, self.port), timeout
            )

    # ---- roles ---------------------------------------------------------------------------------

    async def initdb(self) -> float:
        """Create a new cluster (data checksums on, peer for local, scram or md5 for TCP)."""
        if self.has_cluster():
            raise InvalidInput(f"{self.data_dir} already holds a PostgreSQL cluster")
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise InvalidInput(f"{self.data_dir} is not empty")
        self.runner.make_dir(self.data_dir)
        node_name = self.spec.pgxc.node_name if self.spec.pgxc is not None else None
        result = await self.runner.run(
            "initdb",
            *versions.initdb_args(
                self.version, self.spec.flavor, self.data_dir, self.spec.superuser, node_name
            ),
        )
        return result.seconds

    async def bootstrap_master(self) -> Timings:
        """initdb, configure as master, start, and create the replication role."""
        initdb = await self.initdb()
        self.configure("master")
        self.runner.make_dir(self.spec.archive_dir, 0o750)
        if self.spec.pgxc is not None:
            await self._create_replication_role_offline()
        start = await self.start()
        if self.spec.pgxc is None:
            await self.ensure_replication_role()
        elif self.spec.pgxc.flavor == "xl" and self.spec.pgxc.node_type == "datanode":
            await self._enter_gtm_xid_range()
        return Timings((("initdb", initdb), ("start", start)))

    async def _enter_gtm_xid_range(self) -> None:
        """Take one transaction id from the GTM and checkpoint, before any standby exists.

        initdb (and the role creation) used this node's local transaction ids (about 600);
        the GTM hands out ids from 60000 on. A standby that replays that jump after its
        starting point crashes every log-in (SIGSEGV in KnownAssignedXidsGetAndSetXmin,
        measured on XL 10 after the first write through a coordinator) until it replays a
        newer running-transactions record, which a dead master never writes. The checkpoint
        writes that record with the GTM's id: every later copy starts past the jump."""
        async with self.session() as conn:
            await conn.execute("SELECT txid_current()")
            await conn.execute("CHECKPOINT")

    def _replication_role_statements(self, exists: bool) -> list[sql.Composed]:
        """The role standbys stream with; it may also run pg_rewind, a low-level backup and
        CHECKPOINT (PostgreSQL 15) against this server, without being a superuser. On
        Postgres-XL 10 it is a superuser: pg_rewind needs one before PostgreSQL 11 (its
        functions check for a superuser inside, so no grant is enough), and so does
        CHECKPOINT before 15."""
        role = sql.Identifier(self.spec.replication_user)
        password = sql.Literal(self.replication_password())
        verb = sql.SQL("ALTER" if exists else "CREATE")
        statements = [sql.SQL("{} ROLE {} WITH LOGIN REPLICATION PASSWORD {}").format(verb, role, password)]
        if versions.rewind_needs_superuser(self.version):
            return [*statements, sql.SQL("ALTER ROLE {} WITH SUPERUSER").format(role)]
        for function in versions.replication_role_functions(self.version):
            statements.append(sql.SQL("GRANT EXECUTE ON FUNCTION " + function + " TO {}").format(role))
        if self.version >= 150000:
            statements.append(sql.SQL("GRANT pg_checkpoint TO {}").format(role))
        return statements

    async def ensure_replication_role(self) -> None:
        """Create (or update) the replication role on this running server."""
        async with self.session() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", [self.spec.replication_user]
            )
            exists = await cur.fetchone() is not None
            for statement in self._replication_role_statements(exists):
                await conn.execute(statement)

    async def _create_replication_role_offline(self) -> None:
        """Create the replication role in a single-user backend of this stopped XL/XC node.

        A running XL/XC datanode makes the transactions of an application's session
        read-only (measured: "cannot execute CREATE ROLE in a read-only transaction"); a
        coordinator's session is writable but speaks an extended protocol no client library
        reads. So the role is created as initdb creates the catalog: `postgres --single
        --localxid`, without the GTM. Its rows are then frozen: a transaction id of this
        node's local counter means nothing to the GTM's snapshots."""
        if "\n" in self.replication_password() or "\r" in self.replication_password():
            raise InvalidInput(f"replication password file {self.spec.password_file} has more than one line")
        statements = self._replication_role_statements(exists=False)
        script = [statement.as_string(None) for statement in statements]
        script.append("VACUUM FREEZE pg_catalog.pg_authid")
        if len(statements) > 1:
            script.append("VACUUM FREEZE pg_catalog.pg_proc")
        await self.runner.run(
            "postgres",
            *versions.single_user_args(self.data_dir),
            input="\n".join(script) + "\n",
        )

    async def promote(self, timeout: float = 30) -> float:
        """Promote a standby and wait until it accepts writes; returns the seconds it took.
        Polls itself: pg_promote(wait => true) polls only every 100 ms. Before 12 there is no
        pg_promote(): `pg_ctl promote` (without waiting) signals the server."""
        started = time.monotonic()
        async with self.session() as conn:
            cur = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0.0
            if self.version >= versions.PG_PROMOTE_SINCE:
                await conn.execute("SELECT pg_promote(wait => false)")
            else:
                await self.runner.run("pg_ctl", *versions.pg_ctl_promote_args(self.version, self.data_dir))
            while time.monotonic() - started < timeout:
                cur = await conn.execute("SELECT pg_is_in_recovery()")
                row = await cur.fetchone()
                if row is not None and not row[0]:
                    if self.spec.flavor == "xl":
                        # Back to GTM snapshots (a standby's are its own: see render).
                        self.configure("master")
                        await conn.execute("SELECT pg_reload_conf()")
                    return time.monotonic() - started
                await asyncio.sleep(0.005)
        raise PostgresError(
            f"{self.spec.name} did not finish promotion within {timeout:.0f} s:\n{self.log_tail()}"
        )

    async def take_over_port(self, port: int) -> Timings:
        """The specification's "fallback to slave": the promoted standby (a master by now:
        promote it first) restarts on the former master's port, so clients need no change."""
        check_port(port)
        if not self._port_free(port):
            raise PostgresError(
                f"port {port} is still in use (the former master holds it): "
                f"{self.spec.name} stays master on port {self.port}"
            )
        await self.stop("fast")
        self.port = port
        self.configure("master")
        start = await self.start()
        return Timings((("restart", start),))

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
            if self.version >= ALTER_SYSTEM_SINCE:
                await conn.execute(
                    sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value))
                )
            else:
                # No ALTER SYSTEM before 9.4: the file postgresql.xcha.conf includes last.
                self.runner.write_file(
                    self.data_dir / SYNC_CONF,
                    f"# Managed by xcha: set at run time\nsynchronous_standby_names = {guc_quote(value)}\n",
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

    def _source_conninfo(self, upstream: Endpoint, replication: bool, program: bool = False) -> str:
        """How this instance's copy connects to upstream. program: for a program of the
        server's version (pg_basebackup, pg_rewind), whose libpq may predate passfile=."""
        # The copy's WAL stream shows in pg_stat_replication under this application_name:
        # it must never match a member's name ('-' is not allowed in one), or the master
        # would count a standby that cannot run yet among its synchronous standbys.
        params: dict[str, str | int] = {
            "host": upstream.host,
            "port": upstream.port,
            "user": self.spec.replication_user,
            "passfile": str(self.spec.passfile),
            "application_name": f"xcha-clone-{self.spec.name}",
            "connect_timeout": 10,
        }
        if program and self.version < versions.PASSFILE_SINCE:
            del params["passfile"]  # PGPASSFILE instead: see _libpq_env
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
                    self._source_conninfo(upstream, replication=True, program=True),
                    "-X",
                    versions.basebackup_wal_method(self.version),
                    "-c",
                    "fast",
                    "--no-password",
                    env=self._libpq_env(),
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
        write backup_label / tablespace_map from what pg_backup_stop returns (before 9.6 the
        backup is exclusive: backup_label is in the source's directory and copied with it)."""
        if not (source / "PG_VERSION").exists():
            raise InvalidInput(f"{source} holds no PostgreSQL cluster")
        calls = versions.backup_calls(self.version)
        async with await psycopg.AsyncConnection.connect(
            self._source_conninfo(upstream, replication=False), autocommit=True
        ) as conn:
            await conn.execute(calls.start, [f"xcha clone {self.spec.name}"])
            try:
                await copy_cluster(self.runner, source, self.data_dir, keep_backup_label=calls.exclusive)
            finally:
                cur = await conn.execute(calls.stop)
                row = await cur.fetchone()
        if calls.exclusive:
            if not (self.data_dir / "backup_label").exists():
                raise PostgresError(f"the copy of {source} holds no backup_label: it cannot be started")
            return
        assert row is not None
        labelfile, spcmapfile = row
        self.runner.write_file(self.data_dir / "backup_label", str(labelfile))
        if spcmapfile:
            self.runner.write_file(self.data_dir / "tablespace_map", str(spcmapfile))

    @property
    def can_rewind(self) -> bool:
        """Whether this server's version has pg_rewind (9.5+; Postgres-XC 1.2 is 9.3)."""
        return self.version >= versions.PG_REWIND_SINCE and os.access(
            self.runner.bindir / "pg_rewind", os.X_OK
        )

    def _no_rewind_reason(self) -> str:
        return f"no pg_rewind on PostgreSQL {version_text(self.version)}"

    async def rewind_from(self, source: Endpoint) -> float:
        """pg_rewind this (stopped) former master onto source's timeline, then configure it as
        source's standby. CHECKPOINT on the source first: pg_rewind reads the source's
        timeline from its pg_control, which a promoted server updates at its first
        checkpoint; without it pg_rewind can report success and leave a server that fails to
        start."""
        if not self.can_rewind:
            raise PostgresError(f"{self.spec.name}: {self._no_rewind_reason()}: re-clone instead")
        await self.stop("fast")
        # pg_rewind's crash recovery refuses a lock file naming a live PID, and a killed
        # postmaster whose parent was the agent's predecessor stays a zombie until init reaps it
        # (1.5-2 s here): measured as "lock file already exists", then a needless re-clone.
        await self._clear_leftovers()
        self._write_passfile()
        started = time.monotonic()
        if self.version < versions.REWIND_RECOVERS_SINCE:
            await self._ensure_clean_shutdown()
        async with await psycopg.AsyncConnection.connect(
            self._source_conninfo(source, replication=False), autocommit=True
        ) as conn:
            await conn.execute("CHECKPOINT")
            # --restore-target-wal: crash recovery of the target can recycle WAL that
            # pg_rewind still needs; the archive has it.
            restore = ("--restore-target-wal",) if self.version >= 130000 else ()
            await self.runner.run(
                "pg_rewind",
                "--target-pgdata",
                str(self.data_dir),
                "--source-server",
                self._source_conninfo(source, replication=False, program=True),
                *restore,
                env=self._libpq_env(),
            )
            if self.spec.flavor == "xl":
                # An XL hot standby that replayed a large jump of transaction ids (XL's ids
                # come from the GTM) crashes every log-in (SIGSEGV in
                # KnownAssignedXidsGetAndSetXmin) until it replays a newer running-
                # transactions record; a checkpoint on the source writes one, so the rewound
                # standby starts clean (measured without this and without the bootstrap's
                # _enter_gtm_xid_range: 14 s of crash loop, until the source's next periodic
                # record).
                await conn.execute("CHECKPOINT")
        seconds = time.monotonic() - started
        self.configure("standby", source)
        return seconds

    async def _ensure_clean_shutdown(self) -> None:
        """Before 13 pg_rewind refuses a target that was not shut down cleanly (a killed
        master): recover it in a single-user backend first, as pg_rewind 13 does itself.
        Crash recovery only: a standby's recovery.conf is set aside for it (single-user mode
        has no standby mode); rewinding configures the server afresh anyway."""
        state = (await self.control_data()).get("Database cluster state", "")
        if state in ("shut down", "shut down in recovery"):
            return
        for marker in ("recovery.conf", "standby.signal", "recovery.signal"):
            (self.data_dir / marker).unlink(missing_ok=True)
        await self.runner.run(
            "postgres", *versions.single_user_recovery_args(self.spec.flavor, self.data_dir)
        )

    def set_aside(self) -> Path:
        """Rename the data directory out of the way (never deleted: it may hold the only copy
        of something an operator wants)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        aside = self.data_dir.with_name(f"{self.data_dir.name}.old-{stamp}")
        self.data_dir.rename(aside)
        return aside

    async def detach(self, timeout: float = 30) -> float:
        """Stop this standby's WAL receiver for good (until `follow` configures an upstream
        again): it is configured without primary_conninfo, which 13+ applies on a reload; 12
        (primary_conninfo needs a restart) and older (recovery.conf) restart the standby. A
        WAL receiver merely killed would be started again by the startup process. Returns the
        seconds taken; a stopped standby is only configured."""
        started = time.monotonic()
        self.configure("standby", detached=True)
        if self.postmaster_pid() is None:
            return time.monotonic() - started
        if self.version >= versions.PRIMARY_CONNINFO_RELOADS_SINCE:
            await self.reload()
        else:
            await self.stop("fast")
            await self.start()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(PostgresError, psycopg.Error, OSError, TimeoutError):
                status = await self.status(timeout=1.0)
                if status.running and status.in_recovery and status.wal_receiver is None:
                    return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise PostgresError(f"the WAL receiver still runs {timeout:g} s after detaching")
            await asyncio.sleep(0.02)

    async def _streams_from(self, upstream: Endpoint, timeout: float) -> bool:
        """Whether this standby's WAL receiver streams from upstream within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(PostgresError, psycopg.Error, OSError, TimeoutError):
                receiver = (await self.status(timeout=1.0)).wal_receiver
                if (
                    receiver is not None
                    and receiver.status == "streaming"
                    and (receiver.upstream_host, receiver.upstream_port) == (upstream.host, upstream.port)
                ):
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def follow(
        self, upstream: Endpoint, method: CloneMethod = "basebackup", source_data_dir: Path | None = None
    ) -> Timings:
        """Become a running standby of upstream by whatever it takes: keep a standby that
        already follows it, rewind a former master, or clone afresh (setting aside data that
        could not be rewound). Without pg_rewind (PostgreSQL 9.3: Postgres-XC) a former
        master is re-cloned, and the steps say so: "re-clone (no pg_rewind on ...)"."""
        steps: list[tuple[str, float]] = []
        if not self.has_cluster():
            steps.append(("clone", await self.clone_from(upstream, method, source_data_dir)))
            steps.append(("start", await self.start()))
            return Timings(tuple(steps))
        status = await self.status()
        was_standby = status.in_recovery if status.running else await self._stopped_in_recovery()
        if was_standby:
            await self.stop("fast")
            self.configure("standby", upstream)
            try:
                steps.append(("restart", await self.start()))
                if await self._streams_from(upstream, STREAM_WAIT):
                    return Timings(tuple(steps))
                # It runs but cannot follow: it holds WAL past the point where the new master's
                # timeline forked off (an async standby ahead of the promoted one). Restarting
                # again would loop; pg_rewind takes it back to the fork point.
                steps.append((f"not streaming within {STREAM_WAIT:g} s", STREAM_WAIT))
            except PostgresError:
                steps.append(("restart failed", 0.0))
            await self.stop("immediate")
        if not self.can_rewind:
            await self.stop("immediate")
            steps.append((f"set aside {self.set_aside()}", 0.0))
            reclone = await self.clone_from(upstream, method, source_data_dir)
            steps.append((f"re-clone ({self._no_rewind_reason()})", reclone))
            steps.append(("start", await self.start()))
            return Timings(tuple(steps))
        try:
            steps.append(("rewind", await self.rewind_from(upstream)))
            steps.append(("start", await self.start()))
        except PostgresError as error:
            await self.stop("immediate")
            aside = self.set_aside()
            # The program's error is its last line (its first ones report progress).
            said = [line for line in str(error).splitlines() if line.strip()]
            log.warning("%s: rewind failed, re-cloning: %s", self.spec.name, error)
            steps.append((f"rewind failed ({said[-1] if said else error}); set aside {aside}", 0.0))
            steps.append(("clone", await self.clone_from(upstream, method, source_data_dir)))
            steps.append(("start", await self.start()))
        return Timings(tuple(steps))
