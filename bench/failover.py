"""`./run bench failover`: kill -9 of dn1's master postmaster, N times, under writes through a
postgres_fdw coordinator. RTO = kill -> first acknowledged write through the coordinator
after the first failed one; split into detect / promote / reroute from the controller's
marks; lost commits checked after every run. Target (default settings, this machine):
p50 <= 300 ms, max <= 1 s, lost = 0."""

import argparse
import asyncio

from bench.common import (
    QUIET_BEFORE_TRIAL,
    Result,
    add_workdir_argument,
    one_pair_plan,
    optional_ms,
    running_deployment,
    say,
    summary,
    table,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=10)
    add_workdir_argument(parser)


async def run(args: argparse.Namespace) -> int:
    rows: list[tuple[object, ...]] = []
    rto: list[float] = []
    detect: list[float] = []
    promote: list[float] = []
    reroute: list[float] = []
    async with running_deployment("failover", args.workdir) as cluster:
        for trial in range(1, args.trials + 1):
            await cluster.wait_protected()
            await asyncio.sleep(QUIET_BEFORE_TRIAL)
            fault = cluster.kill_master()
            recovery = await cluster.recovery(fault)
            say(
                f"trial {trial}: kill -9 of {fault.member}: writes through the coordinator after "
                f"{optional_ms(recovery.rto_ms)} ms (detected {optional_ms(recovery.detect_ms, '+')}, "
                f"promoted {optional_ms(recovery.promote_ms, '+')}, re-pointed "
                f"{optional_ms(recovery.reroute_ms, '+')}), new master {recovery.new_master}"
            )
            rows.append(
                (
                    trial,
                    fault.member,
                    recovery.new_master,
                    *(
                        optional_ms(v)
                        for v in (
                            recovery.detect_ms,
                            recovery.promote_ms,
                            recovery.reroute_ms,
                            recovery.rto_ms,
                        )
                    ),
                )
            )
            for values, value in (
                (rto, recovery.rto_ms),
                (detect, recovery.detect_ms),
                (promote, recovery.promote_ms),
                (reroute, recovery.reroute_ms),
            ):
                if value is not None:
                    values.append(value)
        await cluster.wait_protected()
        outcome = await cluster.finish()
    plan = one_pair_plan()
    result = Result(
        "failover",
        {
            "trials": args.trials,
            "heartbeat_interval": plan.heartbeat_interval,
            "failure_timeout": plan.failure_timeout,
            "router": "fdw (one postgres_fdw coordinator)",
            "writer": "an insert every 10 ms",
        },
    )
    stats = {
        "rto_ms": summary(rto),
        "detect_ms": summary(detect),
        "promote_ms": summary(promote),
        "reroute_ms": summary(reroute),
    }
    result.figures = {
        **stats,
        "acknowledged": outcome.acknowledged,
        "lost": len(outcome.lost),
        "unexpected": len(outcome.unexpected),
        "targets_met": stats["rto_ms"].get("p50", 1e9) <= 300
        and stats["rto_ms"].get("max", 1e9) <= 1000
        and not outcome.lost,
    }
    result.tables.append(
        table(
            (
                "trial",
                "killed",
                "new master",
                "detected ms",
                "promoted ms",
                "re-pointed ms",
                "first write ms",
            ),
            rows,
        )
    )
    result.tables.append(
        table(
            ("measure (ms from the kill)", "p50", "p95", "max"),
            [(name, s.get("p50"), s.get("p95"), s.get("max")) for name, s in stats.items()],
        )
    )
    result.notes.append(
        f"{outcome.acknowledged} commits acknowledged, {len(outcome.lost)} lost, "
        f"{len(outcome.unexpected)} present but never sent."
    )
    result.notes.append(
        "Target p50 <= 300 ms, max <= 1000 ms, lost = 0: "
        + ("met." if result.figures["targets_met"] else "NOT met.")
    )
    path = result.write()
    say("\n" + path.read_text())
    return 0 if not outcome.lost else 1
