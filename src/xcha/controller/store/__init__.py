"""Where controllers keep what they must not forget (`base`), one module per kind of store:
`sqlite` (embedded, one controller) and `etcd` (several controllers, one elected leader)."""

from xcha.controller.store.base import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    LeaderInfo,
    Leadership,
    MemberRecord,
    Snapshot,
    Store,
    StoreUnavailable,
)
from xcha.controller.store.sqlite import SqliteLeadership, SqliteStore

__all__ = [
    "Conflict",
    "Deposed",
    "EventRecord",
    "GroupRecord",
    "LeaderInfo",
    "Leadership",
    "MemberRecord",
    "Snapshot",
    "SqliteLeadership",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
]
