"""The soak's tables: per fault kind, and the whole run."""

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import asdict

from bench.common import Result, summary, table
from bench.soak.check import FinalCheck
from bench.soak.faults import FaultRecord
from bench.soak.settings import KINDS, WRITES_AFTER
from xcha.demo import demo_plan


def _bad(records: Sequence[FaultRecord], check: FinalCheck | None) -> bool:
    if check is None or check.error:
        return True
    return bool(
        check.lost_via_coordinator
        or check.unexpected_via_coordinator
        or any(check.lost_on_masters.values())
        or any(check.unexpected_on_masters.values())
        or any(r.lost or r.deposed_writes or not r.returned or r.writable_masters > 1 for r in records)
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _line(record: FaultRecord) -> str:
    parts = [
        f"fault {record.index} {record.kind}",
        f"{record.target}" + (f" ({record.detail})" if record.detail else ""),
    ]
    if record.master_after and record.master_after != record.master_before:
        parts.append(f"master {record.master_before} -> {record.master_after}")
    if record.left_protected:
        parts.append("left protected")
    parts.append(f"writes again {_ms(record.write_rto_ms)} ms ({record.failed_writes} failed)")
    parts.append(
        f"protected {_ms(record.protected_ms)} ms"
        if record.returned
        else f"NOT protected in time ({record.returned_late_s} s)"
    )
    parts.append(f"cycle {record.cycle_s:.1f} s")
    if record.lost:
        parts.append(f"LOST {len(record.lost)}")
    if record.deposed_writes:
        parts.append(f"DEPOSED-MASTER WRITES {len(record.deposed_writes)}")
    if record.error:
        parts.append(record.error)
    return ": ".join(parts[:2]) + "; " + ", ".join(parts[2:])


def _spread(values: Sequence[float]) -> str:
    s = summary(values)
    return f"{s['p50']:.1f} / {s['mean']:.1f} / {s['max']:.1f}"


def _range(values: Sequence[float]) -> str:
    s = summary(values)
    return f"{s['p50']:.0f} / {s['max']:.0f}" if s.get("n") else "-"


def report(
    args: argparse.Namespace,
    seed: int,
    kinds: Sequence[str],
    records: Sequence[FaultRecord],
    check: FinalCheck | None,
    setup_s: float,
    wall_s: float,
    notes: list[str],
    error: str,
    interrupted: str,
) -> Result:
    plan = demo_plan("fdw")
    result = Result(
        "soak",
        {
            "faults": args.faults,
            "seed": seed,
            "kinds": ",".join(kinds),
            "protected_timeout_s": args.protected_timeout,
            "heartbeat_interval": plan.heartbeat_interval,
            "failure_timeout": plan.failure_timeout,
            "deployment": "xcha up's: supervisor, controller, dn1 and dn2 (master + synchronous standby, "
            "FIRST 1, available), a postgres_fdw coordinator",
            "writers": "through the coordinator: an insert every 10 ms into dn1 and into dn2",
        },
    )
    per_kind: dict[str, dict[str, object]] = {}
    rows = []
    for kind in kinds:
        mine = [r for r in records if r.kind == kind]
        if not mine:
            continue
        rto = [r.write_rto_ms for r in mine if r.write_rto_ms is not None]
        protected = [r.protected_ms for r in mine if r.protected_ms is not None]
        cycles = [r.cycle_s for r in mine]
        figures: dict[str, object] = {
            "count": len(mine),
            "failovers": sum(1 for r in mine if r.master_after and r.master_after != r.master_before),
            "left_protected": sum(1 for r in mine if r.left_protected),
            "writes_interrupted": sum(1 for r in mine if r.failed_writes),
            "write_rto_ms": summary(rto),
            "protected_ms": summary(protected),
            "not_returned": sum(1 for r in mine if not r.returned),
            "cycle_s": summary(cycles),
            "lost": sum(len(r.lost) for r in mine),
            "deposed_writes": sum(len(r.deposed_writes) for r in mine),
            "errors": sum(1 for r in mine if r.error),
        }
        per_kind[kind] = figures
        rows.append(
            (
                kind,
                len(mine),
                figures["failovers"],
                figures["left_protected"],
                figures["writes_interrupted"],
                _range(rto),
                _range(protected),
                figures["not_returned"],
                _spread(cycles),
                figures["lost"],
                figures["deposed_writes"],
            )
        )
    cycles_all = [r.cycle_s for r in records]
    mean_cycle = statistics.fmean(cycles_all) if cycles_all else 0.0
    lost_incremental = sum(len(r.lost) for r in records)
    lost_final = (
        f"{len(check.lost_via_coordinator)} / {sum(len(v) for v in check.lost_on_masters.values())}"
        if check
        else "- / -"
    )
    result.figures = {
        "faults_done": len(records),
        "interrupted": interrupted,
        "error": error,
        "setup_s": round(setup_s, 1),
        "wall_s": round(wall_s, 1),
        "mean_cycle_s": round(mean_cycle, 2),
        "projected_1000_faults_min": round((setup_s + 1000 * mean_cycle) / 60, 1),
        "per_kind": per_kind,
        "acknowledged": check.acknowledged if check else None,
        "lost_after_each_fault": lost_incremental,
        "lost_via_coordinator": len(check.lost_via_coordinator) if check else None,
        "lost_on_masters": {d: len(v) for d, v in check.lost_on_masters.items()} if check else None,
        "unexpected_via_coordinator": len(check.unexpected_via_coordinator) if check else None,
        "unexpected_on_masters": {d: len(v) for d, v in check.unexpected_on_masters.items()}
        if check
        else None,
        "final_masters": check.masters if check else None,
        "final_check_error": check.error if check else "not run",
        "deposed_writes": sum(len(r.deposed_writes) for r in records),
        "probe_attempts": sum(r.probe_attempts for r in records),
        "probe_held_by_a_writable_old_master": sum(r.probe_held for r in records),
        "not_returned": sum(1 for r in records if not r.returned),
        "two_writable_masters": sum(1 for r in records if r.writable_masters > 1),
        "faults": [asdict(r) for r in records],
    }
    result.tables.append(
        table(
            (
                "fault",
                "count",
                "failovers",
                "left protected",
                "writes interrupted",
                "write RTO p50 / max ms",
                "back to protected p50 / max ms",
                f"not protected within {args.protected_timeout:.0f} s",
                "cycle p50 / mean / max s",
                "lost",
                "deposed-master writes",
            ),
            rows,
        )
    )
    result.tables.append(
        table(
            (
                "faults",
                "wall time",
                "mean cycle",
                "acknowledged",
                "lost (after each fault / coordinator / masters)",
                "present but never sent",
                "deposed-master writes",
                "not back in time",
            ),
            [
                (
                    len(records),
                    f"{wall_s / 60:.1f} min (+ {setup_s:.0f} s setup)",
                    f"{mean_cycle:.2f} s",
                    check.acknowledged if check else "-",
                    f"{lost_incremental} / {lost_final}",
                    (
                        len(check.unexpected_via_coordinator)
                        + sum(len(v) for v in check.unexpected_on_masters.values())
                        if check
                        else "-"
                    ),
                    result.figures["deposed_writes"],
                    result.figures["not_returned"],
                )
            ],
        )
    )
    anomalies = [
        r
        for r in records
        if r.lost or r.deposed_writes or not r.returned or r.error or r.writable_masters > 1
    ]
    if anomalies:
        result.tables.append(
            table(
                ("#", "fault", "target", "detail", "at s", "protected ms", "lost", "deposed writes", "error"),
                [
                    (
                        r.index,
                        r.kind,
                        r.target,
                        r.detail,
                        r.at_s,
                        _ms(r.protected_ms) if r.returned else f"not in time ({r.returned_late_s} s)",
                        len(r.lost),
                        len(r.deposed_writes),
                        r.error,
                    )
                    for r in anomalies
                ],
            )
        )
    result.notes.extend(notes)
    result.notes.extend(
        [
            "Kinds: " + "; ".join(f"{k}: {KINDS[k]}" for k in kinds) + ".",
            "Write RTO: from the fault (SIGSTOP, kill, cut, switchover request) to the first write "
            "acknowledged through the coordinator after the first failed one, on the faulty datanode "
            "(all datanodes for the controller); faults that failed no write have none. Back to "
            "protected: from the fault's start until every group is protected, every agent idle and "
            "reporting (heartbeat < 1 s) and the fault's own mark is seen (a new master, a restarted "
            "process's new PID or boot id, the stopped member reporting again); SIGSTOP lengths count in it.",
            f"Cycle: from the fault until that, then {WRITES_AFTER} more acknowledged writes through the "
            "coordinator to every datanode, and the check; the next fault follows at once. "
            f"Mean {mean_cycle:.2f} s here: 1000 faults would take about "
            f"{result.figures['projected_1000_faults_min']} min with the setup.",
            "Lost, checked without the controller: after each fault the commits acknowledged since the "
            "last check are read back on the datanode's writable member (pg_is_in_recovery() asked on "
            "each member); at the end every acknowledged commit through the coordinator and on each "
            "datanode's final master. Deposed-master writes: from the moment the controller showed a "
            "new master until the cycle ended, a probe committing on the old master directly (Unix "
            "socket) every 50 ms; each commit it saw acknowledged counts. "
            f"It tried {result.figures['probe_attempts']} commits; "
            f"{result.figures['probe_held_by_a_writable_old_master']} of them reached an old master "
            "still writable and got no answer within 0.5 s (held, waiting for a synchronous standby); "
            "before the soak it committed once on every master, to show that it sees a writable one.",
        ]
    )
    if interrupted:
        result.notes.append(f"Interrupted ({interrupted}) after {len(records)} faults.")
    if error:
        result.notes.append(f"Stopped by an error: {error}")
    return result
