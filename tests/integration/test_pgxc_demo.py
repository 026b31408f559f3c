"""`xcha demo --xl` and `--xc` end to end on real Postgres-XL / XC clusters, as `./run demo --xl
--json` runs them: the JSON report's checks, among them every row on the datanode
`xcha.pgxc_nodes.routed_ids` sent it to (xc_node_id against pgxc_node.node_id). Also `xcha up
--xl`, again on the running deployment, and `xcha down`.

Each command runs as a child process with its deployment under the test's directory; whatever
the outcome, `Topology.down()` on that directory stops by PID anything it left.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from xcha.topology import TOPOLOGY_FILE, Topology

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO_TIMEOUT = 240.0  # s: about 20 s alone on this machine, far more beside other test runs


def xcha(args: list[str], bindirs: dict[str, Path], timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m xcha ARGS`; on a timeout SIGTERM first (the demo tears down on it), then SIGKILL."""
    env = {**os.environ, **{f"XCHA_{flavor.upper()}_BINDIR": str(path) for flavor, path in bindirs.items()}}
    process = subprocess.Popen(
        [sys.executable, "-m", "xcha", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(
            f"xcha {' '.join(args)} did not finish within {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}"
        )
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stop_everything(workdir: Path) -> None:
    if (workdir / TOPOLOGY_FILE).exists():
        asyncio.run(Topology.load(workdir).down())


def run_demo(flavor: str, bindir: Path, workdir: Path) -> dict[str, object]:
    demo = workdir / "demo"
    try:
        result = xcha(
            ["demo", f"--{flavor}", "--json", "--workdir", str(demo)], {flavor: bindir}, DEMO_TIMEOUT
        )
    finally:
        stop_everything(demo)
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{result.stderr[-3000:]}"
    report: dict[str, object] = json.loads(lines[-1])
    print(json.dumps(report, indent=1))
    assert result.returncode == 0, f"the demo failed: {report}"
    return report


def assert_demo_checks(report: dict[str, object], flavor: str) -> None:
    assert report["error"] is None and report["failed_over"] is True
    assert report["flavor"] == flavor and report["router"] == "pgxc"
    assert isinstance(report["acknowledged"], int) and report["acknowledged"] > 0
    assert report["lost"] == 0 and report["unexpected"] == 0
    assert isinstance(report["transactions_committed"], int) and report["transactions_committed"] > 0
    assert report["false_commits"] == 0 and report["torn"] == 0
    assert isinstance(report["false_commits_at_crash"], int)  # the cluster's own two-phase commit
    assert report["old_master_rejoined"] is True
    assert isinstance(report["rows_checked"], int) and report["rows_checked"] > report["acknowledged"]
    assert report["misrouted"] == 0, "a row is not on the datanode routed_ids computed for its id"
    assert report["join_ok"] is True and report["join_rows"] == report["join_expected"]
    assert isinstance(report["prepared_left"], int)  # reported: the in-doubt cleanup may miss one
    assert report["coordinators"] == ["coord1", "coord2"]
    for key in ("repointed_ms", "first_write_ms", "reroute_attempts"):
        timings = report[key]
        assert isinstance(timings, dict) and set(timings) == {"coord1", "coord2"}, key
    assert isinstance(report["rto_ms"], float) and isinstance(report["cleanup_ms"], float)


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_xl_demo_fails_over_under_writes_through_both_coordinators(xl_bindir: Path, workdir: Path) -> None:
    report = run_demo("xl", xl_bindir, workdir)
    assert_demo_checks(report, "xl")
    assert "Distribute results by" in str(report["join_plan"])  # rows moved between datanodes
    assert isinstance(report["catalogs_ms"], float)  # the datanodes' catalogs were re-pointed


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_xc_demo_fails_over_under_writes_through_both_coordinators(xc_bindir: Path, workdir: Path) -> None:
    report = run_demo("xc", xc_bindir, workdir)
    assert_demo_checks(report, "xc")
    assert report["catalogs_ms"] is None  # XC routes by the coordinators' catalogs alone


@pytest.mark.timeout(300)
def test_up_xl_starts_a_cluster_that_up_finds_running_and_down_stops(xl_bindir: Path, workdir: Path) -> None:
    deployment = workdir / "up"
    bindirs = {"xl": xl_bindir}
    try:
        first = xcha(["up", "--xl", "--workdir", str(deployment)], bindirs, 180)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "coordinator coord1: " in first.stdout and "coordinator coord2: " in first.stdout
        again = xcha(["up", "--workdir", str(deployment)], bindirs, 60)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "everything is already running" in again.stdout and "gtm" in again.stdout
        refused = xcha(["up", "--xc", "--workdir", str(deployment)], bindirs, 60)
        assert refused.returncode == 1 and "made with --xl: leave out --xc" in refused.stderr
        down = xcha(["down", "--workdir", str(deployment)], bindirs, 60)
        assert down.returncode == 0, down.stderr[-3000:]
        assert "gtm" in down.stdout and "coordinator:coord2" in down.stdout
    finally:
        stop_everything(deployment)
    topology = Topology.load(deployment)
    assert not any(topology.alive(key) for key in topology.pids)
    assert all(not topology.instance(member).processes() for member in topology.members)
