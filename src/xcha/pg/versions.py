"""What PostgresInstance does differently by server version and flavour: command lines and
function names. Versions below 12 are operated only as Postgres-XL 10 (PostgreSQL 10.9) and
Postgres-XC 1.2.1 (PostgreSQL 9.3.2); the facts are from the PostgreSQL release notes and
were checked on those two builds.
"""

from dataclasses import dataclass
from pathlib import Path

from xcha.pg.flavor import Flavor, PgxcSettings, password_method

PASSFILE_SINCE = 100000  # libpq's passfile= connection option (older: PGPASSFILE)
PRIMARY_CONNINFO_RELOADS_SINCE = 130000  # a reload applies primary_conninfo (before: a restart)
PG_PROMOTE_SINCE = 120000  # pg_promote(); before it `pg_ctl promote`
PG_CTL_WAITS_SINCE = 100000  # pg_ctl promote waits unless -W (9.3: never waits, takes only -D)
PG_REWIND_SINCE = 90500
REWIND_RECOVERS_SINCE = 130000  # pg_rewind recovers a target that was not shut down cleanly
# pg_rewind's functions (pg_ls_dir, pg_read_binary_file, ...) check for a superuser inside
# before 11, so no GRANT lets another role run pg_rewind; CHECKPOINT needs one before 15.
REWIND_WITHOUT_SUPERUSER_SINCE = 110000
NON_EXCLUSIVE_BACKUP_SINCE = 90600
BACKUP_START_STOP_RENAMED = 150000  # pg_backup_start / pg_backup_stop


def postmaster_mode(pgxc: PgxcSettings | None) -> tuple[str, ...]:
    """The XL/XC postmaster must be told what it is (`pg_ctl start -Z datanode` passes this)."""
    return (f"--{pgxc.node_type}",) if pgxc is not None else ()


def single_user_args(data_dir: Path) -> tuple[str, ...]:
    """A single-user backend of an XL/XC node reading one statement per line from stdin, as
    initdb runs its own (local transaction ids: no GTM needed)."""
    return ("--single", "--localxid", "-F", "-O", "-c", "exit_on_error=true", "-D", str(data_dir), "postgres")


def single_user_recovery_args(flavor: Flavor, data_dir: Path) -> tuple[str, ...]:
    """A single-user backend that only runs crash recovery and shuts down cleanly (stdin
    empty), as pg_rewind 13 runs it; XL/XC with local transaction ids, without the GTM."""
    local_xid = ("--localxid",) if flavor != "postgresql" else ()
    return ("--single", *local_xid, "-F", "-D", str(data_dir), "template1")


def initdb_args(
    version: int, flavor: Flavor, data_dir: Path, superuser: str, node_name: str | None
) -> tuple[str, ...]:
    """A new cluster: data checksums, peer for local, scram (md5 before 10 and on XL) for
    TCP; an XL/XC node gets its node name."""
    args = [
        "-D",
        str(data_dir),
        "-U",
        superuser,
        "--auth-local=peer",
        f"--auth-host={password_method(version, flavor)}",
        "--data-checksums",
        "--encoding=UTF8",
        "--locale=C",
    ]
    if version >= 130000:
        args.append("--no-instructions")
    if node_name is not None:
        args.append(f"--nodename={node_name}")
    return tuple(args)


def basebackup_wal_method(version: int) -> str:
    """How pg_basebackup gets the WAL of the copy. 9.3's background WAL streamer notices the
    end of the backup only at its next status interval (10 s): a re-clone from a promoted
    XC datanode took 10.1 s with -X stream and 0.24 s with -X fetch (measured). The master
    keeps the WAL a fetch needs (wal_keep_segments)."""
    return "stream" if version >= 100000 else "fetch"


def pg_ctl_promote_args(version: int, data_dir: Path) -> tuple[str, ...]:
    """`pg_ctl promote` that returns at once (xcha polls for writability every 5 ms)."""
    no_wait = ("-W",) if version >= PG_CTL_WAITS_SINCE else ()
    return ("promote", *no_wait, "-D", str(data_dir))


def rewind_needs_superuser(version: int) -> bool:
    return PG_REWIND_SINCE <= version < REWIND_WITHOUT_SUPERUSER_SINCE


def replication_role_functions(version: int) -> tuple[str, ...]:
    """Functions the replication role is granted: pg_rewind's (11+; 9.5-10 check for a
    superuser inside) and the low-level backup's (9.6+; 9.3 lets a replication role run
    pg_start_backup as it is)."""
    functions: list[str] = []
    if version >= PG_REWIND_SINCE:
        functions += [
            "pg_catalog.pg_ls_dir(text, boolean, boolean)",
            "pg_catalog.pg_stat_file(text, boolean)",
            "pg_catalog.pg_read_binary_file(text)",
            "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
        ]
    if version >= BACKUP_START_STOP_RENAMED:
        functions += ["pg_catalog.pg_backup_start(text, boolean)", "pg_catalog.pg_backup_stop(boolean)"]
    elif version >= 100000:
        functions += [
            "pg_catalog.pg_start_backup(text, boolean, boolean)",
            "pg_catalog.pg_stop_backup(boolean, boolean)",
        ]
    return tuple(functions)


@dataclass(frozen=True)
class BackupCalls:
    """The low-level backup's start and stop. An exclusive backup (before 9.6) writes
    backup_label into the source's data directory, so the file copy carries it."""

    start: str  # one %s: the label
    stop: str
    exclusive: bool


def backup_calls(version: int) -> BackupCalls:
    if version >= BACKUP_START_STOP_RENAMED:
        return BackupCalls(
            "SELECT pg_backup_start(%s, true)",
            "SELECT labelfile, spcmapfile FROM pg_backup_stop(true)",
            False,
        )
    if version >= 100000:
        return BackupCalls(
            "SELECT pg_start_backup(%s, true, false)",
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, true)",
            False,
        )
    if version >= NON_EXCLUSIVE_BACKUP_SINCE:
        return BackupCalls(
            "SELECT pg_start_backup(%s, true, false)",
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false)",
            False,
        )
    return BackupCalls("SELECT pg_start_backup(%s, true)", "SELECT pg_stop_backup()", True)
