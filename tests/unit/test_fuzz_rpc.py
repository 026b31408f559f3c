"""Arbitrary well-typed messages to every RPC of both real servers, from every role: strings
with NUL, unicode and 1 MB names, zero, huge and negative-looking numbers, NaN, missing
fields. Never a crash (both keep serving), never INTERNAL or UNKNOWN (an exception the servicer
did not turn into an answer), and a request refused by authorization changes nothing.

Bounded for the suite: XCHA_FUZZ_EXAMPLES examples per RPC (default 25), derandomized so that
a run is reproducible; XCHA_FUZZ_RANDOM=1 with a larger XCHA_FUZZ_EXAMPLES searches further
(how the bugs fixed alongside were found: event ids past SQLite's integers, an address in a
heartbeat that failed every status answer after it, a PostgreSQL error answered as UNKNOWN).
"""

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.servers import CALLERS, SERVED_AGENT, Servers, request_class, servers_of
from xcha.authz import TABLE, short
from xcha.errors import InvalidInput
from xcha.names import check_address, check_host
from xcha.tls import ROLES
from xcha.v1 import xcha_pb2 as pb

EXAMPLES = int(os.environ.get("XCHA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("XCHA_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
STATUS = (
    ("controller", "/xcha.v1.Controller/GetClusterStatus", pb.ClusterStatusRequest),
    ("agent", "/xcha.v1.Agent/GetStatus", pb.GetStatusRequest),
)
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)
MEGABYTE = "n" * (1 << 20)
# Health.Watch streams until cancelled and Health.List is not served by this grpcio: the
# matrix covers who may call them; their request is one string, as Check's.
FUZZED = [rpc for rpc in TABLE if not rpc.endswith(("/Watch", "/List"))]

NAMES = st.sampled_from(["", "dn1", "dn1a", "dn1b", "dn9", "DN1", "dn1\x00", "\x00", "ü", "🙂" * 3, "../x"])
TEXT = st.one_of(
    st.text(max_size=30),
    NAMES,
    st.integers(0, 19).flatmap(lambda i: st.just(MEGABYTE) if i == 0 else st.text(max_size=200)),
)
UINT32 = st.one_of(
    st.sampled_from([0, 1, 5432, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
UINT64 = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
DOUBLE = st.one_of(st.sampled_from([0.0, -0.0, -1.0, 1e308, float("inf"), float("-inf")]), st.floats())


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kinds: dict[int, st.SearchStrategy[Any]] = {
        FieldDescriptor.TYPE_STRING: TEXT,
        FieldDescriptor.TYPE_UINT32: UINT32,
        FieldDescriptor.TYPE_UINT64: UINT64,
        FieldDescriptor.TYPE_DOUBLE: DOUBLE,
        FieldDescriptor.TYPE_BOOL: st.booleans(),
        FieldDescriptor.TYPE_ENUM: st.integers(-3, 12),  # proto3 enums take unknown values
    }
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type._concrete_class, depth + 1)
    return kinds[field.type]


def messages(cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Any message of cls: each field missing or any value of its type (nested 3 deep)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in cls.DESCRIPTOR.fields:
        if depth >= 3 and field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        value = _scalar(field, depth)
        fields[field.name] = st.one_of(st.none(), st.lists(value, max_size=3) if field.is_repeated else value)
    return st.fixed_dictionaries(fields).map(lambda values: _build(cls, values))


def _build(cls: Any, values: dict[str, Any]) -> Any:
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            getattr(message, name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _loopback(message: Any) -> None:
    """Every address that would be used (a valid host other than 127.0.0.1) becomes 127.0.0.1:
    the servers must reach nothing beyond this machine, not even a DNS server. Invalid ones
    stay, for the servers to refuse."""
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                _loopback(item)
        elif field.name == "host" and _valid(check_host, value):
            setattr(message, field.name, "127.0.0.1")
        elif field.name == "agent_address" and _valid(check_address, value):
            setattr(message, field.name, f"127.0.0.1:{check_address(value)[1]}")


def _valid(check: Any, value: str) -> bool:
    try:
        check(value)
    except InvalidInput:
        return False
    return True


def _as_itself(request: Any, role: str) -> None:
    """Half the time the request speaks for the caller, so that it gets past the "only as
    itself" rule and the agent's addressee check into the domain code."""
    if role == "agent" and hasattr(request, "status"):
        request.status.datanode, request.status.member = "dn1", CALLERS["agent"].name
    elif role == "controller" and hasattr(request, "member"):
        request.member = SERVED_AGENT.name


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("fuzz"))
    running.start()
    yield running
    running.stop()


@pytest.mark.parametrize("rpc", FUZZED, ids=short)
def test_arbitrary_messages_never_crash_a_server(servers: Servers, rpc: str) -> None:
    @FUZZ
    @given(request=messages(request_class(rpc)), role=st.sampled_from(ROLES), as_itself=st.booleans())
    def check(request: Any, role: str, as_itself: bool) -> None:
        if as_itself:
            _as_itself(request, role)
        _loopback(request)
        for server in servers_of(rpc):
            before = servers.state()
            code, details = servers.call(server, rpc, request, CALLERS[role].name)
            assert code not in NEVER, f"{short(rpc)} as {role} on the {server}: {code}: {details[:500]}"
            if code == grpc.StatusCode.PERMISSION_DENIED:
                assert servers.state() == before, f"a refused {short(rpc)} changed something"
            assert len(details) < 2000, "an error quotes at most a bounded part of the request"
        # What an allowed request was made to change, both servers still answer status with.
        for server, status_rpc, request_type in STATUS:
            code, details = servers.call(server, status_rpc, request_type(), "alice")
            assert code == grpc.StatusCode.OK, f"after {short(rpc)} as {role}: {short(status_rpc)}: {details}"

    check()
