"""The coordinator process (``promoe::coordinator``): serves clients on a ZeroMQ ROUTER, queues their requests and
runs them one at a time on the inference worker, owns the cache directory and turns gate reports into loads.

It runs a uvloop event loop with zmq.asyncio. Every message it handles is one-way: nothing here is waited on by the
inference worker's hot path.

Split by role: what clients ask and how each request ends is ``coordinator/lifecycle.py``; what the workers report,
``coordinator/worker_events.py``; this file holds the sockets, the handler tables, the three loops and ``main``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from coordinator.auth import serve_curve
from coordinator.cache import CacheDirectory
from coordinator.configure import CacheConfigurator
from coordinator.host_dispatch import HostDispatch
from coordinator.lifecycle import RunningRequest
from coordinator.metrics import Totals
from coordinator.policies import make_policy
from coordinator.requests import RequestQueue, split_envelope
from coordinator.worker_events import WorkerEvents
from coordinator.worker_watch import WORKER_ROLES, WorkerWatch
from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode
from protocol.config import RuntimeConfig
from protocol.dispatch import Dispatcher
from protocol.ids import RequestId
from protocol.messages import (
    CancelGeneration,
    ConfigureCache,
    DescribeCache,
    DrainRequested,
    ErrorReported,
    ExpertComputed,
    ExpertLoaded,
    ExpertsPredicted,
    ExpertsReleased,
    GateDecided,
    Generate,
    GenerationFailed,
    GenerationFinished,
    GetHealth,
    GetStats,
    LoadsPreempted,
    OutlookPredicted,
    Ping,
    PingAnswered,
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


class Coordinator(WorkerEvents):
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
        self.host = HostDispatch(cfg.host_compute)
        self.queue = RequestQueue(cfg.max_queue, cfg.request_timeout_s, self.on_deadline, cfg.vocab_size)
        self.running: dict[RequestId, RunningRequest] = {}
        self._next_request_id = 1
        self._ping_nonce = 0
        self._retry: asyncio.TimerHandle | None = None
        self.watch = WorkerWatch(cfg.heartbeat_timeout_s)
        self.from_workers = Dispatcher("coordinator", {
            GateDecided: self.on_gate_decided,
            ExpertsPredicted: self.on_experts_predicted,
            OutlookPredicted: self.on_outlook_predicted,
            ExpertsReleased: self.on_experts_released,
            ExpertLoaded: self.on_expert_loaded,
            ExpertComputed: self.on_expert_computed,
            LoadsPreempted: self.on_loads_preempted,
            TokenStreamed: self.on_token_streamed,
            GenerationFinished: self.on_generation_finished,
            GenerationFailed: self.on_generation_failed,
            PingAnswered: self.on_ping_answered,
            WorkerDied: self.on_worker_died,
            WorkerRestarted: self.on_worker_restarted,
            DrainRequested: self.on_drain_requested,
        })
        self.draining = False
        self._drained_sent = False
        self.totals = Totals()
        self.started_s = 0.0
        self.from_clients = Dispatcher("coordinator (clients)", {
            Generate: self.on_generate, GetHealth: self.on_get_health, GetStats: self.on_get_stats,
            CancelGeneration: self.on_cancel_generation, ConfigureCache: self.on_configure_cache,
            DescribeCache: self.on_describe_cache},
            unexpected_level=logging.DEBUG)  # a client's mistake, answered, not the runtime's
        self.configurator = CacheConfigurator(cfg, self.cache, self.send_to, self._reply, self._start_next,
                                              self.host.set_mode)

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
                if exc.code == "bad_request":  # a value out of its declared range: refused as on admission
                    self.totals.requests_rejected += 1
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
        self.started_s = loop.time()
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
                 len(self.queue) + len(self.running))
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
    cfg.place("coordinator")
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
