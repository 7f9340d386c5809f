"""The gateway's side of the client protocol: an asyncio client of the coordinator's client socket (the same
ZeroMQ v1 protocol as ``coordinator/client.py``), one DEALER connection per request in flight.

Request ids are per connection, so every request has a connection of its own; a connection whose request ended
cleanly goes back to a pool of idle ones. A request abandoned before its final reply (its HTTP client left, or a
stop string ended it) is cancelled through ``cancel_generation`` and its connection closed, never reused. Every reply
is checked against the request its connection serves: one that names another request (a stale reply of an earlier
request on a reused connection) is dropped, never taken for the current request's.

Once accepted, a request never waits without a limit: past its own ``deadline_s`` (and a grace) it ends with a 504;
after ``UpstreamSettings.reply_timeout_s`` of silence the coordinator is asked for its health, and a coordinator that
does not answer ends it with a 504 too (one that answers is busy, perhaps with a long queue: the wait goes on).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
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
    GenerationCancelled,
    GenerationDone,
    GenerationQueued,
    GenerationStarted,
    GetHealth,
    GetStats,
    HealthReported,
    Message,
    StatsReported,
    TokenStreamed,
)
from workers.gateway_openai import ApiError, request_frame

log = logging.getLogger(__name__)

MAX_IDLE = 256
"""Idle connections kept for reuse."""
GENERATION_REPLIES = (GenerationQueued, GenerationStarted, GenerationCancelled, TokenStreamed, GenerationDone)
"""Replies that always name their request."""

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class UpstreamSettings:
    """How long the gateway waits on the coordinator."""

    first_reply_s: float = 10.0
    """How long the coordinator may take to accept or refuse a request before the gateway answers 503."""
    reply_timeout_s: float = 60.0
    """Once a request is accepted, silence (no reply for it) after which the coordinator's health is asked: a
    coordinator that does not answer within ``health_timeout_s`` ends the request with a 504 (one that answers is
    only busy, e.g. the request waits in a long queue, and the wait goes on)."""
    health_timeout_s: float = 5.0
    """How long that health check may take."""
    deadline_grace_s: float = 5.0
    """A request with ``deadline_s`` whose final reply has not come this long after its deadline (the coordinator
    answers ``deadline_exceeded`` at the deadline itself) ends with a 504."""
    cancel_settle_s: float = 10.0
    """After a cancel, how long the gateway waits for the request's final reply before it drops the connection."""


def request_of(reply: Message) -> RequestId | None:
    """The request a reply names (None: it names none, as a refusal before an id was given)."""
    if isinstance(reply, (*GENERATION_REPLIES, ErrorReported)):
        return reply.request_id
    return None


@dataclass(eq=False)
class Connection:
    """One DEALER socket to the coordinator, the request it serves now and the last request id it was given (ids
    only grow: a reply naming an id up to that one, other than the current request's, is stale)."""

    sock: zmq.asyncio.Socket
    last_id: RequestId | None = None
    current: RequestId | None = None

    def serve(self, request_id: RequestId) -> None:
        self.current = self.last_id = request_id

    def stale(self, reply: Message) -> bool:
        """Whether ``reply`` belongs to an earlier request of this connection."""
        rid = request_of(reply)
        return rid is not None and rid != self.current and self.last_id is not None and rid <= self.last_id

    def close(self) -> None:
        self.sock.close(linger=0)


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

    def __init__(self, address: str, curve: ClientKeys | None = None, max_generations: int | None = None,
                 settings: UpstreamSettings | None = None) -> None:
        self.address = address
        self.curve = curve
        self.max_generations = max_generations
        self.settings = settings or UpstreamSettings()
        self.generations = 0
        """Generate requests holding a connection now: from admission to their final reply (after a cancel too)."""
        self.ctx = zmq.asyncio.Context()
        self.idle: list[Connection] = []
        self.settling: set[asyncio.Task[None]] = set()
        """Cancels waiting for their request's final reply (kept referenced until done)."""

    def _acquire(self) -> Connection:
        if self.idle:
            return self.idle.pop()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.address)
        return Connection(sock)

    def _release(self, conn: Connection) -> None:
        conn.current = None
        if len(self.idle) < MAX_IDLE:
            self.idle.append(conn)
        else:
            conn.close()

    @staticmethod
    async def _receive(conn: Connection, timeout_s: float | None) -> Message:
        """The next reply (``asyncio.TimeoutError`` after ``timeout_s``); stale replies are dropped here."""
        while True:
            frame = await asyncio.wait_for(conn.sock.recv(), timeout_s)
            try:
                reply = decode(frame)
            except ProtocolError as exc:  # never from a coordinator of the same version: log and wait on
                log.error("undecodable reply from the coordinator: %s", exc)
                continue
            if conn.stale(reply):
                log.warning("dropped a stale %s of request %s (this connection serves a later one)",
                            type(reply).__name__, request_of(reply))
                continue
            return reply

    async def call(self, request: Message, kind: type[M], timeout_s: float = 5.0) -> M:
        """One request, one reply (``get_health``, ``get_stats``); ``ApiError`` for an error or no answer."""
        conn = self._acquire()
        loop = asyncio.get_running_loop()
        until_s = loop.time() + timeout_s
        try:
            await conn.sock.send(encode(request))
            while True:
                try:
                    reply = await self._receive(conn, max(0.0, until_s - loop.time()))
                except asyncio.TimeoutError:
                    raise ApiError("unavailable", f"the coordinator did not answer within {timeout_s:.0f} s") from None
                if request_of(reply) is None:
                    break
                log.warning("dropped a stale %s of request %s before a %s", type(reply).__name__,
                            request_of(reply), kind.__name__)  # a generation's reply: never this call's
        except BaseException:
            conn.close()
            raise
        self._release(conn)
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

    def abandon(self, conn: Connection, request_id: RequestId | None) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(conn, request_id))
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def _cancel(self, conn: Connection, request_id: RequestId | None) -> None:
        """Cancel the request (once its id is known) and wait for its final reply; then drop the connection."""
        settle_s = self.settings.cancel_settle_s
        try:
            await asyncio.wait_for(self._settle(conn, request_id), settle_s)
        except asyncio.TimeoutError:
            log.warning("request %s: no final reply within %.0f s of its cancel", request_id, settle_s)
        finally:
            conn.close()
            self.generations -= 1

    async def _settle(self, conn: Connection, request_id: RequestId | None) -> None:
        if request_id is not None:
            await conn.sock.send(encode(CancelGeneration(request_id=request_id)))
        while True:
            reply = await self._receive(conn, None)
            rid = request_of(reply)
            if isinstance(reply, GenerationQueued) and request_id is None:
                request_id = reply.request_id
                conn.serve(request_id)
                await conn.sock.send(encode(CancelGeneration(request_id=request_id)))
            elif isinstance(reply, ErrorReported) and rid is None and request_id is None:
                return  # refused: there is nothing to cancel
            elif rid != request_id:
                continue
            elif isinstance(reply, GenerationDone) or (isinstance(reply, ErrorReported)
                                                        and reply.code != "unknown_request"):
                return

    def close(self) -> None:
        for task in self.settling:
            task.cancel()
        for conn in self.idle:
            conn.close()
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
        self.conn: Connection | None = None
        self.deadline_at_s: float | None = None
        """Loop time by which the final reply must have come (the request's ``deadline_s`` and a grace)."""
        self._early: list[TokenStreamed | GenerationDone] = []

    async def __aenter__(self) -> Generation:
        """Send the request on a connection of its own; ``ApiError`` ``busy`` (429) at once if ``max_generations``
        requests already hold one."""
        frame = request_frame(self.request)
        upstream = self.upstream
        if upstream.max_generations is not None and upstream.generations >= upstream.max_generations:
            raise ApiError("busy", f"the gateway already has {upstream.generations} request(s) in flight, its "
                                   "maximum (--http-max-inflight)", status=429)
        if self.request.deadline_s is not None:
            self.deadline_at_s = (asyncio.get_running_loop().time() + self.request.deadline_s
                                  + upstream.settings.deadline_grace_s)
        self.conn = upstream._acquire()
        upstream.generations += 1
        try:
            await self.conn.sock.send(frame)
        except BaseException:
            self.conn.close()
            self.conn = None
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

    async def _wait(self) -> Message:
        """The next reply; before acceptance within ``first_reply_s`` (else 503), after it within the request's
        deadline (else 504) and, while silent, only as long as the coordinator answers a health check (else 504)."""
        assert self.conn is not None
        settings = self.upstream.settings
        if self.request_id is None:
            try:
                return await self.upstream._receive(self.conn, settings.first_reply_s)
            except asyncio.TimeoutError:
                raise ApiError("unavailable", f"the coordinator did not answer within {settings.first_reply_s:.0f} "
                               "s") from None
        loop = asyncio.get_running_loop()
        while True:
            timeout_s = settings.reply_timeout_s
            if self.deadline_at_s is not None:
                timeout_s = min(timeout_s, max(0.0, self.deadline_at_s - loop.time()))
            try:
                return await self.upstream._receive(self.conn, timeout_s)
            except asyncio.TimeoutError:
                pass
            if self.deadline_at_s is not None and loop.time() >= self.deadline_at_s:
                raise ApiError("deadline_exceeded", f"request {self.request_id}: no final reply within its "
                               f"deadline_s of {self.request.deadline_s} s")
            try:
                await self.upstream.health(settings.health_timeout_s)
            except ApiError:
                raise ApiError("upstream_timeout", f"request {self.request_id}: the coordinator sent nothing for "
                               f"{settings.reply_timeout_s:.0f} s and does not answer", status=504) from None
            log.info("request %s: nothing for %.0f s, but the coordinator answers: waiting on", self.request_id,
                     settings.reply_timeout_s)

    async def next(self, accepting: bool = False) -> TokenStreamed | GenerationDone | None:
        """The next token or the final reply (``accepting``: None once the request is accepted)."""
        assert self.conn is not None
        if self._early:
            return self._early.pop(0)
        while True:
            reply = await self._wait()
            rid = request_of(reply)
            if self.request_id is None:  # only our acceptance or refusal can come now
                if isinstance(reply, GenerationQueued):
                    self.request_id = reply.request_id
                    self.conn.serve(reply.request_id)
                    if accepting:
                        return None
                    continue
                if isinstance(reply, ErrorReported) and rid is None:
                    self.finished = True
                    raise ApiError(reply.code, reply.message)
            if rid != self.request_id and not (isinstance(reply, ErrorReported) and rid is None):
                log.warning("dropped a %s of request %s on the connection of request %s", type(reply).__name__,
                            rid, self.request_id)
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
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.finished:
            self.upstream._release(conn)
            self.upstream.generations -= 1
        elif isinstance(exc, ApiError) and exc.code == "unavailable" and self.request_id is None:
            conn.close()  # nothing came back at all: nothing to cancel
            self.upstream.generations -= 1
        else:  # the connection stays counted until the request's final reply (``_cancel``)
            log.info("request %s abandoned before its end: cancelling it", self.request_id)
            self.upstream.abandon(conn, self.request_id)
