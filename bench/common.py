"""What every benchmark shares: statistics, the machine's description, and results files."""

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xcha.harness import LoadedCluster
from xcha.topology import DatanodePlan, TopologyPlan

RESULTS = Path(__file__).resolve().parent / "results"

# Each trial (failover, hang, switchover, compare) first waits until the group is protected
# again, then lets it run this long under writes before the fault or switchover, so that every
# trial starts from steady writes, not from the catch-up right after the previous one. Deliberate.
QUIET_BEFORE_TRIAL = 1.0  # s


def one_pair_plan() -> TopologyPlan:
    """dn1 as a master/standby pair behind one postgres_fdw coordinator, default timings."""
    return TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")),),
        router="fdw",
        coordinators=("coord1",),
    )


def add_workdir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, help="keep the deployment here (default: a temporary directory)"
    )


@contextlib.asynccontextmanager
async def running_deployment(
    name: str,
    workdir: Path | None,
    *,
    timeout: float | None = None,
    keep: bool = True,
    plan: TopologyPlan | None = None,
    coordinators: tuple[str, ...] = (),
    transactions: bool = False,
) -> AsyncIterator[LoadedCluster]:
    """The one-pair deployment (or `plan`, written through `coordinators`, with `transactions`:
    see LoadedCluster), protected and under writes (within `timeout` s, the harness's default
    when None); stopped by PID however the benchmark ends. Without `keep`, the temporary
    directory made here is removed afterwards (a given `workdir` always stays)."""
    temporary = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"xcha-bench-{name}-"))
    cluster = LoadedCluster(workdir, plan or one_pair_plan(), coordinators, transactions)
    try:
        say(f"starting a deployment in {workdir}")
        if timeout is None:
            await cluster.start()
        else:
            await cluster.start(timeout=timeout)
        yield cluster
    finally:
        stopped = await cluster.down()
        say(f"stopped {len(stopped)} processes by PID")
        if temporary and not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p50 of [1, 2, 3, 4] is 2)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def summary(values_ms: Sequence[float]) -> dict[str, float]:
    if not values_ms:
        return {"n": 0}
    return {
        "n": len(values_ms),
        "p50": round(percentile(values_ms, 0.5), 1),
        "p95": round(percentile(values_ms, 0.95), 1),
        "max": round(max(values_ms), 1),
        "mean": round(statistics.fmean(values_ms), 1),
    }


def machine(flavor: str = "postgresql") -> dict[str, object]:
    memory_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:
        pass
    postgres = ""
    try:
        from xcha.pg.flavor import check_flavor
        from xcha.pg.runner import find_bindir

        postgres = subprocess.run(
            [str(find_bindir(flavor=check_flavor(flavor)) / "postgres"), "--version"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except Exception:
        postgres = "unknown"
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres,
    }


@dataclass
class Result:
    """One benchmark run: its settings, measured figures, and a markdown rendering."""

    name: str
    settings: dict[str, object]
    figures: dict[str, object] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flavor: str = "postgresql"  # whose server binaries the machine's description names

    def write(self, directory: Path = RESULTS) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d")
        data = {
            "benchmark": self.name,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(self.flavor),
            "settings": self.settings,
            "figures": self.figures,
            "notes": self.notes,
        }
        json_path = directory / f"{self.name}-{stamp}.json"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        md_path = directory / f"{self.name}-{stamp}.md"
        md_path.write_text(self.markdown(data))
        return md_path

    def markdown(self, data: Mapping[str, object]) -> str:
        lines = [f"# Benchmark `{self.name}` ({data['date']})", ""]
        host = data["machine"]
        assert isinstance(host, dict)
        lines.append(
            f"Machine: {host['cores']} cores ({host['cpu']}), {host['memory_gib']} GiB, "
            f"{host['postgres']}, Python {host['python']}, kernel {host['kernel']}."
        )
        lines.append("")
        lines.append("Settings: " + ", ".join(f"{k} = {v}" for k, v in self.settings.items()) + ".")
        lines.append("")
        for table in self.tables:
            lines.extend([table, ""])
        for note in self.notes:
            lines.append(f"- {note}")
        return "\n".join(lines).rstrip() + "\n"


def optional_ms(value: float | None, prefix: str = "") -> str:
    """Whole milliseconds, or "-" for a mark that was not seen."""
    return "-" if value is None else f"{prefix}{value:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, flush=True)
