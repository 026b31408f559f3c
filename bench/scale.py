"""`./run bench scale`: one controller, many datanode groups of simulated agents speaking the
real gRPC protocol with mTLS as deployed (bench/scale_agents.py: a few processes, one
certificate, channel and Heartbeats stream per member, no PostgreSQL behind them), at the
default heartbeat interval, report interval and failure timeout. For each size in turn it
measures the controller's CPU (its own, from /proc), its report handling time (its own
histogram), the agents' round trips and missed heartbeats (reports unanswered in time, streams
ended unasked), and the time from one injected master crash to the Promote of its standby; then
it draws CPU against the number of groups (a PNG beside the results, when matplotlib is
installed: the test extras). A heartbeat is one per agent per heartbeat_interval: on a stream,
keep-alive pings stand for it between reports.
Targets at 1,000 groups: CPU < 50 % of one core, handling p99 < 20 ms, crash -> Promote
< 50 ms, no missed heartbeat."""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import RESULTS, Result, say, table
from xcha import timings
from xcha.tls import Identity, create_ca, issue
from xcha.topology import free_port, toml_document

TICKS = os.sysconf("SC_CLK_TCK")
HOSTS = ("127.0.0.1",)
CRASH_EVERY = 1.0  # seconds between the timed crashes


def promote_times(values: object) -> list[float | None]:
    """The timed crashes of a run (None: no Promote within 30 s)."""
    assert isinstance(values, list)
    return [None if v is None else float(v) for v in values]


def promote_summary(values: object) -> str:
    times = promote_times(values)
    if not times:
        return "-"
    if None in times:
        return f"no Promote after {times.count(None)} of {len(times)}"
    done = sorted(t for t in times if t is not None)
    return f"{statistics.median(done):.1f} / {done[-1]:.1f} ({len(done)})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default="1,10,100,300,1000", help="numbers of groups measured in turn (comma-separated)"
    )
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds after every group is protected, before the window"
    )
    parser.add_argument("--measure", type=float, default=30.0)
    parser.add_argument(
        "--crashes", type=int, default=5, help="master crashes timed after the window, one a second"
    )
    parser.add_argument("--no-plot", action="store_true", help="write the table and JSON only")
    parser.add_argument(
        "--replot", action="store_true", help="measure nothing: draw the plot again from today's results"
    )
    parser.add_argument(
        "--protocol",
        choices=("stream", "unary"),
        default="stream",
        help="stream: Heartbeats streams, as agents report; unary: one Heartbeat call per report "
        "(agents of earlier versions), for comparison",
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def signal_all(processes: list[subprocess.Popen[bytes]], signum: int) -> None:
    for process in processes:
        process.send_signal(signum)


def protected(log: Path) -> int:
    """How many groups the controller protects now, by its log (each group's last state line):
    asking the controller itself (a metrics scrape, a status call) would cost it CPU while its
    agents connect."""
    last: dict[str, bool] = {}
    with log.open(errors="replace") as lines:
        for line in lines:
            words = line.split()
            if len(words) > 5 and words[3] == "INFO" and words[4].endswith(":") and words[5].endswith(":"):
                last[words[4]] = words[5] == "protected:"
    return sum(last.values())


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def handling(metrics_port: int) -> tuple[list[tuple[float, float]], float]:
    """The controller's heartbeat handling histogram since it started: (upper bound s,
    cumulative count) per bucket, and the count of heartbeats handled."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    buckets, count = [], 0.0
    for line in text.splitlines():
        if line.startswith("xcha_heartbeat_handling_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1])))
        elif line.startswith("xcha_heartbeat_handling_seconds_count"):
            count = float(line.split()[-1])
    return buckets, count


def bucket_p99_ms(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """Upper bound (ms) of the bucket that holds the 99th percentile of the heartbeats handled
    between the two readings; None when none were."""
    counts = dict(before)
    window = [(bound, count - counts.get(bound, 0.0)) for bound, count in after]
    if not window or window[-1][1] <= 0:
        return None
    total = window[-1][1]
    return next(bound for bound, count in window if count >= 0.99 * total) * 1000


def certificates(directory: Path, groups: int) -> None:
    """The CA, the controller's certificate and one per member (`xcha tls issue` makes the same)."""
    if not (directory / "ca.pem").exists():
        create_ca(directory)
        issue(directory, Identity("controller", "controller"), HOSTS)
    for index in range(groups):
        for member in (f"g{index:04d}a", f"g{index:04d}b"):
            if not (directory / f"{member}.pem").exists():
                issue(directory, Identity("agent", member, f"g{index:04d}"), HOSTS)


async def measure(
    groups: int,
    processes: int,
    warmup: float,
    window: float,
    workdir: Path,
    tls: Path,
    protocol: str,
    crashes: int,
) -> dict[str, object]:
    port, metrics = free_port(), free_port()
    interval, failure_timeout = timings.HEARTBEAT_INTERVAL, timings.FAILURE_TIMEOUT
    settle_timeout = 60 + groups * 0.1
    ramp = min(10.0, groups / 100)  # agents start over this many seconds, not all at once
    config = workdir / f"controller-{groups}.toml"
    tables: list[tuple[str, dict[str, object]]] = [
        (
            "[controller]",
            {
                "listen": f"127.0.0.1:{port}",
                "state_dir": workdir / f"state-{groups}",
                "metrics_listen": f"127.0.0.1:{metrics}",
            },
        ),
        ("[router]", {"kind": "none"}),
        (
            "[tls]",
            {
                "ca_file": tls / "ca.pem",
                "cert_file": tls / "controller.pem",
                "key_file": tls / "controller.key",
            },
        ),
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
                handling(metrics)
                socket.create_connection(("127.0.0.1", port), timeout=1).close()  # serving gRPC too
                break
            except OSError:
                if time.monotonic() > deadline or controller.poll() is not None:
                    raise RuntimeError(f"the controller did not start: see {workdir}") from None
                await asyncio.sleep(0.2)
        # The victim groups (their crashes are timed) in a process of their own, as an agent has
        # its own host: a Promote is not queued behind hundreds of simulated agents' pings.
        victims = min(crashes, groups)
        others = groups - victims
        per = max(1, -(-others // processes))
        slices = [(0, victims)] + [(victims + i * per, min(per, others - i * per)) for i in range(processes)]
        for index, (first, count) in enumerate(slices):
            if count <= 0:
                break
            argv = [
                "nice",  # the load generator yields the CPU to the controller it measures
                "-n",
                "0" if index == 0 else "10",
                sys.executable,
                "-m",
                "bench.scale_agents",
                "--controller",
                f"127.0.0.1:{port}",
                "--certificates",
                str(tls),
                "--first",
                str(first),
                "--groups",
                str(count),
                "--interval",
                str(interval),
                "--ramp",
                str(ramp),
                "--protocol",
                protocol,
            ]
            if index == 0:
                argv += ["--victims", str(victims), "--crash-every", str(CRASH_EVERY)]
            simulators.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, start_new_session=True
                )
            )
        started = time.monotonic()
        settled: float | None = None
        while (done := protected(workdir / f"controller-{groups}.log")) < groups:
            if time.monotonic() - started > settle_timeout:
                say(f"{groups} groups: only {done} protected after {settle_timeout:g} s; measuring anyway")
                break
            await asyncio.sleep(2.0)
        else:
            settled = time.monotonic() - started
        protected_at_window = protected(workdir / f"controller-{groups}.log")
        await asyncio.sleep(warmup)
        signal_all(simulators, signal.SIGUSR1)
        buckets_before, count_before = handling(metrics)
        load_before = load_average()
        cpu_before, wall_before = cpu_seconds(controller.pid), time.monotonic()
        await asyncio.sleep(window)
        cpu = cpu_seconds(controller.pid) - cpu_before
        wall = time.monotonic() - wall_before
        signal_all(simulators, signal.SIGUSR2)  # the window closes; the victim masters crash
        buckets_after, count_after = handling(metrics)
        load_after = load_average()
        p99 = bucket_p99_ms(buckets_before, buckets_after)
        # their promotions, one a second, with every other agent reporting
        await asyncio.sleep(failure_timeout + 3 + victims * CRASH_EVERY)
        signal_all(simulators, signal.SIGTERM)
        reports = []
        for simulator in simulators:
            try:
                output, _ = simulator.communicate(timeout=120)
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
    handled = count_after - count_before
    rtt_p99s = [float(r["rtt_p99_ms"]) for r in reports if r.get("rtt_p99_ms") is not None]
    reasons: dict[str, int] = {}
    for report in reports:
        for reason, n in dict(report["failure_reasons"]).items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    return {
        "groups": groups,
        "agents": 2 * groups,
        "simulator_processes": len(simulators),
        "ramp_s": ramp,
        "settle_s": None if settled is None else round(settled, 1),
        "protected_at_window": protected_at_window,
        "warmup_s": warmup,
        "window_s": window,
        "controller_cpu_pct": round(cpu / wall * 100, 1),
        "heartbeats_per_s": round(2 * groups / interval),
        "reports_per_s": round(handled / wall, 1),
        "offered_per_s": round(
            2 * groups / (interval if protocol == "unary" else timings.REPORT_INTERVAL), 1
        ),
        "cpu_us_per_heartbeat": round(cpu / wall / (2 * groups / interval) * 1e6, 1),
        "cpu_us_per_report": round(cpu / handled * 1e6, 1) if handled else None,
        "handling_p99_bucket_ms": p99,
        "rtt_p99_ms": round(max(rtt_p99s), 1) if rtt_p99s else None,
        "missed_in_window": sum(int(r["failed_in_window"]) for r in reports),
        "missed_before_window": sum(int(r.get("failed_before_window", 0)) for r in reports),
        "missed": sum(int(r["failed"]) for r in reports),
        "missed_reasons": reasons,
        "crash_to_promote_ms": reports[0].get("crash_to_promote_ms", []),
        "simulators_cpu_seconds": round(sum(float(r["cpu_seconds"]) for r in reports), 1),
        "load_average": [load_before, load_after],
    }


def plot(series: dict[str, list[dict[str, object]]], path: Path) -> bool:
    """CPU % of a core and CPU per heartbeat against the number of groups, one line per
    protocol measured; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for label, runs in series.items():
        # A size where the controller fell behind (it handled under 90 % of the reports offered)
        # is marked, not joined: its CPU is what it got, not what it needed.
        kept = [r for r in runs if kept_up(r)]
        behind = [r for r in runs if not kept_up(r)]
        groups = [int(str(r["groups"])) for r in kept]
        line = left.plot(groups, [float(str(r["controller_cpu_pct"])) for r in kept], "o-", label=label)[0]
        per = [float(str(r["cpu_us_per_heartbeat"] or "nan")) for r in kept]
        right.plot(groups, per, "o-", label=label, color=line.get_color())
        for r in behind:
            at = int(str(r["groups"]))
            left.plot([at], [float(str(r["controller_cpu_pct"]))], "x", color=line.get_color(), markersize=10)
            left.annotate(
                f"fell behind: {r.get('reports_per_s', r['heartbeats_per_s'])} of {r['offered_per_s']} "
                "reports/s handled",
                (at, float(str(r["controller_cpu_pct"]))),
                textcoords="offset points",
                xytext=(-150, -28),
                fontsize="x-small",
                color=line.get_color(),
            )
        if kept and behind:
            # what the largest size would need at the CPU per report of the largest size kept up
            last, at = kept[-1], int(str(behind[-1]["groups"]))
            need = float(str(last["cpu_us_per_heartbeat"])) * float(str(behind[-1]["heartbeats_per_s"])) / 1e4
            left.plot([at], [need], "o", markerfacecolor="none", color=line.get_color())
            left.annotate(
                f"needed at {last['groups']} groups' CPU per report: {need:.0f} %",
                (at, need),
                textcoords="offset points",
                xytext=(-170, 6),
                fontsize="x-small",
                color=line.get_color(),
            )
    left.axhline(50, color="red", linestyle="--", label="target at 1,000 groups: 50 %")
    left.set(xscale="log", xlabel="groups (2 agents each)", ylabel="CPU, % of one core")
    left.set_title("Controller CPU")
    right.set(xscale="log", xlabel="groups (2 agents each)", ylabel="CPU µs per heartbeat")
    right.set_title("Controller CPU per heartbeat (4 per agent per s)")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize="small")
    figure.suptitle("xcha controller with mTLS, heartbeat 0.25 s, failure timeout 2 s")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def kept_up(run: dict[str, object]) -> bool:
    handled = run.get("reports_per_s", run["heartbeats_per_s"])  # runs before report_interval
    return float(str(handled)) >= 0.9 * float(str(run["offered_per_s"]))


def earlier_runs(name: str, stamp: str) -> list[dict[str, object]]:
    """The runs of another protocol measured the same day (bench scale --protocol unary)."""
    path = RESULTS / f"{name}-{stamp}.json"
    if not path.exists():
        return []
    runs = json.loads(path.read_text())["figures"]["runs"]
    return list(runs)


def replot() -> int:
    stamp = time.strftime("%Y-%m-%d")
    series = {"Heartbeats streams": earlier_runs("scale", stamp)}
    if unary := earlier_runs("scale-unary", stamp):
        series["unary Heartbeat (earlier agents)"] = unary
    picture = RESULTS / f"scale-{stamp}.png"
    if not series["Heartbeats streams"] or not plot(series, picture):
        say(f"no plot: no scale-{stamp}.json or no matplotlib")
        return 1
    say(f"wrote {picture}")
    return 0


async def run(args: argparse.Namespace) -> int:
    if args.replot:
        return replot()
    workdir = Path(tempfile.mkdtemp(prefix="xcha-bench-scale-"))
    sizes = sorted({int(size) for size in args.sizes.split(",")})
    tls = workdir / "tls"
    say(f"controller with {', '.join(map(str, sizes))} groups in turn; files in {workdir}")
    certificates(tls, max(sizes))
    runs = []
    for groups in sizes:
        processes = min(args.processes, max(1, groups // 25))
        warmup, window = (5.0, 10.0) if groups < 10 else (args.warmup, args.measure)
        runs.append(
            await measure(groups, processes, warmup, window, workdir, tls, args.protocol, args.crashes)
        )
        say(f"{groups} groups: {runs[-1]}")
    many = runs[-1]
    cores = os.cpu_count() or 1
    name = "scale" if args.protocol == "stream" else "scale-unary"
    result = Result(
        name,
        {
            "sizes": ",".join(map(str, sizes)),
            "heartbeat_interval": timings.HEARTBEAT_INTERVAL,
            "report_interval": timings.REPORT_INTERVAL if args.protocol == "stream" else "-",
            "failure_timeout": timings.FAILURE_TIMEOUT,
            "tls": "mTLS, one certificate and connection per agent (as deployed)",
            "protocol": "Heartbeats streams: reports on change and every report_interval, keep-alive "
            "pings every heartbeat_interval between them"
            if args.protocol == "stream"
            else "unary Heartbeat calls (earlier agents)",
        },
    )
    rows = [
        (
            r["groups"],
            r["agents"],
            f"{r['settle_s']}" if r["settle_s"] is not None else f"no ({r['protected_at_window']})",
            r["controller_cpu_pct"],
            r["cpu_us_per_heartbeat"],
            r["cpu_us_per_report"],
            f"{r['reports_per_s']} / {r['offered_per_s']}",
            "-" if r["handling_p99_bucket_ms"] is None else r["handling_p99_bucket_ms"],
            "-" if r["rtt_p99_ms"] is None else r["rtt_p99_ms"],
            promote_summary(r["crash_to_promote_ms"]),
            r["missed_in_window"],
            f"{r['missed']} ({r['missed_before_window']} before the window)",
            " -> ".join(f"{value:.1f}" for value in list(r["load_average"])),  # type: ignore[call-overload]
        )
        for r in runs
    ]
    result.tables.append(
        table(
            (
                "groups",
                "agents",
                "every group protected after s (no: how many were at the window)",
                "controller CPU % of a core",
                "CPU us per heartbeat (agent x interval)",
                "CPU us per report",
                "reports/s handled / expected",
                "handling p99 ms (bucket bound)",
                "agent round trip p99 ms",
                "crash -> Promote ms: median / max (crashes)",
                "missed heartbeats in window",
                "missed heartbeats, whole run (while connecting and settling)",
                "load average (1 min) at window start -> end",
            ),
            rows,
        )
    )
    result.notes.append(
        "Controller CPU is its own user + system time (/proc) over the window, after the warm-up; CPU "
        "per heartbeat divides it by the heartbeats in the window (one per agent per "
        "heartbeat_interval: a report, or on a stream the keep-alive pings that stand for it), CPU "
        "per report by the reports the controller handled (its histogram's count); both include "
        "everything else the controller does meanwhile (keep-alive pings, its 50 ms timer, the "
        "once-a-second sweep of every group). Handling p99 is the upper bound of the "
        "xcha_heartbeat_handling_seconds bucket that holds the 99th percentile of the reports "
        "handled in the window; the round trip p99 is that of the reports sent in the window, the "
        "highest of the simulator processes' p99s (a report waits behind the others in the "
        "controller's queue: this is the agent's view)."
    )
    result.notes.append(
        "Each size starts a new controller with no state; its agents start over groups/100 s (10 s "
        "at most), each with a TLS handshake, and it adopts every group's master: the window opens "
        "once every group is protected (the time from the first agent's start, in the table) and the "
        "warm-up after it has passed. "
        "A missed heartbeat is a report that got no reply within max(heartbeat_interval, 0.5 s), or a "
        "stream that ended unasked (a keep-alive ping unanswered within that time): the agent then "
        "opens its stream anew (or moves to the next controller). The whole run includes "
        "the start, the warm-up and the injected crash."
    )
    result.notes.append(
        "Crash -> Promote: from the victim master's report of its postmaster's death (sent at once on "
        "its stream, as the agent does) to the Promote reaching its standby's simulated agent, after "
        "the window, with every other agent still reporting, for --crashes groups in turn, one a second "
        "(the first crash falls on the metrics scrape that closes the window); the victim groups' agents "
        "run in a simulator process of their own (agents have hosts of their own). A pair (FIRST 1 of 1) "
        "needs no Detach: its one synchronous standby holds every acknowledged commit."
    )
    result.notes.append(
        f"The simulators (at nice 10: they stand for agents on other machines) share the machine's "
        f"{cores} cores with the controller (their own CPU per run is in the JSON), and so did other "
        "work on this machine (the load averages): round trips and crash -> Promote include waiting "
        "for a core; the controller's CPU time does not."
    )
    kept = [r for r in runs if kept_up(r)]
    for r in runs:
        if not kept_up(r):
            last = kept[-1] if kept else r
            per_heartbeat = float(str(last["cpu_us_per_heartbeat"]))
            need = (
                f"{per_heartbeat * float(str(r['heartbeats_per_s'])) / 1e4:.0f} % "
                f"of a core ({last['groups']} groups' {per_heartbeat} us per heartbeat)"
                if kept
                else "more than it got"
            )
            result.notes.append(
                f"{r['groups']} groups: the controller fell behind ({r['reports_per_s']} of "
                f"{r['offered_per_s']} reports/s handled in the window): its CPU is what it got on this "
                "machine (shared with the simulators and other work), not what it needed; at the CPU per "
                f"heartbeat of the largest size that kept up it would need {need}."
            )
        if r["missed"]:
            result.notes.append(f"{r['groups']} groups: missed heartbeats by cause: {r['missed_reasons']}.")
    p99 = many["handling_p99_bucket_ms"]
    promote = promote_times(many["crash_to_promote_ms"])
    promoted = sorted(t for t in promote if t is not None)
    all_promoted = bool(promote) and len(promoted) == len(promote)
    result.figures = {
        "runs": runs,
        "targets": {
            "groups": many["groups"],
            "cpu_under_50pct": float(str(many["controller_cpu_pct"])) < 50,
            "handling_p99_under_20ms": p99 is not None and float(str(p99)) < 20,
            "crash_to_promote_median_under_50ms": all_promoted and statistics.median(promoted) < 50,
            "crash_to_promote_max_under_50ms": all_promoted and promoted[-1] < 50,
            "no_missed_heartbeat_in_window": many["missed_in_window"] == 0,
        },
    }
    stamp = time.strftime("%Y-%m-%d")
    picture = RESULTS / f"{name}-{stamp}.png"
    if not args.no_plot:
        RESULTS.mkdir(exist_ok=True)
        series = {"Heartbeats streams" if args.protocol == "stream" else "unary Heartbeat": runs}
        if args.protocol == "stream" and (unary := earlier_runs("scale-unary", stamp)):
            series["unary Heartbeat (earlier agents)"] = unary
        if plot(series, picture):
            result.notes.append(f"Plot: {picture.name} (CPU and CPU per heartbeat against groups).")
        else:
            say("no plot: matplotlib is not installed (pip install -e '.[test]')")
    path = result.write()
    say("\n" + path.read_text())
    return 0
