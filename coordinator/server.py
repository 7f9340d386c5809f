"""The coordinator process (``promoe::coordinator``): serves clients on a ZeroMQ ROUTER, queues their requests and
runs them one at a time on the inference worker, owns the cache directory and turns gate reports into loads.

It runs a uvloop event loop with zmq.asyncio. Every message it handles is one-way: nothing here is waited on by the
inference worker's hot path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio

from coordinator.auth import serve_curve
from coordinator.cache import CacheDirectory
from coordinator.configure import CacheConfigurator
from coordinator.metrics import Totals, cache_metrics
from coordinator.policies import make_policy
from coordinator.requests import PendingRequest, Rejected, RequestQueue, split_envelope
from coordinator.worker_watch import WORKER_ROLES, WorkerWatch
from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode, encode
from protocol.config import RuntimeConfig
from protocol.dispatch import Dispatcher
from protocol.ids import RequestId
from protocol.messages import (
    CancelGeneration,
    ConfigureCache,
    Drained,
    DrainRequested,
    ErrorReported,
    ExpertLoaded,
    ExpertsPredicted,
    ExpertsReleased,
    GateDecided,
    Generate,
    GenerationCancelled,
    GenerationDone,
    GenerationFailed,
    GenerationFinished,
    GenerationQueued,
    GenerationStarted,
    GetHealth,
    GetStats,
    HealthReported,
    LoadsPreempted,
    Message,
    Ping,
    PingAnswered,
    StartGeneration,
    StatsReported,
    TokenGenerated,
    TokenStreamed,
    WorkerDied,
    WorkerRestarted,
    WorkerSilent,
    WorkerStarted,
)
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers.bootstrap import become, now_ns, parse_run_dir, push_socket, send

log = logging.getLogger(__name__)

PING_INTERVAL_S = 1.0
CLIENT_SNDHWM = 100_000
"""Replies queued per client connection before the ROUTER refuses more (a token stream of a slow reader)."""
WAITING_RETRY_S = 0.002
"""While experts wait for a slot, how often the coordinator looks for one without being told."""


@dataclass
class RunningRequest:
    pending: PendingRequest
    started_s: float
    """Event-loop time when it was handed to the inference worker."""
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
        # A reply to a connection that is gone raises EHOSTUNREACH instead of vanishing: that is how a client that
        # left mid-request is noticed (and its request cancelled). A slow reader gets a deep queue, not drops.
        self.client_router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.client_router.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.authenticator = None
        if cfg.curve_keys_dir is not None:  # before bind: no connection is ever accepted without the key check
            self.authenticator = serve_curve(self.actx, self.client_router, Path(cfg.curve_keys_dir))
        self.client_router.bind(cfg.bind)
        self.recv_from_workers = self.actx.socket(zmq.PULL)
        self.recv_from_workers.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.recv_from_workers.setsockopt(zmq.LINGER, 0)
        self.recv_from_workers.bind(cfg.endpoint("coordinator"))
        self.send_to = {role: push_socket(self.ctx, cfg.endpoint(role)) for role in WORKER_ROLES}
        self.send_to_supervisor = push_socket(self.ctx, cfg.endpoint("supervisor"))
        self.cache = CacheDirectory(table, cfg.layout, make_policy(cfg.policy, cfg.layout), cfg.early_preemption)
        self.queue = RequestQueue(cfg.max_queue, cfg.request_timeout_s, self.on_deadline, cfg.vocab_size)
        self.running: RunningRequest | None = None
        self._next_request_id = 1
        self._ping_nonce = 0
        self._retry: asyncio.TimerHandle | None = None
        self.watch = WorkerWatch(cfg.heartbeat_timeout_s)
        self.from_workers = Dispatcher("coordinator", {
            GateDecided: self.on_gate_decided,
            ExpertsPredicted: self.on_experts_predicted,
            ExpertsReleased: self.on_experts_released,
            ExpertLoaded: self.on_expert_loaded,
            LoadsPreempted: self.on_loads_preempted,
            TokenGenerated: self.on_token_generated,
            GenerationFinished: self.on_generation_finished,
            GenerationFailed: self.on_generation_failed,
            PingAnswered: self.on_ping_answered,
            WorkerDied: self.on_worker_died,
            WorkerRestarted: self.on_worker_restarted,
            DrainRequested: self.on_drain_requested,
        })
        self.draining = False
        """Set by ``DrainRequested``: new requests are refused, accepted ones finish."""
        self._drained_sent = False
        self.totals = Totals()
        self.from_clients = Dispatcher("coordinator (clients)", {
            Generate: self.on_generate, GetHealth: self.on_get_health, GetStats: self.on_get_stats,
            CancelGeneration: self.on_cancel_generation, ConfigureCache: self.on_configure_cache},
            unexpected_level=logging.DEBUG)  # a client's mistake, answered, not the runtime's
        self.configurator = CacheConfigurator(cfg, self.cache, self.send_to, self._reply, self._start_next)

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
        self.configurator.try_apply()  # a configure_cache waits for the cache to settle

    def retry_waiting(self) -> None:
        """Safety net for a release whose ``ExpertsReleased`` was not sent (the flag and the pin crossed)."""
        self._retry = None
        self.cache.on_released()
        self._send_to_loader()

    def on_gate_decided(self, msg: GateDecided) -> None:
        """Only for the running request: a report still queued from a dead inference worker (or of a request that
        has ended) arrives after ``WorkerDied``, and must not pin the cache to loads for a request that is gone."""
        if self.running is None or self.running.pending.request_id != msg.request_id:
            log.debug("dropped a gate report of request %d, which is not running", msg.request_id)
            return
        self.running.gate_latency_ns.append(now_ns() - msg.sent_ns)
        self.cache.on_gate(msg.step, msg.layer, msg.experts, msg.ready_experts)
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
        if (running is not None and running.pending.request.stream and running.pending.request_id == msg.request_id
                and running.pending.abandoned is None):
            self._reply(running.pending.envelope,
                        TokenStreamed(request_id=msg.request_id, index=msg.index, token_id=msg.token_id,
                                      text=msg.text))

    def on_generation_finished(self, msg: GenerationFinished) -> None:
        running = self._finish(msg.request_id)
        if running is None:
            return
        counters = self.cache.request_counters
        self.cache.end_request()
        self._send_to_loader()
        wall_s = asyncio.get_running_loop().time() - running.started_s
        abandoned = running.pending.abandoned
        self.totals.add(msg, wall_s, abandoned)
        if abandoned is not None:  # cancelled, past its deadline, or its client left: stopped at a token boundary
            self._reply_abandoned(running.pending, f"stopped after {len(msg.token_ids)} token(s)")
            self._start_next()
            return
        latencies = running.gate_latency_ns
        metrics: dict[str, float | int | None] = {
            "prompt_tokens": msg.prompt_tokens,
            "ttft_ms": msg.ttft_ms,
            "tpot_ms": msg.tpot_ms,
            "hit_rate": msg.expert_hits / msg.expert_uses if msg.expert_uses else None,
            "stall_ms": msg.stall_ms,
            "expert_uses": msg.expert_uses,
            "wall_ms": wall_s * 1e3,
            **cache_metrics(counters, self.cache.policy.prefetches, wall_s, self.cfg.link_gbps),
            "cache_experts": self.configurator.settings.cache_experts,
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
        self.totals.requests_failed += 1
        self.cache.end_request()
        self.cache.forget_request()
        self._send_to_loader()
        if running.pending.abandoned != "peer_gone":
            self._reply(running.pending.envelope, ErrorReported(code=msg.code, message=msg.message,
                                                                request_id=msg.request_id))
        self._start_next()

    def on_ping_answered(self, msg: PingAnswered) -> None:
        self.watch.answered(msg.role, asyncio.get_running_loop().time(), now_ns() - msg.sent_ns)

    def on_worker_died(self, msg: WorkerDied) -> None:
        """From the supervisor, which is restarting it. A dead inference worker takes the running request with it:
        that client gets an error now; the queue waits for the restart. A dead loader's queue is re-issued when its
        successor reports ready; meanwhile the inference worker waits on the slot table as for any slow load."""
        log.error("%s (pid %d) died with exit code %d; the supervisor restarts it", msg.role, msg.pid, msg.exit_code)
        self.watch.died(msg.role)
        running = self.running
        if msg.role == "inference" and running is not None:
            self.running = None
            self.totals.requests_failed += 1
            self.cache.end_request()
            self.cache.forget_request()
            self._send_to_loader()
            message = (f"the inference worker died (exit code {msg.exit_code}) during this request; it is being "
                       "restarted, later requests will be served")
            self._reply(running.pending.envelope, ErrorReported(code="worker_died", message=message,
                                                                request_id=running.pending.request_id))
        self._report_if_drained()

    def on_worker_restarted(self, msg: WorkerRestarted) -> None:
        log.info("%s is back (pid %d)", msg.role, msg.pid)
        self.watch.restarted(msg.role, asyncio.get_running_loop().time())
        self.configurator.tell(msg.role)  # the settings in force, before anything else it serves
        if msg.role == "loader":
            self.cache.reissue_loads()
            self._send_to_loader()
        elif msg.role == "inference":
            self._start_next()

    def on_drain_requested(self, msg: DrainRequested) -> None:
        log.info("draining: %d running, %d queued; new requests are refused", self.running is not None,
                 len(self.queue))
        self.draining = True
        asyncio.get_running_loop().call_later(msg.timeout_s, self._drain_expired)
        self._report_if_drained()

    def _drain_expired(self) -> None:
        """The drain deadline passed: queued requests get ``shutting_down`` now; the running one is cancelled like
        any other (the worker stops at its next token) and ends through the usual path, answered ``shutting_down``
        when the worker reports it stopped. ``Drained`` follows once nothing runs."""
        if self._drained_sent:
            return
        log.warning("drain deadline passed: cancelling the running request, answering the queued ones with "
                    "shutting_down")
        self.answer_queued("shutting_down", "the runtime is stopping (drain deadline passed)")
        if self.running is not None and self.running.pending.abandoned is None:
            self._cancel_running("shutting_down")
        self._report_if_drained()

    def _report_if_drained(self) -> None:
        if self.draining and not self._drained_sent and self.running is None and not self.queue:
            self._drained_sent = True
            send(self.send_to_supervisor, Drained())

    def answer_all(self, code: str, message: str) -> None:
        """Answer the running request and every queued one with an error (none is left unanswered): only when the
        coordinator itself stops, so that nothing will report on the running request any more."""
        if self.running is not None:
            pending = self.running.pending
            self.running = None
            pending.disarm()
            self._reply(pending.envelope, ErrorReported(code=code, message=message, request_id=pending.request_id))
        self.answer_queued(code, message)

    def answer_queued(self, code: str, message: str) -> None:
        """Answer every queued request (and a pending ``configure_cache``) with an error and empty the queue."""
        self.configurator.cancel(code, message)
        held = list(self.queue)
        self.queue.clear()
        for pending in held:
            self._reply(pending.envelope, ErrorReported(code=code, message=message, request_id=pending.request_id))

    def _finish(self, request_id: RequestId) -> RunningRequest | None:
        running = self.running
        if running is None or running.pending.request_id != request_id:
            log.error("result for request %d, which is not running", request_id)
            return None
        self.running = None
        running.pending.disarm()
        return running

    # ------------------------------------------------------------ client requests
    def on_generate(self, envelope: list[bytes], msg: Generate) -> None:
        if self.draining:
            self._reply(envelope, ErrorReported(code="shutting_down", message="the runtime is stopping"))
            return
        try:
            pending = self.queue.admit(envelope, msg, RequestId(self._next_request_id))
        except Rejected as exc:
            self.totals.requests_rejected += 1
            self._reply(envelope, ErrorReported(code=exc.code, message=str(exc)))
            return
        self._next_request_id += 1
        ahead = len(self.queue) - 1 + (self.running is not None)
        self._reply(envelope, GenerationQueued(request_id=pending.request_id, position=ahead))
        if self.running is None:
            self._start_next()

    def on_cancel_generation(self, envelope: list[bytes], msg: CancelGeneration) -> None:
        """Only the connection that sent a request may cancel it; to any other it is unknown."""
        queued = self.queue.get(msg.request_id)
        running = self.running.pending if self.running is not None else None
        if queued is not None and queued.peer == envelope[0]:
            self.queue.remove(msg.request_id)
            self._reply(envelope, GenerationCancelled(request_id=msg.request_id))
            queued.abandoned = "cancelled"
            self.totals.count_abandoned("cancelled")
            self._reply_abandoned(queued, "cancelled while queued")
        elif running is not None and running.request_id == msg.request_id and running.peer == envelope[0] \
                and running.abandoned is None:
            self._cancel_running("cancelled")
            self._reply(envelope, GenerationCancelled(request_id=msg.request_id))
        else:
            self._reply(envelope, ErrorReported(
                code="unknown_request", request_id=msg.request_id,
                message=f"request {msg.request_id} is not queued or running for this connection"))

    def on_deadline(self, pending: PendingRequest) -> None:
        pending.timer = None
        if self.queue.remove(pending.request_id) is not None:
            pending.abandoned = "deadline_exceeded"
            self.totals.count_abandoned("deadline_exceeded")
            self._reply_abandoned(pending, "deadline passed while queued")
        elif self.running is not None and self.running.pending is pending and pending.abandoned is None:
            self._cancel_running("deadline_exceeded")

    def _cancel_running(self, code: str) -> None:
        """Tell the inference worker, one-way, to stop the running request at its next token boundary."""
        assert self.running is not None
        pending = self.running.pending
        pending.abandoned = code
        pending.disarm()
        send(self.send_to["inference"], CancelGeneration(request_id=pending.request_id))
        self._count()

    def _peer_gone(self, peer: bytes) -> None:
        """A client connection closed: drop its queued requests and stop its running one."""
        for pending in self.queue.of_peer(peer):
            self.queue.remove(pending.request_id)
            self.totals.count_abandoned("peer_gone")
        running = self.running.pending if self.running is not None else None
        if running is not None and running.peer == peer:
            if running.abandoned is None:
                self._cancel_running("peer_gone")
            running.abandoned = "peer_gone"
        log.info("a client left; its requests are dropped")

    def _reply_abandoned(self, pending: PendingRequest, detail: str) -> None:
        code = pending.abandoned
        if code is not None and code != "peer_gone":
            self._reply(pending.envelope, ErrorReported(code=code, message=f"request {pending.request_id}: {detail}",
                                                        request_id=pending.request_id))

    def on_configure_cache(self, envelope: list[bytes], msg: ConfigureCache) -> None:
        if self.draining:
            self._reply(envelope, ErrorReported(code="shutting_down", message="the runtime is stopping"))
            return
        busy = None
        if self.running is not None or self.queue:
            busy = f"{self.running is not None:d} request(s) running, {len(self.queue)} queued"
        self.configurator.request(envelope, msg, busy)

    def on_get_health(self, envelope: list[bytes], msg: GetHealth) -> None:
        now = asyncio.get_running_loop().time()
        self._reply(envelope, HealthReported(
            workers=self.watch.answering(now),
            queued=len(self.queue),
            running=self.running.pending.request_id if self.running else None,
            round_trip_us=self.watch.round_trip_us(),
            restarts=dict(self.watch.restarts),
            draining=self.draining,
        ))

    def on_get_stats(self, envelope: list[bytes], msg: GetStats) -> None:
        self._reply(envelope, StatsReported(totals=self.totals.report(
            self.cache.counters, self.cache.policy.prefetches, self.cfg.link_gbps)))

    def _start_next(self) -> None:
        pending = None
        while (pending is None and self.running is None and "inference" not in self.watch.down
               and self.configurator.pending is None):
            pending = self.queue.pop_next()
            if pending is None:
                break
            if not self._reply(pending.envelope, GenerationStarted(request_id=pending.request_id)):
                pending.disarm()  # nobody to answer: not worth running
                self.totals.count_abandoned("peer_gone")
                pending = None
        if pending is None:
            self._report_if_drained()
            return
        req = pending.request
        self.running = RunningRequest(pending, asyncio.get_running_loop().time())
        self.cache.begin_request(pending.request_id)
        send(self.send_to["inference"], StartGeneration(
            request_id=pending.request_id, max_new_tokens=req.max_new_tokens, prompt=req.prompt,
            prompt_ids=req.prompt_ids, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            chat=req.chat, stop_ids=req.stop_ids))
        self._count()

    def _reply(self, envelope: list[bytes], msg: Message) -> bool:
        """Send to a client; False if it could not be delivered (a client that is gone is forgotten)."""
        # zmq.asyncio resolves a NOBLOCK send at once: its future is done here, with the send's error if any.
        sent = cast("asyncio.Future[Any]",
                    self.client_router.send_multipart([*envelope, encode(msg)], flags=zmq.NOBLOCK))
        exc = sent.exception() if sent.done() else None
        if exc is None:
            return True
        if isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH:
            self._peer_gone(envelope[0])
        else:
            log.warning("could not reply %s to a client: %s", type(msg).__name__, exc)
        return False

    # ------------------------------------------------------------ loops
    async def serve_workers(self) -> None:
        while True:
            frame = await self.recv_from_workers.recv()
            try:
                msg = decode(frame)
                if not isinstance(msg, PingAnswered):
                    self._count()
                self.from_workers(msg)
            except ProtocolError as exc:
                log.error("dropped a worker frame (%s): %s", exc.code, exc)

    async def serve_clients(self) -> None:
        while True:
            frames = await self.client_router.recv_multipart()
            envelope, body = split_envelope(frames)
            try:
                if len(body) != 1:
                    raise ProtocolError("malformed", f"a request is one frame, got {len(body)}")
                msg = decode(body[0])
            except ProtocolError as exc:
                self._reply(envelope, ErrorReported(code=exc.code, message=str(exc)))
                continue
            if not self.from_clients(msg, envelope):
                self._reply(envelope, ErrorReported(code="unexpected_type",
                                                    message=f"{msg.TAG!r} is not a client request"))

    async def ping_workers(self) -> None:
        """Heartbeats: a ping a second to every worker; one silent for ``heartbeat_timeout_s`` (hung, stopped,
        deadlocked: alive for the pidfd but useless) is reported to the supervisor, which kills and restarts it."""
        loop = asyncio.get_running_loop()
        while True:
            self._ping_nonce += 1
            for role in WORKER_ROLES:
                send(self.send_to[role], Ping(nonce=self._ping_nonce, sent_ns=now_ns()))
            for role, silent_s in self.watch.newly_silent(loop.time()):
                log.error("%s answered no ping for %.0f s: asking the supervisor to restart it", role, silent_s)
                send(self.send_to_supervisor, WorkerSilent(role=role, silent_s=silent_s))
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
        log.info("coordinator stopping (SIGTERM); answering %d request(s) with shutting_down",
                 len(self.queue) + (self.running is not None))
        self.answer_all("shutting_down", "the runtime is stopping")

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
        self.client_router.close(linger=0)
        self.recv_from_workers.close(linger=0)
        for sock in [*self.send_to.values(), self.send_to_supervisor]:
            sock.close(linger=0)
        self.actx.term()
        self.ctx.term()


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
