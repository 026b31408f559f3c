"""Records as JSON text: one encoding for every store, so that a compare-and-set can compare
stored bytes with the bytes an expected record encodes to."""

import json

from xcha.controller.store.base import EventRecord, GroupRecord, MemberRecord
from xcha.controller.views import GroupState, Request


def encode_group(group: GroupRecord) -> str:
    data = {
        **group.__dict__,
        "state": group.state.value,
        "sync_set": list(group.sync_set),
        "request": group.request.__dict__ if group.request else None,
    }
    return json.dumps(data, sort_keys=True)


def decode_group(text: str) -> GroupRecord:
    data = json.loads(text)
    request = data.pop("request")
    return GroupRecord(
        **{
            **data,
            "state": GroupState(data["state"]),
            "sync_set": tuple(data["sync_set"]),
            "request": Request(**request) if request else None,
        }
    )


def encode_member(member: MemberRecord) -> str:
    return json.dumps(member.__dict__, sort_keys=True)


def decode_member(text: str) -> MemberRecord:
    return MemberRecord(**json.loads(text))


def encode_event(event: EventRecord) -> str:
    return json.dumps(event.__dict__, sort_keys=True)


def decode_event(text: str) -> EventRecord:
    return EventRecord(**json.loads(text))
