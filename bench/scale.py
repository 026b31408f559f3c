"""`./run bench scale`: one controller, many datanode groups of simulated agents speaking the
real gRPC protocol (bench/scale_agents.py, a few processes, no PostgreSQL behind them), at the
default heartbeat interval. Measures the controller's CPU, its heartbeat handling time (its
own histogram) and the agents' round trips, and the time from one injected master crash to
the Promote of its standby, compared with a controller that has a single group.
Targets: CPU < 50 % of one core, handling p99 < 20 ms, detection as with one group."""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import Result, say, table
from xcha.topology import free_port, toml_document

TICKS = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--also", type=int, default=100, help="a smaller size measured too (0: none)")
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument(
        "--interval", type=float, default=0.25, help="heartbeat interval (controller default)"
    )
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--measure", type=float, default=30.0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def histogram_p99(metrics_port: int) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("xcha_heartbeat_handling_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= 0.99 * total) * 1000


async def measure(
    groups: int, processes: int, interval: float, warmup: float, window: float, workdir: Path
) -> dict[str, object]:
    port, metrics = free_port(), free_port()
    failure_timeout = max(2.0, 2 * interval + 0.5)
    run_for = warmup + window + failure_timeout + 10  # the simulators stop by themselves then
    config = workdir / f"controller-{groups}.toml"
    tables: list[tuple[str, dict[str, object]]] = [
        (
            "[controller]",
            {
                "listen": f"127.0.0.1:{port}",
                "state_dir": workdir / f"state-{groups}",
                "heartbeat_interval": interval,
                "failure_timeout": failure_timeout,
                "startup_grace": 1.0,
                "metrics_listen": f"127.0.0.1:{metrics}",
            },
        ),
        ("[router]", {"kind": "none"}),
        ("[tls]", {"insecure": True}),
    ]
    tables += [
        ("[[datanode]]", {"name": f"g{i:04d}", "members": [f"g{i:04d}a", f"g{i:04d}b"]})
        for i in range(groups)
    ]
    config.write_text(toml_document(tables))
    log = open(workdir / f"controller-{groups}.log", "wb")  # noqa: SIM115 - closed below
    controller = subprocess.Popen(
        [sys.executable, "-m", "xcha", "controller", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    simulators: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or controller.poll() is not None:
                    raise RuntimeError(f"the controller did not start: see {workdir}") from None
                await asyncio.sleep(0.2)
        per = -(-groups // processes)
        for index in range(processes):
            first = index * per
            count = min(per, groups - first)
            if count <= 0:
                break
            argv = [
                sys.executable,
                "-m",
                "bench.scale_agents",
                "--controller",
                f"127.0.0.1:{port}",
                "--first",
                str(first),
                "--groups",
                str(count),
                "--interval",
                str(interval),
                "--crash-after",
                str(warmup + window),
                "--run-for",
                str(run_for),
            ]
            if index == 0:
                argv += ["--victim", "0"]
            simulators.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, start_new_session=True
                )
            )
        await asyncio.sleep(warmup)
        cpu_before, wall_before = cpu_seconds(controller.pid), time.monotonic()
        await asyncio.sleep(window)
        cpu = (cpu_seconds(controller.pid) - cpu_before) / (time.monotonic() - wall_before) * 100
        p99 = histogram_p99(metrics)
        # the injected crash, its promotion, and the simulators stopping by themselves follow
        reports = []
        for simulator in simulators:
            try:
                output, _ = simulator.communicate(timeout=run_for + 120)
            except subprocess.TimeoutExpired:
                simulator.kill()
                output, _ = simulator.communicate()
            lines = output.decode().strip().splitlines()
            if simulator.returncode != 0 or not lines:
                raise RuntimeError(f"a simulator failed (exit {simulator.returncode})")
            reports.append(json.loads(lines[-1]))
    finally:
        for process in [*simulators, controller]:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
    return {
        "groups": groups,
        "agents": 2 * groups,
        "interval_s": interval,
        "controller_cpu_pct": round(cpu, 1),
        "handling_p99_ms": p99,
        "heartbeats": sum(int(r["heartbeats"]) for r in reports),
        "errors": sum(int(r["errors"]) for r in reports),
        "rtt_p99_ms": round(max(float(r["rtt_p99_ms"]) for r in reports), 1),
        "detect_to_promote_ms": reports[0].get("detect_to_promote_ms"),
    }


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="xcha-bench-scale-"))
    sizes = [1, *([args.also] if 0 < args.also < args.groups else []), args.groups]
    say(f"controller with {', '.join(map(str, sizes))} groups in turn; files in {workdir}")
    runs = []
    for groups in sizes:
        processes = 1 if groups == 1 else args.processes
        warmup, window = (5.0, 5.0) if groups == 1 else (args.warmup, args.measure)
        runs.append(await measure(groups, processes, args.interval, warmup, window, workdir))
        say(f"{groups} groups: {runs[-1]}")
    many = runs[-1]
    result = Result(
        "scale",
        {
            "groups": args.groups,
            "simulator_processes": args.processes,
            "heartbeat_interval": args.interval,
            "measure_seconds": args.measure,
            "tls": "plaintext (the simulators would otherwise spend the two cores on TLS)",
        },
    )

    def per_heartbeat_us(r: dict[str, object]) -> float:
        offered = float(str(r["agents"])) / args.interval
        return float(round(float(str(r["controller_cpu_pct"])) / 100 / offered * 1e6))

    rows = [
        (
            r["groups"],
            r["agents"],
            r["controller_cpu_pct"],
            per_heartbeat_us(r),
            r["handling_p99_ms"],
            r["rtt_p99_ms"],
            r["detect_to_promote_ms"] and round(float(str(r["detect_to_promote_ms"])), 1),
            r["errors"],
        )
        for r in runs
    ]
    result.tables.append(
        table(
            (
                "groups",
                "agents",
                "controller CPU % of a core",
                "CPU us per offered heartbeat",
                "handling p99 ms",
                "agent round trip p99 ms",
                "crash -> Promote ms",
                "failed heartbeats",
            ),
            rows,
        )
    )
    for r in runs:
        if int(str(r["errors"])):
            result.notes.append(
                f"{r['groups']} groups: the controller saturated ({r['agents']} agents x "
                f"{1 / args.interval:g} heartbeats/s offered); {r['errors']} heartbeats missed "
                "their 5 s deadline."
            )
    cpu_ok = float(str(many["controller_cpu_pct"])) < 50
    p99 = many["handling_p99_ms"]
    result.figures = {
        "runs": runs,
        "targets": {
            "cpu_under_50pct": cpu_ok,
            "handling_p99_under_20ms": p99 is not None and float(str(p99)) < 20,
        },
    }
    result.notes.append(
        "The simulators share the machine's 2 cores with the controller; their own load "
        "inflates the round trips."
    )
    path = result.write()
    say("\n" + path.read_text())
    return 0
