"""The coordinator's worker side: what the inference worker, the predictor, the loader and the supervisor report
(gate decisions, predictions, releases, loads landed or preempted, tokens, results, pings, deaths and restarts)
and the loader commands the cache directory turns them into.

A base of ``Coordinator`` (``coordinator/server.py``); a request's own lifecycle is ``coordinator/lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import logging
import statistics

import numpy as np

from coordinator.lifecycle import RequestLifecycle
from coordinator.metrics import cache_metrics
from protocol.messages import (
    ErrorReported,
    ExpertComputed,
    ExpertLoaded,
    ExpertsPredicted,
    ExpertsReleased,
    GateDecided,
    GenerationDone,
    GenerationFailed,
    GenerationFinished,
    LoadsPreempted,
    OutlookPredicted,
    PingAnswered,
    TokenStreamed,
    WorkerDied,
    WorkerRestarted,
)
from workers.bootstrap import now_ns, send

log = logging.getLogger(__name__)

WAITING_RETRY_S = 0.002
"""While experts wait for a slot, how often the coordinator looks for one without being told."""


class WorkerEvents(RequestLifecycle):
    _retry: asyncio.TimerHandle | None

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
        """Only for running requests: a report still queued from a dead inference worker (or of a request that
        has ended) arrives after ``WorkerDied``, and must not pin the cache to loads for a request that is gone.

        With several running, the report keys the worker's batch by its first request (``msg.request_id``); a
        batch the worker began that the cache directory has not seen (the worker emptied its batch before a
        request the coordinator sent to join it arrived) begins the directory's request here."""
        served = [r for r in msg.request_ids or [msg.request_id] if r in self.running]
        if not served:
            log.debug("dropped a gate report of request %d, which is not running", msg.request_id)
            return
        if msg.request_id != self.cache.request_id:
            self.cache.begin_request(msg.request_id)
            self.host.begin_request(msg.request_id)
        self.cache.ledger.step_serves(served)
        for request_id in served:
            self.running[request_id].gate_latency_ns.append(now_ns() - msg.sent_ns)
        jobs = self.host.at_gate(self.cache, msg)
        for job in jobs:  # first: the host starts while the link copies
            send(self.send_to["loader"], job)
            self._count()
        self.cache.on_gate(msg.step, msg.layer, msg.experts, msg.ready_experts, host={job.expert for job in jobs})
        self._send_to_loader()

    def on_expert_computed(self, msg: ExpertComputed) -> None:
        self.host.on_computed(msg)

    def on_experts_predicted(self, msg: ExpertsPredicted) -> None:
        if self.running and self.cache.request_id == msg.request_id:
            self.totals.predictions_received += 1
            self.cache.on_predicted(msg.step, msg.layer, msg.experts, msg.probabilities)
            self._send_to_loader()

    def on_outlook_predicted(self, msg: OutlookPredicted) -> None:
        """The routing predictor's outlook of a layer one token on: ranks resident experts (loads nothing); only
        for the running request."""
        if self.running and self.cache.request_id == msg.request_id:
            self.totals.outlooks_received += 1
            self.cache.on_outlook(msg.step, msg.layer, np.asarray(msg.probabilities, dtype=np.float64))

    def on_experts_released(self, msg: ExpertsReleased) -> None:
        self.cache.on_released()
        self._send_to_loader()

    def on_expert_loaded(self, msg: ExpertLoaded) -> None:
        self.host.on_loaded(msg)
        self.cache.on_loaded(msg.load_id, msg.seq)
        self._send_to_loader()

    def on_loads_preempted(self, msg: LoadsPreempted) -> None:
        self.cache.on_preempted(msg.load_ids, msg.chunks_done)
        self._send_to_loader()

    def on_token_streamed(self, msg: TokenStreamed) -> None:
        """Forward the worker's token, the same message, to a client that asked for ``stream``."""
        running = self.running.get(msg.request_id)
        if running is not None and running.pending.request.stream and running.pending.abandoned is None:
            self._reply(running.pending.envelope, msg)

    def on_generation_finished(self, msg: GenerationFinished) -> None:
        running = self._finish(msg.request_id)
        if running is None:
            return
        counters = self.cache.ledger.take(msg.request_id)
        if not self.running:
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
            **self.host.metrics(msg.host_experts),
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
        self.cache.ledger.take(msg.request_id)
        if not self.running:  # the others of its batch go on, their pins held
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
        if msg.role == "inference" and self.running:
            lost, self.running = self.running, {}
            self.totals.requests_failed += len(lost)
            for request_id in lost:
                self.cache.ledger.take(request_id)
            self.cache.end_request()
            self.cache.forget_request()
            self._send_to_loader()
            message = (f"the inference worker died (exit code {msg.exit_code}) during this request; it is being "
                       "restarted, later requests will be served")
            for running in lost.values():
                running.pending.disarm()
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
            for job in self.host.unreported():  # the worker waits for these outputs: compute them again
                send(self.send_to["loader"], job)
                self._count()
        elif msg.role == "inference":
            self._start_next()
