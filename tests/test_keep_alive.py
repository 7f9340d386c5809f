"""The inference worker's liveness inside long work: pings answered from the per-layer path (``KeepAlive``), and a
cancel that path took out of the inbox still found by the check between tokens."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from protocol.codec import decode
from protocol.config import RuntimeConfig
from protocol.ids import RequestId
from protocol.messages import CancelGeneration, ConfigureInference, Ping, PingAnswered
from shm.layout import ExpertLayout
from workers.bootstrap import KeepAlive, WorkerSockets, push_socket, send
from workers.inference import CancelCheck

LAYOUT = ExpertLayout(moe_layers=(0,), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                      storage_dtype="bfloat16", compute_dtype="float32", n_chunks=1, n_slots=2)


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[tuple[WorkerSockets, zmq.Socket, zmq.Socket]]:
    """The inference worker's sockets, a coordinator end that reads its answers, and a sender into its inbox."""
    cfg = RuntimeConfig(run_id=f"test_{uuid.uuid4().hex[:12]}", run_dir=str(tmp_path), checkpoint="", layout=LAYOUT,
                        policy="lru", device="cpu", bind="", link_gbps=None, lookahead=2, predictor_path=None,
                        load_timeout_s=5.0, supervisor_pid=0)
    coordinator = zmq.Context.instance().socket(zmq.PULL)
    coordinator.bind(cfg.endpoint("coordinator"))
    worker = WorkerSockets(cfg, "inference")
    to_worker = push_socket(zmq.Context.instance(), cfg.endpoint("inference"))
    try:
        yield worker, coordinator, to_worker
    finally:
        to_worker.close(linger=0)
        worker.close()
        coordinator.close(linger=0)


def answers(coordinator: zmq.Socket, timeout_ms: int) -> list[PingAnswered]:
    out = []
    while coordinator.poll(timeout_ms):
        msg = decode(coordinator.recv())
        assert isinstance(msg, PingAnswered)
        out.append(msg)
        timeout_ms = 50
    return out


def test_keep_alive_answers_pings_defers_the_rest_and_a_deferred_cancel_is_still_found(sockets) -> None:
    worker, coordinator, to_worker = sockets
    now_s = [100.0]
    keep_alive = KeepAlive(worker, interval_s=0.1, clock_s=lambda: now_s[0])
    configure = ConfigureInference(hidden_states=True, reordered_inference=True)
    for msg in (Ping(nonce=1, sent_ns=1), CancelGeneration(request_id=RequestId(7)), configure,
                CancelGeneration(request_id=RequestId(3)), Ping(nonce=2, sent_ns=2)):
        send(to_worker, msg)
    answered: list[PingAnswered] = []
    deadline = time.monotonic() + 5
    while len(answered) < 2 and time.monotonic() < deadline:  # ipc:// delivers asynchronously: look until all came
        worker.inbox.poller.poll(100)
        keep_alive()
        now_s[0] += 0.1
        answered += answers(coordinator, 20)
    assert [m.nonce for m in answered] == [1, 2]
    assert list(worker.inbox.deferred) == [CancelGeneration(request_id=RequestId(7)), configure,
                                           CancelGeneration(request_id=RequestId(3))]
    check = CancelCheck(RequestId(7), worker)
    assert check(torch.zeros((1, 3), dtype=torch.long), None).tolist() == [True]
    assert list(worker.inbox.deferred) == [configure], "the stale cancel (3) is dropped; the rest is kept in order"


def test_keep_alive_looks_at_the_inbox_at_most_every_interval(sockets) -> None:
    worker, coordinator, to_worker = sockets
    now_s = [0.0]
    keep_alive = KeepAlive(worker, interval_s=0.1, clock_s=lambda: now_s[0])
    keep_alive()  # looks (nothing there); the next look is due at 0.1 s of the clock
    send(to_worker, Ping(nonce=5, sent_ns=5))
    assert worker.inbox.poller.poll(5000), "the ping did not arrive"
    now_s[0] = 0.05
    keep_alive()
    assert answers(coordinator, 100) == [] and worker.inbox.poller.poll(0), "looked within the interval"
    now_s[0] = 0.1
    keep_alive()
    assert [m.nonce for m in answers(coordinator, 2000)] == [5]
