"""The agent's Heartbeats stream to one controller: a report written, its reply read, in order;
the stream's end is told to the agent (either end closed it, or a keep-alive ping on its
connection went unanswered)."""

import asyncio
import random
from collections.abc import Callable

import grpc

from xcha.rpc import RenewingChannel, generation
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

RETRY_MAX_INTERVALS = 4  # the longest wait between attempts, in heartbeat intervals (1 s)


def retry_delay(failed_rounds: int, heartbeat_interval: float) -> float:
    """How long to wait after `failed_rounds` rounds in a row in which no controller answered:
    half to all of heartbeat_interval, doubling each round up to RETRY_MAX_INTERVALS of it.
    Without a wait an agent whose controllers are all down retried thousands of times a second
    (measured: 11,282 attempts in 2 s, a whole core, beside PostgreSQL): a stream on a channel
    that cannot connect fails at once. The jitter spreads the agents' returns when a controller
    comes back."""
    rounds = max(1, failed_rounds)
    longest: float = heartbeat_interval * min(RETRY_MAX_INTERVALS, 2 ** (rounds - 1))
    return longest * random.uniform(0.5, 1.0)


class ReportFailed(Exception):
    """A heartbeat got no reply: the stream failed, ended, or did not answer in time."""


class ReportStream:
    """One Heartbeats stream to one controller: each report is answered by one reply, in order.
    It is opened on the agent's kept channel to that address (no new TLS handshake), and opened
    anew after a failure or a certificate reload. `ended` is called once when it ends, by
    either end or because a keep-alive ping on its connection went unanswered."""

    def __init__(
        self,
        address: str,
        opened: "grpc.aio.Channel | RenewingChannel",
        silence: float,
        ended: "Callable[[ReportStream], None] | None" = None,
    ) -> None:
        """silence: `timings.Keepalive.silence` of its channel's keep-alive settings."""
        self.address = address
        self.silence = silence
        self.generation = generation(opened)
        self.call = pb_grpc.ControllerStub(opened).Heartbeats()
        if ended is not None:
            self.call.add_done_callback(lambda _: ended(self))

    @property
    def ended(self) -> bool:
        return bool(self.call.done())

    def usable(self, address: str, opened: "grpc.aio.Channel | RenewingChannel") -> bool:
        return address == self.address and generation(opened) == self.generation and not self.call.done()

    async def exchange(self, request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatReply:
        """Send one report and wait for its reply; ReportFailed when none comes within timeout
        (the stream cannot be used after that: close it)."""

        try:
            async with asyncio.timeout(timeout):
                await self.call.write(request)
                reply = await self.call.read()
            if reply is grpc.aio.EOF:
                raise ReportFailed("the controller ended the stream")
            assert isinstance(reply, pb.HeartbeatReply)
            return reply
        except TimeoutError:
            raise ReportFailed(f"no reply within {timeout:g} s") from None
        except grpc.aio.AioRpcError as error:
            raise ReportFailed(error.details() or error.code().name) from None
        except asyncio.InvalidStateError:  # written to a call that had ended meanwhile
            raise ReportFailed("the stream ended") from None

    def close(self) -> None:
        self.call.cancel()
