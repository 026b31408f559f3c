"""What the soak checks independently of the controller, at the end."""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak.faults import Soak
from bench.soak.settings import PROBE_TABLE
from xcha.coordinator import shard_table
from xcha.errors import XchaError
from xcha.workload import WRITE_ERRORS, judge, present_ids


@dataclass
class FinalCheck:
    acknowledged: int = 0
    lost_via_coordinator: list[int] = field(default_factory=list)
    unexpected_via_coordinator: list[int] = field(default_factory=list)
    lost_on_masters: dict[str, list[int]] = field(default_factory=dict)
    unexpected_on_masters: dict[str, list[int]] = field(default_factory=dict)
    masters: dict[str, list[str]] = field(default_factory=dict)  # writable members at the end
    error: str = ""


async def final_check(soak: Soak) -> FinalCheck:
    cluster = soak.cluster
    check = FinalCheck()
    await soak.steady(soak.protected_timeout)
    await cluster.stop_writing()
    writers = cluster.single_writers()
    sent = set().union(*(w.sent for w in writers))
    try:
        present = await present_ids([cluster.topology.coordinator_app_conninfo(cluster.coordinators[0])])
        outcome = judge(writers, present)
        check.acknowledged = outcome.acknowledged
        check.lost_via_coordinator, check.unexpected_via_coordinator = outcome.lost, outcome.unexpected
    except (*WRITE_ERRORS, XchaError) as error:
        check.error += f"through the coordinator: {error}; "
        check.acknowledged = len(set().union(*(w.acknowledged for w in writers)))
    for datanode, writer in cluster.writers.items():
        masters = await soak.writable(datanode)
        check.masters[datanode] = masters
        if len(masters) != 1:
            check.error += f"{datanode}: writable members {masters}; "
            continue
        try:
            ids = await soak.read_ids(masters[0])
        except WRITE_ERRORS as error:
            check.error += f"{datanode} on {masters[0]}: {error}; "
            continue
        check.lost_on_masters[datanode] = sorted(set(writer.acknowledged) - ids)
        check.unexpected_on_masters[datanode] = sorted(ids - sent)
    return check


async def prepare_probe(soak: Soak) -> None:
    """The probe's table on every datanode, and the probe shown to catch a writable master: it
    commits on each master now (else a deposed master's writes would go unseen)."""
    topology = soak.topology
    for group in topology.status().groups:
        async with await topology.superuser(group.master) as conn:
            await conn.execute(shard_table(PROBE_TABLE))
        await soak._start_probe(group.master).wait_for_acks(1, timeout=10)
        await soak._stop_probe()


def leftovers(workdir: Path) -> dict[str, object]:
    """What the run left on disk: the deployment's size, the data directories xcha set aside
    (a failed pg_rewind is followed by a fresh clone; the old directory is kept), and how many
    rejoins the agents' logs say took that way."""
    size = 0
    for path in workdir.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
    reclones = 0
    for log in (workdir / "logs").glob("agent-*.log"):
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").splitlines()
            reclones += sum(1 for line in lines if ": rewind failed (" in line)
    return {
        "workdir_gib": round(size / 2**30, 2),
        "set_aside_data_dirs": len(list(workdir.glob("*/*/data.old-*"))),
        "rewinds_failed_then_recloned": reclones,
    }
