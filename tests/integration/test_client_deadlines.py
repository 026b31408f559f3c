"""Client deadlines against a server that hangs (xcha.pg.client): the call returns at the
deadline, no cancel request is waited for, and the process stays sound (a connection freed
under a suspended query once corrupted memory and crashed the test run)."""

import contextlib
import os
import signal
import time

import psycopg
import pytest

from tests.conftest import InstanceFactory
from xcha.pg.client import bounded

pytestmark = pytest.mark.integration


async def test_a_query_to_a_stopped_server_ends_at_its_deadline_every_time(
    make_instance: InstanceFactory,
) -> None:
    instance = make_instance("dn1a")
    await instance.bootstrap_master()
    for _ in range(20):
        conn = await instance.connect()
        stopped = instance.processes()
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError, match=r"no answer within 0\.20 s"):
                await bounded(conn, conn.execute("SELECT 1"), 0.2)
            assert time.monotonic() - started < 2.0, "no cancel request is waited for"
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        await conn.close()
    async with await instance.connect() as conn:
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
