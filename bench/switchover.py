"""`./run bench switchover`: planned switchovers back and forth under writes through the
coordinator. Write gap = last acknowledged write before the first failure -> first
acknowledged write after it. Target: p50 <= 300 ms, lost = 0."""

import argparse
import asyncio
import time
from collections.abc import Callable

from bench.common import (
    QUIET_BEFORE_TRIAL,
    Result,
    add_workdir_argument,
    running_deployment,
    say,
    summary,
    table,
)
from xcha.ctl import call
from xcha.v1 import xcha_pb2 as pb


def switched_from(old: str) -> Callable[[pb.ClusterStatus], bool]:
    return lambda s: s.groups[0].master != old and s.groups[0].state in ("single", "protected")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=10)
    add_workdir_argument(parser)


async def run(args: argparse.Namespace) -> int:
    gaps, rows = [], []
    async with running_deployment("switchover", args.workdir) as cluster:
        for trial in range(1, args.trials + 1):
            await cluster.wait_protected()
            await asyncio.sleep(QUIET_BEFORE_TRIAL)
            old = cluster.master()
            requested = time.time()
            call(
                cluster.topology.target,
                lambda stub: stub.Switchover(pb.SwitchoverRequest(datanode="dn1"), timeout=10),
            )
            await cluster.topology.wait_for(switched_from(old), 60, "the switchover")
            await cluster.wait_for_writes(10, "dn1")
            gap = cluster.writers["dn1"].write_gap(requested)
            gaps.append(gap)
            new = cluster.master()
            say(f"trial {trial}: {old} -> {new}: write gap {gap:.0f} ms")
            rows.append((trial, old, new, f"{gap:.0f}"))
        outcome = await cluster.finish()
    stats = summary(gaps)
    result = Result("switchover", {"trials": args.trials, "router": "fdw"})
    result.figures = {
        "write_gap_ms": stats,
        "acknowledged": outcome.acknowledged,
        "lost": len(outcome.lost),
        "targets_met": stats.get("p50", 1e9) <= 300 and not outcome.lost,
    }
    result.tables.append(table(("trial", "from", "to", "write gap ms"), rows))
    result.tables.append(
        table(
            ("p50 ms", "p95 ms", "max ms", "lost"),
            [(stats.get("p50"), stats.get("p95"), stats.get("max"), len(outcome.lost))],
        )
    )
    result.notes.append(f"{outcome.acknowledged} commits acknowledged, {len(outcome.lost)} lost.")
    path = result.write()
    say("\n" + path.read_text())
    return 0 if not outcome.lost else 1
