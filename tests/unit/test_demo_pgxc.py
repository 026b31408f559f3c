"""The XL / XC demo's judgement without a cluster: false commits classified by the crash and
re-point, the re-point timeline read from the controller's events, the demo's verdict, and
the `--xl` / `--xc` options of `xcha demo` and `xcha up`."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xcha import demo_pgxc
from xcha.cli import main
from xcha.demo import demo_plan, pgxc_plan
from xcha.errors import XchaError
from xcha.harness import repoint_marks
from xcha.topology import Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Transaction, classify

FAULT = 1000.0
REPOINT = 1000.2  # the re-point barrier started 200 ms after the kill
CRASHES = [(FAULT, REPOINT)]


def transaction(ids: tuple[int, ...], sent: float, ended: float, answer: str = "COMMIT") -> Transaction:
    return Transaction(ids, began=sent - 0.01, commit_sent=sent, ended=ended, answer=answer)


def test_a_commit_with_every_row_present_is_committed() -> None:
    judged = classify([transaction((1, 2), 999.0, 999.01)], {1, 2}, CRASHES)
    assert (judged.transactions, judged.committed) == (1, 1)
    assert judged.false_commits == judged.false_commits_at_crash == judged.torn == []


def test_a_false_commit_sent_before_the_re_point_and_answered_after_the_kill_raced_the_crash() -> None:
    racing = transaction((1, 2), 999.99, 1000.05)
    judged = classify([racing], set(), CRASHES)
    assert judged.false_commits_at_crash == [racing] and judged.false_commits == []


def test_a_false_commit_sent_after_the_re_point_started_is_xchas() -> None:
    spanning = transaction((1, 2), 1000.25, 1000.3)
    judged = classify([spanning], {2}, CRASHES)
    assert judged.false_commits == [spanning] and judged.false_commits_at_crash == []
    assert judged.torn == [spanning]  # one row of two


def test_a_false_commit_answered_before_the_kill_is_xchas() -> None:
    """Acknowledged before the crash and gone afterwards: a lost commit, nothing raced."""
    before = transaction((1, 2), 998.0, 998.01)
    assert classify([before], set(), CRASHES).false_commits == [before]


def test_a_commit_answered_rollback_without_error_is_a_false_commit() -> None:
    """XC answers ROLLBACK to a COMMIT its pool reload aborted; psycopg's conn.commit() raises
    nothing: the rows decide."""
    silent = transaction((1, 2), 1000.5, 1000.51, answer="ROLLBACK")
    judged = classify([silent], set(), CRASHES)
    assert silent.returned and judged.false_commits == [silent] and judged.committed == 0


def test_a_commit_that_failed_is_no_false_commit_but_a_torn_one_is_counted() -> None:
    failed = transaction((1, 2), 1000.5, 1000.51, answer="error: terminating connection")
    torn = transaction((3, 4), 1000.0, 1000.1, answer="error: server closed the connection")
    never_sent = Transaction((5, 6), began=1000.5, answer="error: Failed to get pooled connections")
    judged = classify([failed, torn, never_sent], {3}, CRASHES)
    assert judged.transactions == 2  # never_sent sent no COMMIT
    assert judged.false_commits == judged.false_commits_at_crash == []
    assert judged.torn == [] and judged.torn_at_crash == [torn]


def test_without_a_crash_every_false_commit_is_xchas() -> None:
    racing = transaction((1, 2), 999.99, 1000.05)
    assert classify([racing], set(), []).false_commits == [racing]


def _event(kind: str, at: float, epoch: int, details: dict[str, object]) -> pb.Event:
    return pb.Event(time=at, kind=kind, epoch=epoch, datanode="dn1", details_json=json.dumps(details))


XL_FIRST = (
    "dn1 -> 127.0.0.1:5433: end open transactions 20.0 ms (1 ended); ALTER NODE 4.0 ms; "
    "pgxc_pool_reload 3.0 ms; pgxc_pool_check 5.0 ms; EXECUTE DIRECT ON (dn1) ALTER NODE 30.0 ms; "
    "EXECUTE DIRECT ON (dn1) pgxc_pool_reload 25.0 ms; EXECUTE DIRECT ON (dn2) ALTER NODE 5.0 ms; "
    "EXECUTE DIRECT ON (dn2) pgxc_pool_reload 10.0 ms; in-doubt cleanup 150 ms: pgxc_clean: There's "
    "no prepared 2PC in this cluster.  Exiting."
)
XC_SECOND = (
    "dn1 -> 127.0.0.1:5433: end open transactions 23.2 ms (2 ended); ALTER NODE 4.1 ms; "
    "pgxc_pool_reload 1.6 ms; pgxc_node 0.7 ms; EXECUTE DIRECT ON (dn1) 10.6 ms"
)


def test_the_re_point_timeline_is_read_from_the_barriers_events() -> None:
    events = [
        _event("state", 990.0, 3, {"to": "rerouting"}),  # an earlier failover: ignored
        _event("state", 1000.2, 4, {"from": "failover", "to": "rerouting"}),
        _event(
            "rerouted",
            1000.6,
            4,
            {
                "coordinators": {
                    "coord1": {"attempts": 1, "acknowledged_after_ms": 300.0, "detail": XL_FIRST},
                    "coord2": {"attempts": 3, "acknowledged_after_ms": 80.0, "detail": XC_SECOND},
                }
            },
        ),
    ]
    marks = repoint_marks(events, 3)
    assert marks is not None
    assert marks.started == 1000.2
    assert marks.cleanup == pytest.approx(1000.5)  # coord1's acknowledgement
    assert marks.catalogs == pytest.approx(1000.35)  # before its 150 ms of cleanup
    assert marks.coordinators["coord1"] == pytest.approx(1000.28)  # less 70 ms of catalogs too
    assert marks.coordinators["coord2"] == pytest.approx(1000.28)  # XC's own check counts as its own
    assert marks.attempts == {"coord1": 1, "coord2": 3}
    assert marks.cleanup_said == "pgxc_clean: There's no prepared 2PC in this cluster.  Exiting."


def test_no_re_point_marks_before_the_barrier_finished() -> None:
    assert repoint_marks([_event("state", 1000.2, 4, {"to": "rerouting"})], 3) is None


def test_a_false_commit_at_the_crash_does_not_fail_the_demo_one_spanning_the_re_point_does() -> None:
    report = demo_pgxc.PgxcReport(failed_over=True, join_ok=True, old_master_rejoined=True)
    assert demo_pgxc.failures(report) == []
    report.false_commits_at_crash, report.torn_at_crash = 4, 1
    assert demo_pgxc.failures(report) == []
    report.false_commits = 1
    assert demo_pgxc.failures(report) == ["false COMMITs spanning the re-point"]


def test_pgxc_demo_json_is_printed_when_the_demo_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(cluster: object, progress: object, report: object) -> None:
        raise XchaError("no write reached dn1 through coord2 within 30 s of its failover")

    monkeypatch.setattr(demo_pgxc, "_run", failing)
    assert asyncio.run(demo_pgxc.run_pgxc_demo("xl", tmp_path / "demo", as_json=True)) == 1
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["error"] == "no write reached dn1 through coord2 within 30 s of its failover"
    assert report["router"] == "pgxc" and report["flavor"] == "xl"
    assert report["coordinators"] == ["coord1", "coord2"]
    for key in ("rto_ms", "lost", "old_master_rejoined", "false_commits", "false_commits_at_crash"):
        assert key in report
    assert report["repointed_ms"] == {} and report["first_write_ms"] == {}


def test_demo_xl_runs_the_pgxc_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[tuple[str, Path | None, bool]] = []

    async def fake(flavor: str, workdir: Path | None = None, as_json: bool = False) -> int:
        called.append((flavor, workdir, as_json))
        return 0

    monkeypatch.setattr(demo_pgxc, "run_pgxc_demo", fake)
    assert main(["demo", "--xc", "--json", "--workdir", "/tmp/d"]) == 0
    assert called == [("xc", Path("/tmp/d"), True)]


@pytest.mark.parametrize(
    ("plan", "asked", "made_with"),
    [
        (demo_plan("fdw"), ["--xl"], "--reroute fdw"),
        (pgxc_plan("xl"), ["--xc"], "--xl"),
        (pgxc_plan("xc"), ["--reroute", "fdw"], "--xc"),
    ],
)
def test_up_refuses_another_flavour_for_a_stopped_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], plan: TopologyPlan, asked: list[str], made_with: str
) -> None:
    Topology(tmp_path, plan).save()  # as `xcha up` leaves it after `xcha down`
    assert main(["up", "--workdir", str(tmp_path), *asked]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"xcha: error: {tmp_path} holds a deployment made with {made_with}: leave out {' '.join(asked)} "
        "to start it again, or use another --workdir\n"
    )


@pytest.mark.parametrize(
    "options", [["--xl", "--xc"], ["--xl", "--reroute", "takeover"], ["--reroute", "fdw", "--xc"]]
)
def test_a_flavour_and_a_router_are_one_choice(options: list[str]) -> None:
    for command in ("demo", "up"):
        result = subprocess.run(
            [sys.executable, "-m", "xcha", command, "--workdir", "/nonexistent", *options],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and result.stdout == ""
        assert "not allowed with argument" in result.stderr and len(result.stderr.splitlines()) == 1
