"""Start-up and shutdown shared by every process of the runtime (not a role of its own).

A process: names itself ``promoe::<role>``, dies with its supervisor (PDEATHSIG), leaves SIGINT to the
supervisor, turns SIGTERM into ``WorkerStopping`` so that ``finally`` blocks release sockets and mappings, and binds
its own ZeroMQ inbox.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType

import zmq

from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode, encode
from protocol.config import RuntimeConfig
from protocol.dispatch import Dispatcher, Handler
from protocol.messages import Message, Ping, PingAnswered, WorkerStarted

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
IDLE_POLL_S = 0.2
"""How long a worker blocks on its inbox before checking again (signals interrupt the wait anyway)."""
KEEP_ALIVE_INTERVAL_S = 0.1
"""Inside long work, how often a worker looks for pings to answer (pings come every second)."""


class WorkerStopping(BaseException):
    """Raised in the main thread on SIGTERM: unwind and exit cleanly."""


class WorkerDead(RuntimeError):
    """A process of the runtime died or stopped answering (fatal for the runtime)."""


def configure_logging(role: str) -> None:
    level = os.environ.get("PROMOE_LOG", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def become(role: str, supervisor_pid: int | None) -> None:
    """Take the process title and the signal dispositions of a worker."""
    import setproctitle

    setproctitle.setproctitle(f"promoe::{role}")
    configure_logging(role)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: cleanup must not be interrupted again
        raise WorkerStopping(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if supervisor_pid is not None and os.getppid() != supervisor_pid:
        raise WorkerStopping(f"supervisor {supervisor_pid} is already gone")


def parse_run_dir(role: str, argv: list[str] | None = None) -> RuntimeConfig:
    parser = argparse.ArgumentParser(prog=f"python -m workers.{role}", description=f"The promoe {role} process.")
    parser.add_argument("--run-dir", required=True, help="run directory written by launch.py (runtime.json)")
    args = parser.parse_args(argv)
    return RuntimeConfig.read(args.run_dir)


class Inbox:
    """The PULL socket bound at this process's endpoint; every frame goes through the one codec."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.deferred: deque[Message] = deque()
        """Messages taken out early (by a check between tokens) that are not for that check: served first."""

    def defer(self, message: Message) -> None:
        self.deferred.append(message)

    def take_deferred(self, kind: type[Message]) -> list[Message]:
        """Remove and return the deferred messages of type ``kind`` (the others keep their order)."""
        taken = [m for m in self.deferred if isinstance(m, kind)]
        if taken:
            kept = [m for m in self.deferred if not isinstance(m, kind)]
            self.deferred.clear()
            self.deferred.extend(kept)
        return taken

    def poll(self, timeout_s: float) -> Message | None:
        """Next message within ``timeout_s`` (0: do not wait), or None. Undecodable frames are logged and dropped."""
        if self.deferred:
            return self.deferred.popleft()
        return self.receive(timeout_s)

    def receive(self, timeout_s: float) -> Message | None:
        """Like ``poll`` but straight from the socket, past anything deferred."""
        while self.poller.poll(int(timeout_s * 1000)):
            frame = self.socket.recv(zmq.NOBLOCK)
            try:
                return decode(frame)
            except ProtocolError as exc:
                log.error("dropped an undecodable frame (%s): %s", exc.code, exc)
                timeout_s = 0
        return None

    def close(self) -> None:
        self.socket.close(linger=0)


def push_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket, message: Message) -> None:
    """One-way send; never blocks (a full queue to a dead peer is the supervisor's business)."""
    try:
        sock.send(encode(message), zmq.NOBLOCK)
    except zmq.Again:
        log.error("dropped %s: peer queue full", type(message).__name__)


class WorkerSockets:
    """The sockets of a worker: its inbox, and one-way PUSH sockets to the coordinator and to the supervisor."""

    def __init__(self, cfg: RuntimeConfig, role: str) -> None:
        self.role = role
        self.ctx = zmq.Context()
        self.inbox = Inbox(self.ctx, cfg.endpoint(role))
        self.send_to_coordinator = push_socket(self.ctx, cfg.endpoint("coordinator"))
        self.send_to_supervisor = push_socket(self.ctx, cfg.endpoint("supervisor"))

    def announce_ready(self) -> None:
        send(self.send_to_supervisor, WorkerStarted(role=self.role, pid=os.getpid()))

    def answer_ping(self, msg: Ping) -> None:
        send(self.send_to_coordinator, PingAnswered(role=self.role, nonce=msg.nonce, sent_ns=msg.sent_ns))

    def answer_pings(self) -> None:
        """Take everything the socket holds without waiting: answer the pings, defer the rest (the serve loop
        handles it later, in order). Safe from inside a handler (the same thread)."""
        while (msg := self.inbox.receive(0)) is not None:
            if isinstance(msg, Ping):
                self.answer_ping(msg)
            else:
                self.inbox.defer(msg)

    def serve(self, handlers: Mapping[type[Message], Handler]) -> None:
        """Handle inbox messages one at a time, forever (until ``WorkerStopping``)."""
        dispatch = Dispatcher(self.role, handlers)
        while True:
            msg = self.inbox.poll(IDLE_POLL_S)
            if msg is not None:
                dispatch(msg)

    def close(self) -> None:
        self.inbox.close()
        self.send_to_coordinator.close(linger=0)
        self.send_to_supervisor.close(linger=0)
        self.ctx.term()


class KeepAlive:
    """Answers pings from inside long work (the inference worker's per-layer path), so that liveness does not
    depend on how long a request is: called as often as convenient, it looks at the inbox at most every
    ``interval_s`` (otherwise it costs one clock read)."""

    def __init__(self, sockets: WorkerSockets, interval_s: float = KEEP_ALIVE_INTERVAL_S,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.sockets = sockets
        self.interval_s = interval_s
        self.clock_s = clock_s
        self._next_s = -math.inf

    def __call__(self) -> None:
        now_s = self.clock_s()
        if now_s >= self._next_s:
            self._next_s = now_s + self.interval_s
            self.sockets.answer_pings()


def run_worker(role: str, argv: list[str] | None, body: Callable[[RuntimeConfig, WorkerSockets], None]) -> None:
    """The ``main`` of every worker: become ``promoe::<role>``, run ``body`` until SIGTERM, release the sockets."""
    cfg = parse_run_dir(role, argv)
    become(role, cfg.supervisor_pid)
    cfg.place(role)
    sockets = WorkerSockets(cfg, role)
    try:
        body(cfg, sockets)
    except WorkerStopping as stop:
        log.info("%s stopping (%s)", role, stop)
    finally:
        sockets.close()


def now_ns() -> int:
    """CLOCK_MONOTONIC is system-wide on Linux, so timestamps compare across processes."""
    return time.monotonic_ns()
