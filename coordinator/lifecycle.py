"""The coordinator's request lifecycle: what clients ask (generate, cancel, health, stats, configure_cache) and how
each request goes from the queue to running to exactly one final answer: started in arrival order, cancelled,
past its deadline, its client gone, failed, or answered ``shutting_down`` when the runtime drains (the
supervisor's ``DrainRequested``) or stops.

A base of ``Coordinator`` (``coordinator/server.py``), which owns the sockets and the state declared here;
``coordinator/worker_events.py`` handles what the workers report.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
import zmq.asyncio

from coordinator.cache import CacheDirectory
from coordinator.cache_view import describe_cache
from coordinator.configure import CacheConfigurator
from coordinator.host_dispatch import HostDispatch
from coordinator.metrics import Totals
from coordinator.requests import PendingRequest, Rejected, RequestQueue
from coordinator.worker_watch import WorkerWatch
from protocol.codec import encode
from protocol.config import RuntimeConfig
from protocol.ids import RequestId
from protocol.messages import (
    CancelGeneration,
    ConfigureCache,
    DescribeCache,
    Drained,
    DrainRequested,
    ErrorReported,
    Generate,
    GenerationCancelled,
    GenerationQueued,
    GenerationStarted,
    GetHealth,
    GetStats,
    HealthReported,
    Message,
    StartGeneration,
    StatsReported,
)
from workers.bootstrap import send

log = logging.getLogger(__name__)


@dataclass
class RunningRequest:
    pending: PendingRequest
    started_s: float
    """Event-loop time when it was handed to the inference worker."""
    messages: float = 0
    """ZeroMQ messages the coordinator sent or received for this request (with several running: its share)."""
    gate_latency_ns: list[int] = field(default_factory=list)


class RequestLifecycle:
    cfg: RuntimeConfig
    client_router: zmq.asyncio.Socket
    send_to: dict[str, zmq.Socket]
    send_to_supervisor: zmq.Socket
    cache: CacheDirectory
    host: HostDispatch
    """``--host-compute``: the cost model and the gates' host jobs."""
    queue: RequestQueue
    running: dict[RequestId, RunningRequest]
    """Requests on the inference worker, in the order they started (at most ``cfg.max_batch``)."""
    watch: WorkerWatch
    configurator: CacheConfigurator
    totals: Totals
    draining: bool
    """Set by ``DrainRequested``: new requests are refused, accepted ones finish."""
    _drained_sent: bool
    _next_request_id: int
    started_s: float
    """Event-loop time when the coordinator began serving."""

    def _count(self) -> None:
        """One more ZeroMQ message sent or received for the running requests (their ``zmq_messages`` metric), shared
        among them."""
        if len(self.running) == 1:
            next(iter(self.running.values())).messages += 1
        else:
            for running in self.running.values():
                running.messages += 1 / len(self.running)

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
        ahead = len(self.queue) - 1 + len(self.running)
        self._reply(envelope, GenerationQueued(request_id=pending.request_id, position=ahead))
        if len(self.running) < self.cfg.max_batch:
            self._start_next()

    def on_cancel_generation(self, envelope: list[bytes], msg: CancelGeneration) -> None:
        """Only the connection that sent a request may cancel it; to any other it is unknown."""
        queued = self.queue.get(msg.request_id)
        running = self.running[msg.request_id].pending if msg.request_id in self.running else None
        if queued is not None and queued.peer == envelope[0]:
            self.queue.remove(msg.request_id)
            self._reply(envelope, GenerationCancelled(request_id=msg.request_id))
            queued.abandoned = "cancelled"
            self.totals.count_abandoned("cancelled")
            self._reply_abandoned(queued, "cancelled while queued")
        elif running is not None and running.peer == envelope[0] and running.abandoned is None:
            self._cancel_running(running, "cancelled")
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
        elif pending.request_id in self.running and pending.abandoned is None:
            self._cancel_running(pending, "deadline_exceeded")

    def _cancel_running(self, pending: PendingRequest, code: str) -> None:
        """Tell the inference worker, one-way, to stop the running request at its next token boundary."""
        pending.abandoned = code
        pending.disarm()
        send(self.send_to["inference"], CancelGeneration(request_id=pending.request_id))
        self._count()

    def _peer_gone(self, peer: bytes) -> None:
        """A client connection closed: drop its queued requests and stop its running one."""
        for pending in self.queue.of_peer(peer):
            self.queue.remove(pending.request_id)
            self.totals.count_abandoned("peer_gone")
        for running in [r.pending for r in self.running.values() if r.pending.peer == peer]:
            if running.abandoned is None:
                self._cancel_running(running, "peer_gone")
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
        if self.running or self.queue:
            busy = f"{len(self.running)} request(s) running, {len(self.queue)} queued"
        self.configurator.request(envelope, msg, busy)

    def on_get_health(self, envelope: list[bytes], msg: GetHealth) -> None:
        now = asyncio.get_running_loop().time()
        self._reply(envelope, HealthReported(
            workers=self.watch.answering(now),
            queued=len(self.queue),
            running=next(iter(self.running), None),
            round_trip_us=self.watch.round_trip_us(),
            restarts=dict(self.watch.restarts),
            draining=self.draining,
        ))

    def on_get_stats(self, envelope: list[bytes], msg: GetStats) -> None:
        self._reply(envelope, StatsReported(totals=self.totals.report(
            self.cache.counters, self.cache.policy.prefetches, self.cfg.link_gbps)))

    def on_describe_cache(self, envelope: list[bytes], msg: DescribeCache) -> None:
        """The live view's snapshot, built now (nothing is kept for it between requests)."""
        now = asyncio.get_running_loop().time()
        running = next(iter(self.running.values()), None)  # the oldest of a batch
        self._reply(envelope, describe_cache(
            self.cache, self.totals, self.cfg.link_gbps, running.pending.request_id if running else None,
            now - running.started_s if running else 0.0, now - self.started_s))

    def _start_next(self) -> None:
        """Start queued requests while fewer than ``max_batch`` run. The first of a batch (nothing running) begins
        the cache directory's request: its id keys the batch's gate reports and predictions."""
        while (len(self.running) < self.cfg.max_batch and "inference" not in self.watch.down
               and self.configurator.pending is None):
            pending = self.queue.pop_next()
            if pending is None:
                break
            if not self._reply(pending.envelope, GenerationStarted(request_id=pending.request_id)):
                pending.disarm()  # nobody to answer: not worth running
                self.totals.count_abandoned("peer_gone")
                continue
            req = pending.request
            if not self.running:
                self.cache.begin_request(pending.request_id)
                self.host.begin_request(pending.request_id)
            self.running[pending.request_id] = RunningRequest(pending, asyncio.get_running_loop().time())
            self.cache.ledger.join(pending.request_id)
            send(self.send_to["inference"], StartGeneration(
                request_id=pending.request_id, params=req.sampling_params(), prompt=req.prompt,
                prompt_ids=req.prompt_ids, chat=req.chat))
            self._count()
        self._report_if_drained()

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

    # ------------------------------------------------------------ draining, stopping, ending
    def on_drain_requested(self, msg: DrainRequested) -> None:
        log.info("draining: %d running, %d queued; new requests are refused", len(self.running),
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
        for running in self.running.values():
            if running.pending.abandoned is None:
                self._cancel_running(running.pending, "shutting_down")
        self._report_if_drained()

    def _report_if_drained(self) -> None:
        if self.draining and not self._drained_sent and not self.running and not self.queue:
            self._drained_sent = True
            send(self.send_to_supervisor, Drained())

    def answer_all(self, code: str, message: str) -> None:
        """Answer the running request and every queued one with an error (none is left unanswered): only when the
        coordinator itself stops, so that nothing will report on the running request any more."""
        running, self.running = self.running, {}
        for pending in [r.pending for r in running.values()]:
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
        running = self.running.pop(request_id, None)
        if running is None:
            log.error("result for request %d, which is not running", request_id)
            return None
        running.pending.disarm()
        return running
