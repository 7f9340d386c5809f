"""The coordinator process (``promoe::coordinator``): serves clients on a ZeroMQ ROUTER, queues their requests and
runs them one at a time on the inference worker, owns the cache directory and turns gate reports into loads.

It runs a uvloop event loop with zmq.asyncio. Every message it handles is one-way: nothing here is waited on by the
inference worker's hot path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from coordinator.cache import CacheCounters, CacheDirectory
from coordinator.policies import make_policy
from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode, dispatch, encode
from protocol.config import RuntimeConfig
from protocol.ids import RequestId
from protocol.messages import (
    ErrorReported,
    ExpertLoaded,
    ExpertsPredicted,
    ExpertsReleased,
    GateDecided,
    Generate,
    GenerationDone,
    GenerationFailed,
    GenerationFinished,
    GetHealth,
    HealthReported,
    LoadsPreempted,
    Message,
    Ping,
    PingAnswered,
    StartGeneration,
    TokenGenerated,
    TokenStreamed,
    WorkerStarted,
)
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers.bootstrap import become, now_ns, parse_run_dir, push_socket, send

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 4096
MAX_PROMPT_TOKENS = 16384
PING_INTERVAL_S = 1.0
WORKER_SILENT_AFTER_S = 3.0
WORKER_ROLES = ("inference", "predictor", "loader")
WAITING_RETRY_S = 0.002
"""While experts wait for a slot, how often the coordinator looks for one without being told."""


@dataclass
class PendingRequest:
    request_id: RequestId
    envelope: list[bytes]
    """ROUTER routing frames (identity, and the empty delimiter of a REQ client)."""
    request: Generate


@dataclass
class RunningRequest:
    pending: PendingRequest
    counters_at_start: CacheCounters
    messages: int = 0
    """ZeroMQ messages the coordinator sent or received for this request."""
    gate_latency_ns: list[int] = field(default_factory=list)


class Coordinator:
    def __init__(self, cfg: RuntimeConfig, table: SlotTable) -> None:
        self.cfg = cfg
        self.actx = zmq.asyncio.Context()
        self.ctx = zmq.Context()
        self.client_router = self.actx.socket(zmq.ROUTER)
        self.client_router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.client_router.setsockopt(zmq.LINGER, 0)
        self.client_router.bind(cfg.bind)
        self.recv_from_workers = self.actx.socket(zmq.PULL)
        self.recv_from_workers.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.recv_from_workers.setsockopt(zmq.LINGER, 0)
        self.recv_from_workers.bind(cfg.endpoint("coordinator"))
        self.send_to = {role: push_socket(self.ctx, cfg.endpoint(role)) for role in WORKER_ROLES}
        self.send_to_supervisor = push_socket(self.ctx, cfg.endpoint("supervisor"))
        self.cache = CacheDirectory(table, cfg.layout, make_policy(cfg.policy), cfg.early_preemption)
        self.queue: deque[PendingRequest] = deque()
        self.running: RunningRequest | None = None
        self._next_request_id = 1
        self._ping_nonce = 0
        self._retry: asyncio.TimerHandle | None = None
        self.last_answer: dict[str, float] = {}
        self.round_trip_ns: dict[str, deque[int]] = {role: deque(maxlen=64) for role in WORKER_ROLES}
        self.worker_handlers: dict[type[Message], Any] = {
            GateDecided: self.on_gate_decided,
            ExpertsPredicted: self.on_experts_predicted,
            ExpertsReleased: self.on_experts_released,
            ExpertLoaded: self.on_expert_loaded,
            LoadsPreempted: self.on_loads_preempted,
            TokenGenerated: self.on_token_generated,
            GenerationFinished: self.on_generation_finished,
            GenerationFailed: self.on_generation_failed,
            PingAnswered: self.on_ping_answered,
        }
        self.client_handlers: dict[type[Message], Any] = {Generate: self.on_generate, GetHealth: self.on_get_health}

    # ------------------------------------------------------------ worker events
    def _count(self) -> None:
        if self.running is not None:
            self.running.messages += 1

    def _send_to_loader(self) -> None:
        """Send what the cache directory decided, in order; keep retrying while experts wait for a slot."""
        for command in self.cache.drain():
            send(self.send_to["loader"], command)
            self._count()
        if self.cache.waiting and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(WAITING_RETRY_S, self.retry_waiting)

    def retry_waiting(self) -> None:
        """Safety net for a release whose ``ExpertsReleased`` was not sent (the flag and the pin crossed)."""
        self._retry = None
        self.cache.on_released()
        self._send_to_loader()

    def on_gate_decided(self, msg: GateDecided) -> None:
        if self.running is not None:
            self.running.gate_latency_ns.append(now_ns() - msg.sent_ns)
        self.cache.on_gate(msg.step, msg.layer, msg.experts)
        self._send_to_loader()

    def on_experts_predicted(self, msg: ExpertsPredicted) -> None:
        if self.running is not None and self.running.pending.request_id == msg.request_id:
            self.cache.on_predicted(msg.step, msg.layer, msg.experts)
            self._send_to_loader()

    def on_experts_released(self, msg: ExpertsReleased) -> None:
        self.cache.on_released()
        self._send_to_loader()

    def on_expert_loaded(self, msg: ExpertLoaded) -> None:
        self.cache.on_loaded(msg.load_id, msg.seq)
        self._send_to_loader()

    def on_loads_preempted(self, msg: LoadsPreempted) -> None:
        self.cache.on_preempted(msg.load_ids, msg.chunks_done)
        self._send_to_loader()

    def on_token_generated(self, msg: TokenGenerated) -> None:
        running = self.running
        if running is not None and running.pending.request.stream and running.pending.request_id == msg.request_id:
            self._reply(running.pending.envelope,
                        TokenStreamed(request_id=msg.request_id, index=msg.index, token_id=msg.token_id,
                                      text=msg.text))

    def on_generation_finished(self, msg: GenerationFinished) -> None:
        running = self._finish(msg.request_id)
        if running is None:
            return
        counters = self.cache.counters
        start = running.counters_at_start
        latencies = running.gate_latency_ns
        metrics: dict[str, float | int | None] = {
            "prompt_tokens": msg.prompt_tokens,
            "ttft_ms": msg.ttft_ms,
            "tpot_ms": msg.tpot_ms,
            "hit_rate": msg.expert_hits / msg.expert_uses if msg.expert_uses else None,
            "stall_ms": msg.stall_ms,
            "expert_uses": msg.expert_uses,
            "experts_loaded": counters.experts_loaded - start.experts_loaded,
            "bytes_loaded": counters.bytes_loaded - start.bytes_loaded,
            "wasted_bytes": counters.wasted_bytes - start.wasted_bytes,
            **prefetch_metrics(counters, start, enabled=self.cache.policy.prefetches),
            "zmq_messages": running.messages,
            "zmq_messages_per_token": running.messages / max(len(msg.token_ids), 1),
            "gate_message_latency_us_p50": statistics.median(latencies) / 1e3 if latencies else None,
        }
        self._reply(running.pending.envelope, GenerationDone(
            request_id=msg.request_id, token_ids=msg.token_ids, text=msg.text, finish_reason=msg.finish_reason,
            metrics=metrics))
        self._start_next()

    def on_generation_failed(self, msg: GenerationFailed) -> None:
        running = self._finish(msg.request_id)
        if running is None:
            return
        self.cache.forget_request()
        self._reply(running.pending.envelope, ErrorReported(code=msg.code, message=msg.message,
                                                            request_id=msg.request_id))
        self._start_next()

    def on_ping_answered(self, msg: PingAnswered) -> None:
        self.last_answer[msg.role] = asyncio.get_running_loop().time()
        if msg.role in self.round_trip_ns:
            self.round_trip_ns[msg.role].append(now_ns() - msg.sent_ns)

    def _finish(self, request_id: RequestId) -> RunningRequest | None:
        running = self.running
        if running is None or running.pending.request_id != request_id:
            log.error("result for request %d, which is not running", request_id)
            return None
        self.running = None
        return running

    # ------------------------------------------------------------ client requests
    def on_generate(self, envelope: list[bytes], msg: Generate) -> None:
        problem = validate_generate(msg)
        if problem is not None:
            self._reply(envelope, ErrorReported(code="bad_request", message=problem))
            return
        request_id = RequestId(self._next_request_id)
        self._next_request_id += 1
        self.queue.append(PendingRequest(request_id, envelope, msg))
        if self.running is None:
            self._start_next()

    def on_get_health(self, envelope: list[bytes], msg: GetHealth) -> None:
        now = asyncio.get_running_loop().time()
        self._reply(envelope, HealthReported(
            workers={r: now - self.last_answer.get(r, -math.inf) < WORKER_SILENT_AFTER_S for r in WORKER_ROLES},
            queued=len(self.queue),
            running=self.running.pending.request_id if self.running else None,
            round_trip_us={r: statistics.median(v) / 1e3 for r, v in self.round_trip_ns.items() if v},
        ))

    def _start_next(self) -> None:
        if self.running is not None or not self.queue:
            return
        pending = self.queue.popleft()
        req = pending.request
        self.running = RunningRequest(pending, CacheCounters(**vars(self.cache.counters)))
        self.cache.begin_request(pending.request_id)
        send(self.send_to["inference"], StartGeneration(
            request_id=pending.request_id, max_new_tokens=req.max_new_tokens, prompt=req.prompt,
            prompt_ids=req.prompt_ids, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            chat=req.chat))
        self._count()

    def _reply(self, envelope: list[bytes], msg: Message) -> None:
        try:
            self.client_router.send_multipart([*envelope, encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone: nothing to deliver to
            log.warning("could not reply %s to a client: %s", type(msg).__name__, exc)

    # ------------------------------------------------------------ loops
    async def serve_workers(self) -> None:
        while True:
            frame = await self.recv_from_workers.recv()
            try:
                msg = decode(frame)
                if not isinstance(msg, PingAnswered):
                    self._count()
                dispatch(self.worker_handlers, msg)
            except ProtocolError as exc:
                log.error("dropped a worker frame (%s): %s", exc.code, exc)

    async def serve_clients(self) -> None:
        while True:
            frames = await self.client_router.recv_multipart()
            envelope, payload = frames[:-1], frames[-1]
            try:
                msg = decode(payload)
                if type(msg) not in self.client_handlers:
                    raise ProtocolError("unexpected_type", f"{msg.TAG!r} is not a client request")
            except ProtocolError as exc:
                self._reply(envelope, ErrorReported(code=exc.code, message=str(exc)))
                continue
            self.client_handlers[type(msg)](envelope, msg)

    async def ping_workers(self) -> None:
        while True:
            self._ping_nonce += 1
            for role in WORKER_ROLES:
                send(self.send_to[role], Ping(nonce=self._ping_nonce, sent_ns=now_ns()))
            await asyncio.sleep(PING_INTERVAL_S)

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        send(self.send_to_supervisor, WorkerStarted(role="coordinator", pid=os.getpid()))
        log.info("serving clients on %s (policy %s, %d cache slots)", self.cfg.bind, self.cfg.policy,
                 self.cfg.layout.n_slots)
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(t) for t in (self.serve_workers(), self.serve_clients(), self.ping_workers())]
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for task in done:
            if task is not stopper and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        log.info("coordinator stopping (SIGTERM); %d queued request(s) dropped with the runtime", len(self.queue))

    def close(self) -> None:
        self.client_router.close(linger=0)
        self.recv_from_workers.close(linger=0)
        for sock in [*self.send_to.values(), self.send_to_supervisor]:
            sock.close(linger=0)
        self.actx.term()
        self.ctx.term()


def prefetch_metrics(now: CacheCounters, start: CacheCounters, enabled: bool) -> dict[str, float | None]:
    """Precision (= the paper's accuracy), recall, FetchRate and GoodPred = accuracy x FetchRate over one request.

    Without prefetching they are undefined (None), not zero.
    """
    if not enabled:
        return {"prefetch_precision": None, "prefetch_recall": None, "fetch_rate": None, "goodpred": None}
    predicted = now.predicted - start.predicted
    correct = now.predicted_chosen - start.predicted_chosen
    ready = now.predicted_ready - start.predicted_ready
    chosen = now.chosen - start.chosen
    precision = correct / predicted if predicted else None
    fetch_rate = ready / predicted if predicted else None
    return {
        "prefetch_precision": precision,
        "prefetch_recall": correct / chosen if chosen else None,
        "fetch_rate": fetch_rate,
        "goodpred": precision * fetch_rate if precision is not None and fetch_rate is not None else None,
    }


def validate_generate(msg: Generate) -> str | None:
    """Why the request is not acceptable, or None."""
    if (msg.prompt is None) == (msg.prompt_ids is None):
        return "give exactly one of prompt and prompt_ids"
    if msg.prompt_ids is not None and not 1 <= len(msg.prompt_ids) <= MAX_PROMPT_TOKENS:
        return f"prompt_ids must hold 1..{MAX_PROMPT_TOKENS} ids"
    if msg.prompt is not None and not msg.prompt:
        return "prompt is empty"
    if not 1 <= msg.max_new_tokens <= MAX_NEW_TOKENS:
        return f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {msg.max_new_tokens}"
    if not (math.isfinite(msg.temperature) and msg.temperature >= 0):
        return f"temperature must be a finite number >= 0, got {msg.temperature}"
    if not (math.isfinite(msg.top_p) and 0 < msg.top_p <= 1):
        return f"top_p must be in (0, 1], got {msg.top_p}"
    return None


def main(argv: list[str] | None = None) -> None:
    import uvloop

    cfg = parse_run_dir("coordinator", argv)
    become("coordinator", cfg.supervisor_pid)
    lay = cfg.layout
    table = SlotTable(Segment.attach(cfg.segment("table")), lay.n_slots, lay.n_experts, lay.n_chunks, init=False)
    coordinator = Coordinator(cfg, table)
    try:
        uvloop.run(coordinator.run())
    finally:
        coordinator.close()
        table.close()


if __name__ == "__main__":
    main()
