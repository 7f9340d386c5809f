"""Start-up and shutdown shared by every process of the runtime (not a role of its own).

A process: names itself ``promoe::<role>``, dies with its supervisor (PDEATHSIG), leaves SIGINT to the
supervisor, turns SIGTERM into ``WorkerStopping`` so that ``finally`` blocks release sockets and mappings, and binds
its own ZeroMQ inbox.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
from types import FrameType

import zmq

from protocol.codec import MAX_MESSAGE_NBYTES, ProtocolError, decode, encode
from protocol.config import RuntimeConfig
from protocol.messages import Message

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


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
    """A PULL socket bound at this process's endpoint, plus PUSH sockets to peers, all with one codec."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)

    def poll(self, timeout_s: float) -> Message | None:
        """Next message within ``timeout_s`` (0: do not wait), or None. Undecodable frames are logged and dropped."""
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


def now_ns() -> int:
    """CLOCK_MONOTONIC is system-wide on Linux, so timestamps compare across processes."""
    return time.monotonic_ns()
