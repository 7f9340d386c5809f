"""Serving under load: stop ids, the bounded queue (``busy``), deadlines, cancel, and clients that vanish."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from coordinator.client import PromoeClient, RequestFailed
from coordinator.requests import PendingRequest, Rejected, RequestQueue
from coordinator.runtime_process import PROJECT_ROOT
from protocol.codec import encode
from protocol.ids import RequestId
from protocol.messages import (
    CancelGeneration,
    ErrorReported,
    Generate,
    GenerationCancelled,
    GenerationDone,
    GenerationQueued,
    Message,
    TokenStreamed,
)
from tests.conftest import MAX_QUEUE, NEW_TOKENS, PROMPT_IDS

LONG = 3000
"""max_new_tokens of a request that would run for minutes here: only cancellation ends it in a test's time."""


def send(client: PromoeClient, msg: Message) -> None:
    client.socket.send(encode(msg))


def receive_until(client: PromoeClient, done: Callable[[Message], bool], timeout_s: float = 60) -> list[Message]:
    """Every reply up to and including the first for which ``done`` is true."""
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while not replies or not done(replies[-1]):
        replies.append(client.receive(timeout_s=max(deadline - time.monotonic(), 0.01)))
    return replies


def start_long(client: PromoeClient) -> RequestId:
    """Send a long streaming request and wait until its first token arrives (it is running)."""
    send(client, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=LONG, stream=True))
    replies = receive_until(client, lambda r: isinstance(r, TokenStreamed))
    assert isinstance(replies[0], GenerationQueued), replies
    return replies[0].request_id


def is_final(request_id: RequestId) -> Callable[[Message], bool]:
    return lambda r: isinstance(r, (GenerationDone, ErrorReported)) and r.request_id == request_id


def test_generation_stops_at_a_stop_id_with_the_reference_tokens(serving, reference):
    ref = reference["ids"]
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])  # the first stop hit is at index k
    with serving.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS, stop_ids=[ref[k], 256])
        full = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
    assert done.token_ids == ref[:k + 1]
    assert done.finish_reason == "stop"
    assert full.token_ids == ref and full.finish_reason == "length"


def test_queue_bound_busy_cancel_frees_the_place_and_running_cancel_stops_at_a_token(serving, reference):
    with serving.client() as client:
        running = start_long(client)
        queued = []
        for _ in range(MAX_QUEUE):
            send(client, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=2))
            (reply,) = receive_until(client, lambda r: isinstance(r, GenerationQueued))
            queued.append(reply.request_id)
        assert reply.position == MAX_QUEUE  # the running one and the first queued are ahead
        asked = time.monotonic()
        send(client, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=2))
        busy = receive_until(client, lambda r: isinstance(r, ErrorReported))[-1]
        assert busy.code == "busy" and "--max-queue 2" in busy.message
        assert time.monotonic() - asked < 5  # answered at once, not after the running request

        send(client, CancelGeneration(request_id=queued[0]))
        replies = receive_until(client, is_final(queued[0]))
        assert [type(r) for r in replies if not isinstance(r, TokenStreamed)] == [GenerationCancelled, ErrorReported]
        assert replies[-1].code == "cancelled"
        send(client, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=2))  # its place is free again
        replies = receive_until(client, lambda r: isinstance(r, (GenerationQueued, ErrorReported)))
        assert isinstance(replies[-1], GenerationQueued), replies[-1]
        queued[0] = replies[-1].request_id

        with serving.client() as other:  # a request is cancelled only through the connection that sent it
            send(other, CancelGeneration(request_id=running))
            refused = other.receive(timeout_s=30)
        assert isinstance(refused, ErrorReported) and refused.code == "unknown_request"

        send(client, CancelGeneration(request_id=running))
        cancelled_at = time.monotonic()
        replies = receive_until(client, is_final(running))
        stopped_s = time.monotonic() - cancelled_at
        assert replies[-1].code == "cancelled"
        assert any(isinstance(r, GenerationCancelled) for r in replies)
        assert stopped_s < 10, f"the running request took {stopped_s:.1f} s to stop"
        streamed = [r for r in replies if isinstance(r, TokenStreamed)]
        assert len(streamed) < 200  # stopped at a token boundary soon after, not run to its 3000 tokens
        finals = receive_until(client, lambda r: isinstance(r, GenerationDone) and r.request_id == queued[0])
        assert [r.request_id for r in finals if isinstance(r, GenerationDone)] == [queued[1], queued[0]]
        assert all(not isinstance(r, TokenStreamed) or r.request_id != running for r in finals)
        after = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        stats = client.stats()
    assert after.token_ids == reference["ids"]  # the worker is intact after a cancel mid-generation
    assert stats["requests_cancelled"] >= 2 and stats["requests_rejected"] >= 1


def test_deadlines_end_queued_requests_at_once_and_running_ones_at_a_token(serving):
    with serving.client() as client:
        sent = time.monotonic()
        send(client, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=LONG, deadline_s=3.0, stream=True))
        (queued,) = receive_until(client, lambda r: isinstance(r, GenerationQueued))
        send(client, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=2, deadline_s=0.5))
        waiting = receive_until(client, lambda r: isinstance(r, GenerationQueued))[-1]
        expired = receive_until(client, is_final(waiting.request_id))[-1]
        assert expired.code == "deadline_exceeded"
        assert time.monotonic() - sent < 2.5  # while the first one still runs
        final = receive_until(client, is_final(queued.request_id))[-1]
        elapsed_s = time.monotonic() - sent
    assert final.code == "deadline_exceeded"
    assert 3.0 <= elapsed_s < 10, elapsed_s


def test_a_client_that_vanishes_mid_stream_costs_nothing(serving, reference):
    gone = serving.client()
    with serving.client() as bystander:
        start_long(gone)
        send(bystander, Generate(prompt_ids=PROMPT_IDS, max_new_tokens=2))  # queued behind the long one...
        receive_until(bystander, lambda r: isinstance(r, GenerationQueued))
        bystander.close()  # ...and its client leaves too: it must not run at all
    left_at = time.monotonic()
    gone.close()
    with serving.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        served_s = time.monotonic() - left_at
        stats = client.stats()
    assert done.token_ids == reference["ids"]
    would_run_s = LONG * done.metrics["tpot_ms"] / 1e3
    assert served_s < min(30, would_run_s / 4), f"the next client waited {served_s:.1f} s (long: {would_run_s:.0f} s)"
    assert stats["requests_peer_gone"] >= 2


async def test_request_queue_bound_deadlines_and_removal():
    expired: list[PendingRequest] = []
    queue = RequestQueue(max_queued=2, default_timeout_s=0.2, on_deadline=expired.append, vocab_size=100)
    generate = Generate(prompt_ids=[1, 2], max_new_tokens=2)
    assert queue.timeout_s(generate) == 0.2
    assert queue.timeout_s(Generate(prompt_ids=[1], deadline_s=0.05)) == 0.05
    assert queue.timeout_s(Generate(prompt_ids=[1], deadline_s=9.0)) == 0.2  # the server's default caps it
    a = queue.admit([b"peer-a"], generate, RequestId(1))
    b = queue.admit([b"peer-b"], Generate(prompt_ids=[1], deadline_s=0.05), RequestId(2))
    with pytest.raises(Rejected) as busy:
        queue.admit([b"peer-a"], generate, RequestId(3))
    assert busy.value.code == "busy"
    for bad, code in ((Generate(prompt_ids=[100]), "bad_token_ids"), (Generate(prompt_ids=[1], stop_ids=[-1]),
                      "bad_token_ids"), (Generate(prompt_ids=[1], deadline_s=0.0), "bad_request"),
                      (Generate(prompt_ids=[1], temperature=1e9), "bad_request")):
        with pytest.raises(Rejected) as info:
            RequestQueue(8, None, expired.append, vocab_size=100).admit([b"x"], bad, RequestId(9))
        assert info.value.code == code
    assert queue.of_peer(b"peer-a") == [a]
    timer_a = a.timer
    assert timer_a is not None and not timer_a.cancelled()
    assert queue.remove(RequestId(1)) is a and a.timer is None
    assert timer_a.cancelled()  # the removed request's deadline is disarmed: the loop will never run it
    assert len(queue) == 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not expired:  # b's own deadline (0.05 s) fires through the loop
        assert loop.time() < deadline, "b's deadline never fired"
        await asyncio.sleep(0.01)
    assert expired == [b]
    assert queue.pop_next() is b and queue.pop_next() is None


def test_client_generate_raises_on_cancel(serving):
    with serving.client() as client:
        def cancel(queued: GenerationQueued) -> None:
            client.send_cancel(queued.request_id)

        with pytest.raises(RequestFailed) as info:
            client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=LONG, on_queued=cancel)
    assert info.value.code == "cancelled"


def test_load_bench_answers_every_request(serving):
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "load.py"), "--connect", serving.address,
                           "--clients", "4", "--requests", "2", "--max-new-tokens", "2", "--timeout-s", "120"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["answered"] == result["requests"] == 8
    # 4 clients, 1 running + at most 3 queued > --max-queue 2: some may be refused with busy, none dropped
    assert result["completed"] + result["errors"].get("busy", 0) == 8 and result["dropped"] == 0
    assert result["latency_p50_s"] > 0 and result["tokens_per_s"] > 0


def test_serving_flags_reach_the_runtime_config(tmp_path, checkpoint):
    from launch import build_parser, check_serving_flags, make_config

    args = build_parser().parse_args(["--model-path", str(checkpoint), "--max-queue", "3",
                                      "--request-timeout-s", "7.5"])
    cfg = make_config(args, tmp_path, one_shot=False)
    assert (cfg.max_queue, cfg.request_timeout_s, cfg.vocab_size, cfg.curve_keys_dir) == (3, 7.5, 257, None)
    for flags, problem in ((["--max-queue", "-1"], "--max-queue must be >= 0"),
                           (["--request-timeout-s", "0"], "--request-timeout-s must be > 0")):
        assert problem in (check_serving_flags(build_parser().parse_args(flags), "tcp://127.0.0.1:1") or "")
    assert check_serving_flags(build_parser().parse_args(["--insecure"]), "tcp://0.0.0.0:1") is None
