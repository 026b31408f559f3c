"""The writer's ids: given ones, then more from its refill; running out is a clear error."""

import asyncio

import pytest

from xcha.coordinator import SHARDED_TABLE, partition_ids, shard_table
from xcha.errors import XchaError
from xcha.workload import Writer


def test_ids_are_refilled_when_they_run_out() -> None:
    chunks = [[3, 5], []]
    calls: list[int] = []

    async def refill() -> list[int]:
        calls.append(len(calls))
        return chunks[len(calls) - 1]

    writer = Writer([], ids=iter([1, 2]), refill=refill)

    async def take(count: int) -> list[int]:
        return [await writer.next_id() for _ in range(count)]

    assert asyncio.run(take(4)) == [1, 2, 3, 5]
    assert calls == [0]
    with pytest.raises(XchaError, match="ran out of ids"):
        asyncio.run(writer.next_id())


def test_ids_without_a_refill_run_out_with_an_error_not_stop_iteration() -> None:
    writer = Writer([], ids=iter([7]))
    assert asyncio.run(writer.next_id()) == 7
    with pytest.raises(XchaError, match="ran out of ids"):
        asyncio.run(writer.next_id())


def test_the_writer_and_the_datanodes_create_the_same_table() -> None:
    assert Writer([]).table == SHARDED_TABLE
    text = shard_table().as_string(None)
    assert text == (
        'CREATE TABLE IF NOT EXISTS "xcha_writes" '
        "(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def test_partition_ids_are_asked_for_in_consecutive_chunks() -> None:
    first = partition_ids(0, 2, start=1, count=100).as_string(None)
    assert "generate_series(1::bigint, 1::bigint + 100 - 1)" in first
    assert "satisfies_hash_partition('xcha_writes'::regclass, 2, 0, id)" in first
