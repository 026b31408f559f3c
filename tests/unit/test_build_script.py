"""scripts/build_pgxc.sh: its argument errors, the check of an installed XCHA_*_BINDIR, a missing
source tarball; and the skip reasons of the xl_bindir / xc_bindir fixtures. Nothing is built."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, pgxc_bindir_or_skip

SCRIPT = REPO_ROOT / "scripts" / "build_pgxc.sh"
XL_BINARIES = [
    "initgtm",
    "gtm",
    "gtm_ctl",
    "gtm_proxy",
    "initdb",
    "pg_ctl",
    "postgres",
    "psql",
    "pg_basebackup",
    "pg_rewind",
    "pgxc_clean",
    "pg_controldata",
]


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("XCHA_XL_", "XCHA_XC_"))}
    # No runuser check against a real OS user: the fake binaries live in pytest's private tmp.
    environ.update({"XCHA_PG_USER": "xcha-no-such-user", **env})
    return subprocess.run([str(SCRIPT), *args], env=environ, capture_output=True, text=True, timeout=60)


def fake_bindir(path: Path, version: str, names: list[str]) -> Path:
    path.mkdir()
    for name in names:
        program = path / name
        program.write_text(f"#!/bin/sh\necho '{version}'\n")
        program.chmod(0o755)
    return path


@pytest.mark.parametrize("args", [(), ("xl", "xc"), ("pg",)])
def test_usage_errors(args: tuple[str, ...]) -> None:
    result = run_script(*args)
    assert result.returncode == 2
    assert "usage: scripts/build_pgxc.sh xl|xc" in result.stderr
    assert result.stdout == ""


def test_missing_tarball_is_its_own_status(tmp_path: Path) -> None:
    result = run_script("xl", XCHA_XL_TARBALL=str(tmp_path / "none.tar.xz"), XCHA_CACHE_DIR=str(tmp_path))
    assert result.returncode == 3
    assert f"Postgres-XL source not found at {tmp_path / 'none.tar.xz'}" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plain_postgresql_is_not_postgres_xl(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path / "bin", "postgres (PostgreSQL) 15.8", XL_BINARIES)
    result = run_script("xl", XCHA_XL_BINDIR=str(bindir))
    assert result.returncode == 1
    assert (
        f"{bindir} is not Postgres-XL (postgres --version says: postgres (PostgreSQL) 15.8)" in result.stderr
    )
    assert result.stdout == ""


def test_the_installed_postgresql_is_not_postgres_xc() -> None:
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindirs:
        pytest.skip("no PostgreSQL installed under /usr/lib/postgresql")
    result = run_script("xc", XCHA_XC_BINDIR=str(bindirs[-1]))
    assert result.returncode == 1
    assert "is not Postgres-XC" in result.stderr


def test_an_installed_postgres_xl_is_used_as_is(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path / "bin", "postgres (PostgreSQL) 10.9 (Postgres-XL 10r1.1)", XL_BINARIES)
    result = run_script("xl", XCHA_XL_BINDIR=str(bindir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(bindir)


def test_an_installed_postgres_xl_lacking_programs_is_refused(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path / "bin", "postgres (PostgreSQL) 10.9 (Postgres-XL 10r1.1)", ["postgres"])
    result = run_script("xl", XCHA_XL_BINDIR=str(bindir))
    assert result.returncode == 1
    assert f"missing in {bindir}: initgtm gtm gtm_ctl gtm_proxy initdb" in result.stderr


def test_fixture_skip_says_no_tarball_and_no_bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XCHA_XC_BINDIR", raising=False)
    monkeypatch.setenv("XCHA_XC_TARBALL", str(tmp_path / "none.tar.xz"))
    with pytest.raises(pytest.skip.Exception) as skipped:
        pgxc_bindir_or_skip("xc")
    assert str(skipped.value) == (
        f"Postgres-XC not available: no source tarball at {tmp_path / 'none.tar.xz'} "
        "(XCHA_XC_TARBALL) and no XCHA_XC_BINDIR"
    )


def test_fixture_skip_says_the_bindir_was_not_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = tmp_path / "postgres-xl.tar.xz"
    tarball.write_bytes(b"")
    monkeypatch.delenv("XCHA_XL_BINDIR", raising=False)
    monkeypatch.setenv("XCHA_XL_TARBALL", str(tarball))
    with pytest.raises(pytest.skip.Exception, match=r"XCHA_XL_BINDIR is not set \(./run test builds"):
        pgxc_bindir_or_skip("xl")


def test_fixture_returns_the_exported_bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = fake_bindir(tmp_path / "bin", "postgres (PostgreSQL) 10.9 (Postgres-XL 10r1.1)", ["postgres"])
    monkeypatch.setenv("XCHA_XL_BINDIR", str(bindir))
    assert pgxc_bindir_or_skip("xl") == bindir
