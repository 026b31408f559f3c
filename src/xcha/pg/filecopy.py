"""The file copy of the low-level clone: a running cluster's files, as the PostgreSQL docs
("Making a base backup using the low level API") say to copy them, with rsync when present."""

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from xcha.errors import PostgresError
from xcha.pg.runner import Runner

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
# Before PostgreSQL 10 the WAL directory was pg_xlog (Postgres-XC 1.2 is 9.3).
LOWLEVEL_EMPTIED_OLD = ("pg_xlog",)


async def copy_cluster(runner: Runner, source: Path, target: Path, keep_backup_label: bool = False) -> None:
    """Copy source's files to target, owned by runner's user. keep_backup_label: an exclusive
    backup (before 9.6) left backup_label in the source's directory, and the copy needs it."""
    left_out = tuple(n for n in LOWLEVEL_EXCLUDES if not (keep_backup_label and n == "backup_label"))
    rsync = shutil.which("rsync")
    if rsync is not None:
        excludes = [f"--exclude=/{name}/*" for name in (*LOWLEVEL_EMPTIED, *LOWLEVEL_EMPTIED_OLD)]
        excludes += [f"--exclude={name}" for name in left_out] + ["--exclude=pgsql_tmp*"]
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
        await asyncio.to_thread(_python_copy, source, target, left_out)
    runner.own_tree(target)
    target.chmod(0o700)


def _python_copy(source: Path, target: Path, left_out: tuple[str, ...] = LOWLEVEL_EXCLUDES) -> None:
    """A copy of a running cluster's files that tolerates files vanishing under it."""
    for directory, dirnames, filenames in os.walk(source):
        relative = Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        dirnames[:] = [d for d in dirnames if not d.startswith("pgsql_tmp")]
        if relative.parts and relative.parts[0] in (*LOWLEVEL_EMPTIED, *LOWLEVEL_EMPTIED_OLD):
            continue
        for filename in filenames:
            if filename in left_out:
                continue
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(Path(directory) / filename, target / relative / filename)
