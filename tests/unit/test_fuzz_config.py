"""Mutated configuration files and arbitrary command lines: one clear error that names the key
(or the option), never a traceback.

A mutation replaces one setting with any TOML value (strings with NUL and unicode, huge and
negative numbers, NaN and infinities, lists, tables, dates), removes it, adds an unknown one,
or damages the file's bytes. Bounded like the RPC fuzzing (XCHA_FUZZ_EXAMPLES x 3 examples,
derandomized unless XCHA_FUZZ_RANDOM=1).
"""

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xcha.agent.config import load_agent_config
from xcha.cli import main
from xcha.config import ConfigError
from xcha.controller.config import load_controller_config
from xcha.tls import Identity, create_ca, issue

EXAMPLES = int(os.environ.get("XCHA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES * 3,
    deadline=None,
    derandomize=os.environ.get("XCHA_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

AGENT = """
[agent]
datanode = "dn1"
member = "dn1a"
listen = "127.0.0.1:0"
advertise = "127.0.0.1:7001"
controller = "127.0.0.1:7000"
state_dir = "{d}/state"
watch_interval = 0.05
probe_timeout = 0.5
metrics_listen = "127.0.0.1:9101"
log_format = "text"

[postgres]
data_dir = "{d}/data"
port = 5432
archive_dir = "{d}/archive"
replication_password_file = "{d}/replication.password"
socket_dir = "{d}/run"
host = "127.0.0.1"
listen_addresses = "127.0.0.1"
replication_user = "xcha_repl"
auth = "scram-sha-256"
allowed_networks = ["127.0.0.1/32"]

[tls]
ca_file = "{d}/tls/ca.pem"
cert_file = "{d}/tls/dn1a.pem"
key_file = "{d}/tls/dn1a.key"
"""

CONTROLLER = """
[controller]
listen = "127.0.0.1:7000"
state_dir = "{d}/controller"
heartbeat_interval = 0.25
failure_timeout = 2.0
probe_timeout = 0.5
startup_grace = 2.0
tick_interval = 0.05
metrics_listen = "127.0.0.1:9100"
log_format = "json"

[router]
kind = "fdw"

[[router.coordinator]]
name = "coord1"
conninfo = "host=/tmp port=5432 user=postgres"

[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b", "dn1c"]
synchronous = "FIRST 1"
sync_policy = "available"
allow_data_loss = false
async_members = ["dn1c"]

[tls]
ca_file = "{d}/tls/ca.pem"
cert_file = "{d}/tls/controller.pem"
key_file = "{d}/tls/controller.key"
"""

TEXT = st.one_of(
    st.text(max_size=20), st.sampled_from(["", "\x00", "/a\x00b", "ü", "🙂", "nan", "127.0.0.1:0"])
)
VALUES: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        TEXT,
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, -1, 2**63 - 1, -(2**63)]),
        st.floats(),
        st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e300]),
        st.booleans(),
        st.datetimes(timezones=st.just(datetime.UTC)),
        st.dates(),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "name"]), children, max_size=2),
    ),
    max_leaves=5,
)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):  # JSON's escapes are TOML's, but for DEL and beyond the BMP
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _document(data: dict[str, Any]) -> str:
    """TOML for a configuration: tables and arrays of tables of settings, one level deep."""
    lines: list[str] = []

    def table(header: str, values: dict[str, Any]) -> None:
        lines.append(header)
        nested = []
        for key, value in values.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                nested.append((key, value))
            else:
                lines.append(f"{json.dumps(key)} = {_toml(value)}")
        for key, items in nested:
            for item in items:
                table(f"[[{header.strip('[]')}.{key}]]", item)

    for name, value in data.items():
        if isinstance(value, list):
            for item in value:
                table(f"[[{name}]]", item)
        elif isinstance(value, dict):
            table(f"[{name}]", value)
        else:
            lines.insert(0, f"{json.dumps(name)} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _settings(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any], str]]:
    """(dotted key as the loaders name it, its table, its name) of every setting."""
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _settings(value, dotted)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                yield from _settings(item, f"{dotted}[{index}]")
        else:
            yield dotted, data, key


def _numbers(value: object) -> Iterator[float]:
    """Every float of a loaded configuration (frozen dataclasses, tuples of them)."""
    if isinstance(value, float):
        yield value
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _numbers(getattr(value, field.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _numbers(item)


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("config")
    create_ca(base / "tls")
    issue(base / "tls", Identity("agent", "dn1a", "dn1"))
    issue(base / "tls", Identity("controller", "controller"))
    (base / "replication.password").write_text("secret\n")
    return base


LOADERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "agent": (AGENT, load_agent_config),
    "controller": (CONTROLLER, load_controller_config),
}


@pytest.mark.parametrize("kind", LOADERS)
def test_the_base_configurations_load(directory: Path, kind: str) -> None:
    text, load = LOADERS[kind]
    path = directory / f"{kind}.toml"
    path.write_text(text.format(d=directory))
    load(path)


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_a_number_that_is_not_finite_is_refused_by_its_key(directory: Path, kind: str, number: float) -> None:
    """TOML has nan and inf; a NaN heartbeat interval passes every comparison with a bound."""
    text, load = LOADERS[kind]
    data = tomllib.loads(text.format(d=directory))
    for dotted, table, name in list(_settings(data)):
        if not isinstance(table[name], float):
            continue
        original, table[name] = table[name], number
        path = directory / f"number-{kind}.toml"
        path.write_text(_document(data))
        with pytest.raises(ConfigError) as refused:
            load(path)
        assert any(key == dotted for key, _ in refused.value.problems), (dotted, refused.value.problems)
        table[name] = original


@pytest.mark.parametrize("kind", LOADERS)
def test_a_mutated_setting_is_one_clear_error_naming_its_key(directory: Path, kind: str) -> None:
    text, load = LOADERS[kind]
    base = tomllib.loads(text.format(d=directory))
    keys = [dotted for dotted, _, _ in _settings(base)]
    path = directory / f"mutated-{kind}.toml"

    @FUZZ
    @given(
        index=st.integers(0, len(keys) - 1),
        change=st.sampled_from(["replace", "remove", "add"]),
        value=VALUES,
    )
    def check(index: int, change: str, value: Any) -> None:
        data = tomllib.loads(text.format(d=directory))
        dotted, table, name = next(s for i, s in enumerate(_settings(data)) if i == index)
        if change == "replace":
            table[name] = value
        elif change == "remove":
            del table[name]
        else:
            name = "unknown_setting"
            table[name] = value
            dotted = dotted.rpartition(".")[0] + ".unknown_setting"
        path.write_text(_document(data))
        try:
            loaded = load(path)
        except ConfigError as error:
            problems = error.problems
            assert problems and all(key and message for key, message in problems), problems
            assert any(dotted in key or name in message for key, message in problems), (dotted, problems)
            assert "\n" not in str(error)
        else:
            assert all(math.isfinite(number) for number in _numbers(loaded)), (
                f"{dotted} = {value!r} was taken"
            )

    check()


@pytest.mark.parametrize("kind", LOADERS)
def test_damaged_bytes_are_one_clear_error(directory: Path, kind: str) -> None:
    text, load = LOADERS[kind]
    original = text.format(d=directory).encode()
    path = directory / f"damaged-{kind}.toml"

    @FUZZ
    @given(position=st.integers(0, len(original)), junk=st.binary(min_size=1, max_size=4), cut=st.booleans())
    def check(position: int, junk: bytes, cut: bool) -> None:
        path.write_bytes(original[:position] + (b"" if cut else junk) + original[position + len(junk) :])
        try:
            load(path)
        except ConfigError as error:
            assert error.problems and all(key and message for key, message in error.problems)

    check()


def _run(argv: list[str]) -> tuple[int, str]:
    """The command line as a user runs it: an exit code and what it printed on stderr."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse: usage errors and --help
            code = exit.code if isinstance(exit.code, int) else 1
    return code, errors.getvalue()


ARGUMENT = st.one_of(
    st.text(max_size=12).filter(lambda s: "\x00" not in s),
    st.sampled_from(["", "-", "--", "-1", "0", "99999999999999999999", "dn1", "agent/dn1/dn1a", "ü", "a/b"]),
)


STARTING = ("demo", "up", "down", "supervise", "agent", "controller", "ctl", "report-failure")


def _commands(directory: Path) -> list[Callable[[list[str]], list[str]]]:
    """Commands that read and write only under directory and reach no server."""
    tls = str(directory / "tls-cli")
    return [
        lambda a: [
            "pg",
            "render",
            "--role",
            *a[:1],
            "--pg-version",
            *a[1:2],
            "--port",
            *a[2:3],
            "--sync",
            *a[3:4],
        ],
        lambda a: [
            "pg",
            "render",
            "--role",
            "standby",
            "--pg-version",
            "15",
            "--sync-standbys",
            *a[:1],
            *a[1:],
        ],
        lambda a: [
            "tls",
            "issue",
            tls,
            "--role",
            *a[:1],
            "--name",
            *a[1:2],
            "--host",
            *a[2:3],
            "--days",
            *a[3:4],
        ],
        lambda a: ["tls", "init", tls, "--identities", ",".join(a), "--hosts", *a[:1]],
        lambda a: ["tls", "show", str(directory / "tls" / "dn1a.pem"), *(str(directory / x) for x in a[:2])],
        lambda a: ["coordinator", "fdw-sql", "--datanode", *a[:1], "--user", *a[1:2], "--dbname", *a[2:3]],
        lambda a: ["agent", "--config", str(directory / "agent.toml"), "--check-config", *a[:1]],
        lambda a: ["ctl", "status", "--controller", *a[:1]],
        lambda a: ["ctl", "switchover", *a[:1], "--controller", *a[1:2], "--ca", *a[2:3]],
        lambda a: ["report-failure", "--datanode", *a[:1], "--controller", *a[1:2]],
        lambda a: [] if a[:1] and a[0] in STARTING else a,
    ]


def test_arbitrary_command_lines_end_in_one_line_never_a_traceback(directory: Path) -> None:
    (directory / "agent.toml").write_text(AGENT.format(d=directory))
    commands = _commands(directory)

    @FUZZ
    @given(which=st.integers(0, len(commands) - 1), arguments=st.lists(ARGUMENT, max_size=5))
    def check(which: int, arguments: list[str]) -> None:
        code, stderr = _run(commands[which](arguments))
        assert "Traceback" not in stderr, stderr
        if code != 0:
            assert stderr.startswith(("xcha", "usage:")), f"a failure says why: {stderr!r}"

    check()
