"""`xcha demo --xl` / `--xc`: the demo on a real Postgres-XL 10 or Postgres-XC 1.2 cluster.

A GTM, two coordinators (coord1, coord2), two datanodes (each a master with a synchronous
standby under xcha's agents) and the controller with the `pgxc` router, which re-points both
coordinators as one barrier. Through EACH coordinator: a writer of single-row autocommit
inserts per datanode (ids the distributed table's hash sends to it) and a writer of 2-datanode
transactions (BEGIN; a row on dn1; a row on dn2; COMMIT). dn1's master is killed with SIGKILL.

The writers never prepare statements (psycopg's prepare_threshold=None): XC's
pgxc_pool_reload() drops every session's prepared statements. A COMMIT is judged by its rows,
never by its answer: XC answers ROLLBACK, without an error, to the COMMIT of a transaction its
reload aborted, and most drivers (psycopg's conn.commit()) report that as committed.

Two kinds of false COMMIT are counted apart (xcha.workload.classify): one sent before the
re-point started, racing the crash itself, meets the cluster's own two-phase commit at its
weakest and is reported; any other is xcha's to prevent and fails the demo.
"""

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import sql

from xcha.ctl import status_table
from xcha.demo import Progress, Report, _operation_timings, _showing, demo_workdir, pgxc_plan, staged
from xcha.errors import XchaError
from xcha.harness import LoadedCluster, Recovery
from xcha.pg.flavor import PRODUCTS, check_flavor
from xcha.topology import settling
from xcha.workload import Transaction

COORDINATORS = ("coord1", "coord2")
# A join not on the distribution key: one side's rows must move to where the other's are.
JOIN_QUERY = "SELECT count(*) FROM xcha_writes a JOIN xcha_writes b ON a.id = b.id - 1"
DATANODE_IDS = "SELECT node_id, node_name FROM pgxc_node WHERE node_type = 'D'"
ROW_NODES = "SELECT id, xc_node_id FROM xcha_writes"


@dataclass
class PgxcReport(Report):
    flavor: str = "xl"
    coordinators: list[str] = field(default_factory=list)
    reroute_started_ms: float | None = None
    repointed_ms: dict[str, float] = field(default_factory=dict)  # each coordinator's own route
    reroute_attempts: dict[str, int] = field(default_factory=dict)
    first_write_ms: dict[str, float] = field(default_factory=dict)  # to dn1, through each coordinator
    catalogs_ms: float | None = None  # XL: every datanode's catalog has the new address
    cleanup_ms: float | None = None  # the in-doubt cleanup (pgxc_clean -a) finished
    cleanup: str = ""  # what it said (the last line the router keeps)
    transactions: int = 0  # 2-datanode transactions whose COMMIT was sent
    transactions_committed: int = 0  # answered COMMIT, both rows present
    false_commits: int = 0  # COMMIT returned, rows missing, not racing the crash: xcha's
    false_commits_at_crash: int = 0  # COMMIT sent before the re-point started: the cluster's 2PC
    torn: int = 0  # one row present and not the other, not racing the crash
    torn_at_crash: int = 0
    rows_checked: int = 0  # rows whose datanode (xc_node_id) was compared with the routing
    misrouted: int = 0
    join_rows: int | None = None
    join_expected: int | None = None
    join_plan: str = ""  # the plan line that says where the rows meet
    join_ok: bool = False
    prepared_left: int | None = None  # prepared transactions on the datanodes at the end
    prepared_gids: list[str] = field(default_factory=list)  # theirs, as "datanode: gid"
    rejoin_ms: float | None = None  # the old master's Follow, as its agent timed it (XC: a re-clone)
    # Each false commit and torn transaction: its kind, ids, rows present, the COMMIT's answer,
    # and when it began, sent its COMMIT and was answered (ms from the kill).
    bad_transactions: list[dict[str, object]] = field(default_factory=list)


async def run_pgxc_demo(flavor: str, workdir: Path | None = None, as_json: bool = False) -> int:
    """The demo on Postgres-XL (flavor xl) or XC (xc); 0 when every check passed. With as_json,
    one JSON object is the last line of the output whatever happened."""
    progress = Progress(quiet=as_json)
    cluster = LoadedCluster(
        demo_workdir(workdir), pgxc_plan(flavor), coordinators=COORDINATORS, transactions=True
    )
    report = PgxcReport(router="pgxc", flavor=flavor, coordinators=list(COORDINATORS))
    await staged(cluster, progress, report, _run, temporary=workdir is None)
    failed = failures(report)
    if as_json:
        print(report.as_json())
    elif report.error is not None:
        print(f"\nFAILED: {report.error}")
    else:
        crash = (
            f"; {report.false_commits_at_crash} false COMMIT(s) raced the crash itself (the cluster's "
            "two-phase commit, before any re-point)"
            if report.false_commits_at_crash
            else ""
        )
        resumed = f"; writes through every coordinator resumed {report.rto_ms:.0f} ms after the kill"
        print(
            f"\n{'FAILED: ' + ', '.join(failed) if failed else 'OK'}: {report.acknowledged} acknowledged "
            f"single-row commits and {report.transactions_committed} committed transactions, "
            f"{report.lost} lost, {report.false_commits} false COMMIT(s) spanning the re-point"
            f"{crash}{resumed if report.rto_ms else ''}"
        )
    return 1 if failed else 0


def failures(report: PgxcReport) -> list[str]:
    """What makes the demo fail; a false commit or torn transaction that raced the crash does not."""
    checks = [
        (report.error is None, "stopped by an error"),
        (report.failed_over, "no failover"),
        (report.lost == 0, "commits lost"),
        (report.unexpected == 0, "rows never sent"),
        (report.false_commits == 0, "false COMMITs spanning the re-point"),
        (report.torn == 0, "torn transactions"),
        (report.misrouted == 0, "rows on another datanode than routed"),
        (report.join_ok, "the join"),
        (report.old_master_rejoined, "the old master did not rejoin"),
    ]
    return [what for passed, what in checks if not passed]


async def _run(cluster: LoadedCluster, progress: Progress, report: PgxcReport) -> None:
    topology = cluster.topology
    product = PRODUCTS[check_flavor(report.flavor)]
    progress.say(
        f"xcha demo on {product} in {topology.workdir}: a GTM, 2 coordinators (coord1, coord2), "
        "2 datanodes x (master + synchronous standby), router pgxc, mTLS"
    )
    progress.say(
        "starting the GTM, the controller and 4 agents; they bootstrap dn1a and dn2a (initdb) and clone "
        "dn1b and dn2b (pg_basebackup); then the coordinators, every node registered with every other, "
        "and xcha_writes distributed by hash over dn1 and dn2:"
    )
    show = _showing(progress)
    status = await cluster.start(on_status=show)
    if not progress.quiet:
        print("\n" + status_table(status))
    progress.say(
        "writing through coord1 and through coord2: single-row inserts routed to dn1 and to dn2, and "
        "2-datanode transactions (BEGIN; a row on dn1; a row on dn2; COMMIT); psycopg never prepares "
        "a statement (XC's pgxc_pool_reload() drops them); every COMMIT is judged by its rows"
    )
    await asyncio.sleep(1.5)
    singles = sum(len(w.acknowledged) for w in cluster.single_writers())
    transactions = sum(len(w.transactions) for w in cluster.transaction_writers.values())
    fault = cluster.kill_master("dn1")
    progress.say(
        f"({singles} single-row commits, {transactions} transactions so far); killed dn1's master "
        f"{fault.member} with SIGKILL"
    )
    recovery = await cluster.recovery(fault)
    report.failed_over = True
    _timeline(recovery, fault.at, report)
    progress.say("waiting for the old master to rejoin as the new synchronous standby:")
    try:
        after = await topology.wait_for(settling(show), 90, "the old master to rejoin")
        report.old_master_rejoined = True
    except XchaError as error:
        progress.say(f"  {error}")
        after = topology.status()
    report.epoch = after.epoch
    await asyncio.sleep(1.0)
    started = recovery.repoint.started if recovery.repoint else fault.at
    outcome, judged, present = await cluster.finish_all([(fault.at, started)])
    report.acknowledged, report.lost = outcome.acknowledged, len(outcome.lost)
    report.unexpected = len(outcome.unexpected)
    report.transactions, report.transactions_committed = judged.transactions, judged.committed
    report.false_commits, report.false_commits_at_crash = (
        len(judged.false_commits),
        len(judged.false_commits_at_crash),
    )
    report.torn, report.torn_at_crash = len(judged.torn), len(judged.torn_at_crash)
    for kind, listed in (
        ("false commit spanning the re-point", judged.false_commits),
        ("false commit racing the crash", judged.false_commits_at_crash),
        ("torn", judged.torn),
        ("torn racing the crash", judged.torn_at_crash),
    ):
        report.bad_transactions += [_described(kind, t, fault.at, present) for t in listed]
    report.dn2_failed_writes = sum(
        len([t for t, _ in through["dn2"].failures if t >= fault.at])
        for through in cluster.writers_through.values()
    )
    await _checks(cluster, present, report)
    _operation_timings(cluster, fault.epoch, report)
    for event in cluster.events("dn1", "follow"):
        seconds = json.loads(event.details_json or "{}").get("seconds")
        if event.epoch > fault.epoch and isinstance(seconds, float):
            report.rejoin_ms = seconds * 1000
    if not progress.quiet:
        print("\n" + status_table(after))
        _print(report, fault.member, outcome.present)


def _timeline(recovery: Recovery, fault_at: float, report: PgxcReport) -> None:
    def since(at: float | None) -> float | None:
        return (at - fault_at) * 1000 if at is not None else None

    report.rto_ms, report.detect_ms = recovery.rto_ms, recovery.detect_ms
    report.promote_ms, report.reroute_ms = recovery.promote_ms, recovery.reroute_ms
    report.first_write_ms = dict(recovery.first_write_ms)
    marks = recovery.repoint
    if marks is not None:
        report.reroute_started_ms = since(marks.started)
        report.repointed_ms = {name: (at - fault_at) * 1000 for name, at in marks.coordinators.items()}
        report.reroute_attempts = dict(marks.attempts)
        report.catalogs_ms, report.cleanup_ms = since(marks.catalogs), since(marks.cleanup)
        report.cleanup = marks.cleanup_said


async def _checks(cluster: LoadedCluster, present: set[int], report: PgxcReport) -> None:
    """Through coord1, as the superuser: each row on the datanode its id was routed to
    (xc_node_id against pgxc_node), the join and where its rows meet, and the prepared
    transactions left on the datanodes."""
    intended = cluster.intended_datanodes()
    async with await cluster.topology.coordinator(COORDINATORS[0]).connect() as conn:
        ids = await (await conn.execute(DATANODE_IDS)).fetchall()
        names = {int(str(node_id)): str(name) for node_id, name in ids}
        rows = await (await conn.execute(ROW_NODES)).fetchall()
        report.rows_checked = len(rows)
        report.misrouted = len(
            [1 for ident, node in rows if names.get(int(str(node))) != intended.get(int(str(ident)))]
        )
        plan = [str(row[0]) for row in await (await conn.execute("EXPLAIN " + JOIN_QUERY)).fetchall()]
        row = await (await conn.execute(JOIN_QUERY)).fetchone()
        report.join_rows = int(str(row[0])) if row else None
        for datanode in cluster.datanodes:
            statement = sql.SQL("EXECUTE DIRECT ON ({}) {}").format(
                sql.Identifier(datanode), sql.Literal("SELECT gid FROM pg_prepared_xacts")
            )
            gids = await (await conn.execute(statement)).fetchall()
            report.prepared_gids += [f"{datanode}: {gid[0]}" for gid in gids]
        report.prepared_left = len(report.prepared_gids)
    report.join_expected = sum(1 for ident in present if ident + 1 in present)
    moved = [line.strip() for line in plan if "Distribute results by" in line]
    shipped = [line.strip() for line in plan if "Data Node Scan" in line]
    if report.flavor == "xl":
        report.join_plan = moved[0] if moved else "no redistribution in the plan"
        redistributed = bool(moved)
    else:  # XC has no datanode-to-datanode redistribution: both sides come to the coordinator
        report.join_plan = f"{len(shipped)} Data Node Scans, joined on the coordinator"
        redistributed = len(shipped) >= 2
    report.join_ok = redistributed and report.join_rows == report.join_expected


def _described(kind: str, transaction: Transaction, fault_at: float, present: set[int]) -> dict[str, object]:
    return {
        "kind": kind,
        "ids": list(transaction.ids),
        "present": [ident in present for ident in transaction.ids],
        "answer": transaction.answer,
        "began_ms": (transaction.began - fault_at) * 1000,
        "commit_sent_ms": (transaction.commit_sent - fault_at) * 1000,
        "answered_ms": (transaction.ended - fault_at) * 1000,
    }


def _ms(value: float | None, text: str = "") -> str:
    return f"+{value:7.0f} ms{text}" if value is not None else " (unknown)"


def _print(report: PgxcReport, member: str, present: int) -> None:
    print(f"timeline after kill -9 of {member} (dn1's master):")
    lines: list[tuple[str, float | None, str]] = [
        ("detected", report.detect_ms, ""),
        ("promoted", report.promote_ms, ""),
        ("re-point started", report.reroute_started_ms, ""),
    ]
    for name in report.coordinators:
        attempts = report.reroute_attempts.get(name, 1)
        note = f" ({attempts} attempts)" if attempts > 1 else ""
        lines.append((f"{name} re-pointed", report.repointed_ms.get(name), note))
    if report.flavor == "xl":
        lines.append(("datanode catalogs updated (via coord1)", report.catalogs_ms, ""))
    said = f' (last line of its output: "{report.cleanup}")' if report.cleanup else ""
    lines.append(("in-doubt cleanup done (pgxc_clean -a)", report.cleanup_ms, said))
    for name in report.coordinators:
        lines.append((f"first write through {name}", report.first_write_ms.get(name), ""))
    for label, value, note in lines:
        print(f"  {label:<40} {_ms(value, note)}")
    sessions = "holding a transaction id" if report.flavor == "xl" else "inside a transaction"
    print(
        f"  dn2 writes that failed meanwhile:        {report.dn2_failed_writes} (the router ends the "
        f"coordinators' sessions {sessions} before re-pointing)"
    )
    print("PostgreSQL operations, as the agents timed them:")
    rejoin = "pg_rewind" if report.rewind_ms is not None else "a re-clone: XC 1.2 (9.3) has no pg_rewind"
    for label, value in (
        ("initdb (dn1a)", report.initdb_ms),
        ("pg_basebackup clone (dn1b)", report.clone_ms),
        ("promote until writable", report.promote_writable_ms),
        ("pg_rewind of the old master", report.rewind_ms),
        (f"rejoin of the old master ({rejoin})", report.rejoin_ms),
    ):
        if value is None and label.startswith("pg_rewind") and report.flavor == "xc":
            continue
        print(f"  {label:<40} {value:7.0f} ms" if value is not None else f"  {label:<40}  (not seen)")
    print(
        f"single-row commits acknowledged: {report.acknowledged}, lost: {report.lost}; rows in the table: "
        f"{present}, present but never sent: {report.unexpected}"
    )
    print(
        f"2-datanode transactions: {report.transactions} COMMITs sent, {report.transactions_committed} "
        f"committed with both rows; false COMMITs: {report.false_commits} spanning the re-point, "
        f"{report.false_commits_at_crash} racing the crash; torn: {report.torn} (+{report.torn_at_crash} "
        "racing the crash)"
    )
    for bad in report.bad_transactions:
        print(
            f"  {bad['kind']}: began {bad['began_ms']:+.0f} ms, COMMIT sent {bad['commit_sent_ms']:+.0f} ms, "
            f"answered {bad['answer']!r} {bad['answered_ms']:+.0f} ms from the kill; rows present: "
            f"{bad['present']}"
        )
    routed = report.rows_checked - report.misrouted
    print(f"rows on the datanode their id was routed to: {routed} of {report.rows_checked}")
    print(
        f"join on a.id = b.id - 1: {report.join_rows} rows, {report.join_expected} expected from the ids "
        f"read back; plan: {report.join_plan}"
    )
    left = ", ".join(report.prepared_gids)
    unresolved = f" (in doubt, not resolved by the cleanup: {left})" if left else ""
    print(f"prepared transactions left on the datanodes: {report.prepared_left}{unresolved}")
    rejoined = "yes" if report.old_master_rejoined else "no"
    print(f"old master {member} rejoined as synchronous standby: {rejoined}; epoch {report.epoch}")
