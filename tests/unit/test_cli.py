"""The command line: output an operator reviews, and one-line errors with a non-zero exit."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xcha import demo
from xcha.cli import main
from xcha.demo import demo_plan
from xcha.errors import XchaError
from xcha.topology import Topology


def test_pg_render_prints_every_file_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pg", "render", "--role", "standby", "--pg-version", "15", "--name", "dn1b"]) == 0
    out = capsys.readouterr().out
    for name in ("postgresql.conf", "postgresql.xcha.conf", "pg_hba.conf", "pg_ident.conf", "standby.signal"):
        assert f"==> {name}" in out
    assert "port = 5433" in out and "application_name=dn1b" in out


def test_pg_render_for_9_6_writes_recovery_conf(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pg", "render", "--role", "standby", "--pg-version", "9.6"]) == 0
    out = capsys.readouterr().out
    assert "==> recovery.conf" in out and "standby_mode = 'on'" in out and "standby.signal" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "master", "--pg-version", "15", "--name", "DN1"], "invalid node name 'DN1'"),
        (["--role", "master", "--pg-version", "8.4"], "older than 9.1"),
        (["--role", "master", "--pg-version", "fifteen"], "invalid PostgreSQL version"),
        (["--role", "master", "--pg-version", "15", "--port", "0"], "invalid port 0"),
        (["--role", "master", "--pg-version", "9.5", "--sync", "ANY 1", "--sync-standbys", "b"], "ANY k"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_non_zero(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xcha", "pg", "render", *args], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_trust_prints_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pg", "render", "--role", "master", "--pg-version", "15", "--auth", "trust"]) == 0
    assert "warning" in capsys.readouterr().err


def test_up_refuses_another_router_for_a_stopped_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Topology(tmp_path, demo_plan("takeover")).save()  # as `xcha up` leaves it after `xcha down`
    assert main(["up", "--workdir", str(tmp_path), "--reroute", "fdw"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"xcha: error: {tmp_path} holds a deployment made with --reroute takeover: "
        "leave out --reroute fdw to start it again, or use another --workdir\n"
    )


def test_reroute_choices_are_checked_by_the_parser() -> None:
    for command in ("demo", "up"):
        result = subprocess.run(
            [sys.executable, "-m", "xcha", command, "--workdir", "/nonexistent", "--reroute", "vip"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and result.stdout == ""
        assert "invalid choice: 'vip'" in result.stderr and len(result.stderr.splitlines()) == 1


def test_demo_json_is_printed_when_the_demo_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(cluster: object, progress: object, report: object) -> None:
        raise XchaError("no write reached dn1 within 30 s of its failover")

    monkeypatch.setattr(demo, "_run", failing)
    assert asyncio.run(demo.run_demo(tmp_path / "demo", as_json=True)) == 1
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(lines[-1])
    assert report["error"] == "no write reached dn1 within 30 s of its failover"
    assert report["failed_over"] is False and report["router"] == "fdw"
