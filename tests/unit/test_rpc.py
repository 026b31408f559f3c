"""The message <-> domain conversions of xcha.rpc, both ways (the status ones:
test_agent_state.py)."""

import pytest

from xcha.errors import InvalidInput
from xcha.names import Endpoint
from xcha.pg.syncrep import SyncPolicy, SyncStandbys
from xcha.rpc import endpoint_from_proto, endpoint_to_proto, sync_from_proto, sync_to_proto
from xcha.v1 import xcha_pb2 as pb


@pytest.mark.parametrize(
    "sync",
    [
        SyncStandbys(SyncPolicy("first", 1), ("dn1b",)),
        SyncStandbys(SyncPolicy("any", 2), ("dn1b", "dn1c", "dn1d")),
        SyncStandbys(SyncPolicy("first", 1), ()),
    ],
)
def test_synchronous_standbys_travel_both_ways(sync: SyncStandbys) -> None:
    assert sync_from_proto(sync_to_proto(sync)) == sync


@pytest.mark.parametrize(("method", "count"), [("all", 1), ("first", 0), ("", 1)])
def test_a_synchronous_policy_no_server_accepts_is_invalid_input(method: str, count: int) -> None:
    with pytest.raises(InvalidInput, match="invalid synchronous policy"):
        sync_from_proto(pb.SyncStandbys(method=method, count=count, names=["dn1b"]))


def test_an_endpoint_travels_both_ways_and_none_is_an_empty_one() -> None:
    endpoint = Endpoint("10.0.0.2", 5433)
    assert endpoint_from_proto(endpoint_to_proto(endpoint)) == endpoint
    assert endpoint_to_proto(None) == pb.Endpoint()
    assert endpoint_from_proto(pb.Endpoint()) is None
