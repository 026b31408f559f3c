"""`xcha demo`: the specification's master/slave pair on real PostgreSQL, end to end.

Builds a master and a synchronous standby (the seed's 5432/5433 pair, on free ports),
commits on the master, reads it on the standby, promotes the standby ("fallback to
slave"), writes to it, rejoins the old master with pg_rewind, and tears it all down.
"""

import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from secrets import token_hex

from xcha.pg.instance import InstanceSpec, PostgresInstance
from xcha.pg.runner import OsUser, Runner, find_bindir, server_version
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.pg.version import version_text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Steps:
    """Prints each step as it happens and keeps its duration."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def done(self, key: str, text: str, seconds: float) -> None:
        self.timings[key] = round(seconds * 1000, 1)
        self.say(f"  {text:<58} {seconds * 1000:8.1f} ms")


async def _query(instance: PostgresInstance, statement: str) -> list[tuple[object, ...]]:
    async with await instance.connect() as conn:
        cur = await conn.execute(statement)
        return await cur.fetchall() if cur.description else []


async def run_demo(workdir: Path | None = None, as_json: bool = False) -> int:
    steps = Steps(quiet=as_json)
    bindir = find_bindir()
    version = server_version(bindir)
    runner = Runner(bindir, OsUser.for_postgres())
    base = Path(tempfile.mkdtemp(prefix="xcha-demo-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    password_file = base / "replication.password"
    password_file.write_text(token_hex(16) + "\n")
    password_file.chmod(0o600)
    archive = base / "archive"
    master = PostgresInstance(
        InstanceSpec.under(base / "dn1a", "dn1a", free_port(), archive, password_file), runner, version
    )
    standby = PostgresInstance(
        InstanceSpec.under(base / "dn1b", "dn1b", free_port(), archive, password_file), runner, version
    )
    steps.say(
        f"xcha demo: PostgreSQL {version_text(version)} from {bindir}, running as OS user "
        f"{runner.user.name}, in {base}"
    )
    ok = False
    try:
        timings = await master.bootstrap_master()
        steps.done("initdb_ms", f"initdb master dn1a (port {master.port})", timings["initdb"])
        steps.done("master_start_ms", "start master", timings["start"])
        timings = await standby.follow(master.spec.endpoint)
        steps.done("clone_ms", f"pg_basebackup standby dn1b (port {standby.port})", timings["clone"])
        steps.done("standby_start_ms", "start standby", timings["start"])
        started = time.monotonic()
        await master.set_synchronous_standbys(SyncStandbys(SyncPolicy(), ("dn1b",)))
        while (d := (await master.status()).downstream("dn1b")) is None or d.sync_state != "sync":
            if time.monotonic() - started > 30:
                raise TimeoutError("dn1b did not become a synchronous standby within 30 s")
        steps.done(
            "sync_ms",
            "synchronous_standby_names = 'FIRST 1 (dn1b)', sync_state = sync",
            time.monotonic() - started,
        )
        await _query(master, "CREATE TABLE demo (id int PRIMARY KEY, note text)")
        started = time.monotonic()
        await _query(master, "INSERT INTO demo VALUES (1, 'committed on the master')")
        steps.done("commit_ms", "synchronous commit on the master", time.monotonic() - started)
        started = time.monotonic()
        visible = "SELECT to_regclass('demo') IS NOT NULL AND EXISTS (SELECT FROM demo WHERE id = 1)"
        while await _query(standby, visible) != [(True,)]:
            if time.monotonic() - started > 30:
                raise TimeoutError("the row did not reach the standby within 30 s")
        steps.done("standby_read_ms", "row read back on the standby", time.monotonic() - started)
        await master.kill()
        steps.say("  master killed (SIGKILL): falling back to the slave")
        steps.done("promote_ms", "promote dn1b until it accepts a write", await standby.promote())
        await _query(standby, "INSERT INTO demo VALUES (2, 'written after the promotion')")
        timings = await master.follow(standby.spec.endpoint)
        step_names = [name for name, _ in timings.steps]
        steps.done(
            "rejoin_ms",
            f"old master rejoins as standby ({' + '.join(step_names)})",
            sum(seconds for _, seconds in timings.steps),
        )
        rows = await _query(standby, "SELECT id FROM demo ORDER BY id")
        ok = rows == [(1,), (2,)] and (await master.status()).in_recovery is True
        steps.say(
            f"  rows on the new master: {[row[0] for row in rows]}; "
            f"dn1a is {'a standby again' if ok else 'NOT a standby'}"
        )
    finally:
        await master.kill()
        await standby.kill()
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        steps.say(
            "  torn down: no PostgreSQL process left"
            if not master.processes() and not standby.processes()
            else "  WARNING: processes left behind"
        )
    if as_json:
        print(json.dumps({"ok": ok, "postgres_version": version_text(version), **steps.timings}))
    else:
        print("demo " + ("succeeded" if ok else "FAILED"), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
