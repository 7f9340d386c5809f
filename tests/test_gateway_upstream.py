"""The gateway's client of the coordinator against a fake coordinator (a ROUTER socket on loopback TCP, in a thread,
answering from a script): stale replies on a reused connection are never taken for the current request's; a
coordinator that accepts a request and then goes silent gives a 504 (whole response) or a final SSE error event
(stream) instead of a hang; a silent request whose coordinator still answers health checks waits on."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from fastapi.testclient import TestClient

from protocol.codec import decode, encode
from protocol.ids import RequestId
from protocol.messages import (
    ErrorReported,
    Generate,
    GenerationDone,
    GenerationQueued,
    GetHealth,
    HealthReported,
    Message,
    TokenStreamed,
)
from workers.gateway_app import GatewayApp, GatewaySettings
from workers.gateway_openai import ApiError
from workers.gateway_upstream import Upstream, UpstreamSettings

WAIT_S = 20.0
"""Generous bound on any one step (a shared, loaded machine)."""

Script = Callable[[Message], list[Message]]
"""The fake coordinator's answer to one request (its replies, in order; none: silence)."""


class FakeCoordinator:
    """A ROUTER socket that answers every request with ``script(request)``; records what it received."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.received: list[tuple[bytes, Message]] = []
        self.later: queue.Queue[tuple[bytes, Message]] = queue.Queue()
        """Replies the test asks for (``push``), sent by the socket's own thread."""
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fake-coordinator", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stopping.is_set():
            while not self.later.empty():
                identity, reply = self.later.get_nowait()
                self.sock.send_multipart([identity, encode(reply)])
            if not poller.poll(50):
                continue
            identity, frame = self.sock.recv_multipart()
            request = decode(frame)
            self.received.append((identity, request))
            for reply in self.script(request):
                self.sock.send_multipart([identity, encode(reply)])

    def push(self, identity: bytes, reply: Message) -> None:
        self.later.put((identity, reply))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def fake() -> Iterator[Callable[[Script], FakeCoordinator]]:
    made: list[FakeCoordinator] = []

    def start(script: Script) -> FakeCoordinator:
        made.append(FakeCoordinator(script))
        return made[-1]

    yield start
    for coordinator in made:
        coordinator.close()


def done(rid: int, *tokens: int) -> GenerationDone:
    return GenerationDone(request_id=RequestId(rid), token_ids=list(tokens), text="", finish_reason="length")


def token(rid: int, token_id: int) -> TokenStreamed:
    return TokenStreamed(request_id=RequestId(rid), index=0, token_id=token_id, text="x")


HEALTHY = HealthReported(workers={"inference": True}, queued=0, running=1, round_trip_us={})
GENERATE = Generate(prompt_ids=[1, 2, 3], max_new_tokens=1, stream=True)


async def test_stale_replies_on_a_reused_connection_are_dropped(fake):
    generates = 0

    def script(request: Message) -> list[Message]:
        nonlocal generates
        if isinstance(request, GetHealth):  # a stale reply of request 2 first: never this call's answer
            return [token(2, 99), HEALTHY]
        assert isinstance(request, Generate)
        generates += 1
        if generates == 1:
            return [GenerationQueued(request_id=RequestId(1), position=0), token(1, 5), done(1, 5)]
        # request 1's replies again (stale: as if from an earlier, cancelled request) before and after request 2's
        # acceptance, and one naming a request this connection never had
        return [done(1, 5), ErrorReported(code="cancelled", message="stale", request_id=RequestId(1)), token(1, 6),
                GenerationQueued(request_id=RequestId(2), position=0), token(1, 6), done(1, 6), token(7, 8),
                token(2, 7), done(2, 7)]

    coordinator = fake(script)
    upstream = Upstream(coordinator.address)
    try:
        for rid, expected in ((1, 5), (2, 7)):
            async with upstream.generation(GENERATE) as gen:
                assert await asyncio.wait_for(gen.accept(), WAIT_S) == rid
                first = await asyncio.wait_for(gen.next(), WAIT_S)
                assert isinstance(first, TokenStreamed) and (first.request_id, first.token_id) == (rid, expected)
                last = await asyncio.wait_for(gen.next(), WAIT_S)
                assert isinstance(last, GenerationDone) and (last.request_id, last.token_ids) == (rid, [expected])
            assert len(upstream.idle) == 1  # finished cleanly: the connection goes back to the pool
        identities = {identity for identity, _ in coordinator.received}
        assert len(identities) == 1, "the second request must have reused the first one's connection"
        report = await asyncio.wait_for(upstream.health(WAIT_S), WAIT_S)  # the same connection again
        assert report == HEALTHY
        assert {identity for identity, _ in coordinator.received} == identities
    finally:
        upstream.close()


def accept_then_silence(rid: int = 1, answer_health: bool = False) -> Script:
    def script(request: Message) -> list[Message]:
        if isinstance(request, GetHealth):
            return [HEALTHY] if answer_health else []
        if isinstance(request, Generate):
            return [GenerationQueued(request_id=RequestId(rid), position=0)]
        return []  # a cancel: no answer either

    return script


QUICK = UpstreamSettings(first_reply_s=WAIT_S, reply_timeout_s=0.3, health_timeout_s=0.3, cancel_settle_s=0.5)


async def test_a_coordinator_silent_after_accepting_ends_the_request_with_504(fake):
    upstream = Upstream(fake(accept_then_silence()).address, settings=QUICK)
    try:
        with pytest.raises(ApiError) as raised:
            async with upstream.generation(GENERATE) as gen:
                await asyncio.wait_for(gen.accept(), WAIT_S)
                await asyncio.wait_for(gen.next(), WAIT_S)  # without a limit of its own this would hang here
        assert (raised.value.status, raised.value.code) == (504, "upstream_timeout")
        # past its own deadline (and the grace) a request ends with 504 whatever the health checks say
        patient = UpstreamSettings(first_reply_s=WAIT_S, reply_timeout_s=3600.0, deadline_grace_s=0.2,
                                   cancel_settle_s=0.5)
        upstream.settings = patient
        with pytest.raises(ApiError) as raised:
            async with upstream.generation(Generate(prompt_ids=[1], max_new_tokens=1, stream=True,
                                                    deadline_s=0.2)) as gen:
                await asyncio.wait_for(gen.accept(), WAIT_S)
                await asyncio.wait_for(gen.next(), WAIT_S)
        assert (raised.value.status, raised.value.code) == (504, "deadline_exceeded")
    finally:
        upstream.close()


async def test_a_silent_request_of_a_coordinator_that_answers_health_waits_on(fake):
    healths = 0

    def script(request: Message) -> list[Message]:
        nonlocal healths
        if isinstance(request, GetHealth):
            healths += 1
            return [HEALTHY]
        return [GenerationQueued(request_id=RequestId(1), position=3)]

    coordinator = fake(script)
    upstream = Upstream(coordinator.address, settings=QUICK)
    try:
        async with upstream.generation(GENERATE) as gen:
            await asyncio.wait_for(gen.accept(), WAIT_S)
            waiting = asyncio.ensure_future(gen.next())
            loop = asyncio.get_running_loop()
            until_s = loop.time() + WAIT_S
            while healths < 2 and loop.time() < until_s:  # the wait goes on through health checks
                await asyncio.wait({waiting}, timeout=0.1)
            assert healths >= 2 and not waiting.done()
            identity = coordinator.received[0][0]
            coordinator.push(identity, done(1, 4))
            last = await asyncio.wait_for(waiting, WAIT_S)
            assert isinstance(last, GenerationDone) and last.token_ids == [4]
    finally:
        upstream.close()


def test_http_504_whole_and_a_final_error_event_streamed(fake):
    upstream = Upstream(fake(accept_then_silence()).address, settings=QUICK)
    app = GatewayApp(GatewaySettings(model="m"), upstream, tokenizer=None)
    try:
        with TestClient(app.api) as http:
            whole = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
            streamed = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "stream": True})
    finally:
        app.close()
        upstream.close()
    assert whole.status_code == 504, whole.text
    assert whole.json()["error"]["type"] == "timeout_error" and whole.json()["error"]["code"] == "upstream_timeout"
    assert streamed.status_code == 200  # accepted before the first byte: the error comes in the stream
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout"
