"""The controller's heap freezing: after start-up, long-lived objects leave the collector's
sight, and every FULL_COLLECTION_EVERY passes everything is collected again."""

import asyncio
import gc

import pytest

from xcha.controller import heap


async def test_the_heap_is_frozen_after_start_up_and_thawed_for_a_full_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heap, "FIRST_FREEZE", 0.0)
    monkeypatch.setattr(heap, "FREEZE_EVERY", 0.01)
    monkeypatch.setattr(heap, "FULL_COLLECTION_EVERY", 3)
    unfrozen: list[int] = []
    thaw = gc.unfreeze
    monkeypatch.setattr(gc, "unfreeze", lambda: (unfrozen.append(gc.get_freeze_count()), thaw()))
    task = asyncio.ensure_future(heap.keep_heap_frozen())
    try:
        await asyncio.sleep(0.005)
        assert gc.get_freeze_count() > 0, "frozen after the first pass"
        while not unfrozen:
            await asyncio.sleep(0.01)
        assert unfrozen[0] > 0, "thawed (then collected and frozen again) at the third pass"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        thaw()  # the rest of the test run collects as usual
        gc.unfreeze()
