"""The command line: output an operator reviews, and one-line errors with a non-zero exit."""

import subprocess
import sys

import pytest

from xcha.cli import main


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
