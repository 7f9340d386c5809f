"""The gateway's side of the client protocol: an asyncio client of the coordinator's client socket (the same
ZeroMQ v1 protocol as ``coordinator/client.py``), one DEALER connection per request in flight.

Request ids are per connection, so every request has a connection of its own; a connection whose request ended
cleanly goes back to a pool of idle ones. A request abandoned before its final reply (its HTTP client left, or a
stop string ended it) is cancelled through ``cancel_generation`` and its connection closed, never reused.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from coordinator.auth import ClientKeys
from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode, encode
from protocol.ids import RequestId
from protocol.messages import (
    CancelGeneration,
    ErrorReported,
    Generate,
    GenerationDone,
    GenerationQueued,
    GetHealth,
    GetStats,
    HealthReported,
    Message,
    StatsReported,
    TokenStreamed,
)
from workers.gateway_openai import ApiError, request_frame

log = logging.getLogger(__name__)

FIRST_REPLY_S = 10.0
"""How long the coordinator may take to accept or refuse a request before the gateway answers 503."""
CANCEL_SETTLE_S = 10.0
"""After a cancel, how long the gateway waits for the request's final reply before it just drops the connection."""
MAX_IDLE = 256
"""Idle connections kept for reuse."""

M = TypeVar("M", bound=Message)


def connect_address(bind: str) -> str:
    """Where a client on this machine reaches the coordinator's ``bind`` (a wildcard host becomes loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if bind.startswith(wildcard):
            return "tcp://127.0.0.1:" + bind[len(wildcard):]
    if bind.startswith("tcp://[::]:"):
        return "tcp://[::1]:" + bind[len("tcp://[::]:"):]
    return bind


class Upstream:
    """Connections to the coordinator; ``curve``: the client keys when it serves with ``--curve-keys``;
    ``max_generations``: generate requests that may hold a connection at once (None: no bound)."""

    def __init__(self, address: str, curve: ClientKeys | None = None, max_generations: int | None = None) -> None:
        self.address = address
        self.curve = curve
        self.max_generations = max_generations
        self.generations = 0
        """Generate requests holding a connection now: from admission to their final reply (after a cancel too)."""
        self.ctx = zmq.asyncio.Context()
        self.idle: list[zmq.asyncio.Socket] = []
        self.settling: set[asyncio.Task[None]] = set()
        """Cancels waiting for their request's final reply (kept referenced until done)."""

    def _acquire(self) -> zmq.asyncio.Socket:
        if self.idle:
            return self.idle.pop()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.address)
        return sock

    def _release(self, sock: zmq.asyncio.Socket) -> None:
        if len(self.idle) < MAX_IDLE:
            self.idle.append(sock)
        else:
            sock.close(linger=0)

    @staticmethod
    async def _receive(sock: zmq.asyncio.Socket, timeout_s: float | None) -> Message:
        while True:
            try:
                frame = await asyncio.wait_for(sock.recv(), timeout_s)
            except asyncio.TimeoutError:
                raise ApiError("unavailable", f"the coordinator did not answer within {timeout_s:.0f} s") from None
            try:
                return decode(frame)
            except ProtocolError as exc:  # never from a coordinator of the same version: log and wait on
                log.error("undecodable reply from the coordinator: %s", exc)

    async def call(self, request: Message, kind: type[M], timeout_s: float = 5.0) -> M:
        """One request, one reply (``get_health``, ``get_stats``); ``ApiError`` for an error or no answer."""
        sock = self._acquire()
        try:
            await sock.send(encode(request))
            reply = await self._receive(sock, timeout_s)
        except BaseException:
            sock.close(linger=0)
            raise
        self._release(sock)
        if isinstance(reply, ErrorReported):
            raise ApiError(reply.code, reply.message)
        if not isinstance(reply, kind):
            raise ApiError("internal", f"expected {kind.__name__}, got {type(reply).__name__}")
        return reply

    async def health(self, timeout_s: float = 2.0) -> HealthReported:
        return await self.call(GetHealth(), HealthReported, timeout_s)

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return (await self.call(GetStats(), StatsReported, timeout_s)).totals

    def generation(self, request: Generate) -> Generation:
        """``async with upstream.generation(msg) as gen: while ...: await gen.next()``."""
        return Generation(self, request)

    def abandon(self, sock: zmq.asyncio.Socket, request_id: RequestId | None) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(sock, request_id))
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def _cancel(self, sock: zmq.asyncio.Socket, request_id: RequestId | None) -> None:
        """Cancel the request (once its id is known) and wait for its final reply; then drop the connection."""
        try:
            await asyncio.wait_for(self._settle(sock, request_id), CANCEL_SETTLE_S)
        except (asyncio.TimeoutError, ApiError):
            log.warning("request %s: no final reply within %.0f s of its cancel", request_id, CANCEL_SETTLE_S)
        finally:
            sock.close(linger=0)
            self.generations -= 1

    async def _settle(self, sock: zmq.asyncio.Socket, request_id: RequestId | None) -> None:
        if request_id is not None:
            await sock.send(encode(CancelGeneration(request_id=request_id)))
        while True:
            reply = await self._receive(sock, None)
            if isinstance(reply, GenerationQueued) and request_id is None:
                request_id = reply.request_id
                await sock.send(encode(CancelGeneration(request_id=request_id)))
            elif isinstance(reply, GenerationDone) or (isinstance(reply, ErrorReported)
                                                        and reply.code != "unknown_request"):
                return

    def close(self) -> None:
        for task in self.settling:
            task.cancel()
        for sock in self.idle:
            sock.close(linger=0)
        self.idle.clear()
        self.ctx.destroy(linger=0)


class Generation:
    """One ``generate`` in flight on its own connection: ``next()`` gives each ``TokenStreamed`` and at last the
    ``GenerationDone`` (an error reply raises ``ApiError``). Left early, it is cancelled."""

    def __init__(self, upstream: Upstream, request: Generate) -> None:
        self.upstream = upstream
        self.request = request
        self.request_id: RequestId | None = None
        self.finished = False
        self.sock: zmq.asyncio.Socket | None = None
        self._early: list[TokenStreamed | GenerationDone] = []

    async def __aenter__(self) -> Generation:
        """Send the request on a connection of its own; ``ApiError`` ``busy`` (429) at once if ``max_generations``
        requests already hold one."""
        frame = request_frame(self.request)
        upstream = self.upstream
        if upstream.max_generations is not None and upstream.generations >= upstream.max_generations:
            raise ApiError("busy", f"the gateway already has {upstream.generations} request(s) in flight, its "
                                   "maximum (--http-max-inflight)", status=429)
        self.sock = upstream._acquire()
        upstream.generations += 1
        try:
            await self.sock.send(frame)
        except BaseException:
            self.sock.close(linger=0)
            self.sock = None
            upstream.generations -= 1
            raise
        return self

    async def accept(self) -> RequestId:
        """Wait until the coordinator accepts the request (its id) or refuses it (``ApiError``)."""
        while self.request_id is None:
            event = await self.next(accepting=True)
            if event is not None:  # cannot come before generation_queued; kept rather than lost
                self._early.append(event)
        return self.request_id

    async def next(self, accepting: bool = False) -> TokenStreamed | GenerationDone | None:
        """The next token or the final reply (``accepting``: None once the request is accepted)."""
        assert self.sock is not None
        if self._early:
            return self._early.pop(0)
        while True:
            reply = await self.upstream._receive(self.sock, FIRST_REPLY_S if self.request_id is None else None)
            if isinstance(reply, GenerationQueued):
                self.request_id = reply.request_id
                if accepting:
                    return None
            elif isinstance(reply, TokenStreamed):
                return reply
            elif isinstance(reply, GenerationDone):
                self.finished = True
                return reply
            elif isinstance(reply, ErrorReported):
                self.finished = True
                raise ApiError(reply.code, reply.message)
            # generation_started, generation_cancelled: nothing to do

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self.finished:
            self.upstream._release(sock)
            self.upstream.generations -= 1
        elif isinstance(exc, ApiError) and exc.code == "unavailable":
            sock.close(linger=0)  # nothing came back at all: nothing to cancel
            self.upstream.generations -= 1
        else:  # the connection stays counted until the request's final reply (``_cancel``)
            log.info("request %s abandoned before its end: cancelling it", self.request_id)
            self.upstream.abandon(sock, self.request_id)
