"""The predictor worker process (``promoe::predictor``).

For now it starts, answers pings and stops: prediction (hidden states in from shared memory, expert scores out as
hints to the coordinator) lands here with the proactive-caching issue.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import zmq

from protocol.codec import dispatch
from protocol.config import RuntimeConfig
from protocol.messages import Message, Ping, PingAnswered, WorkerStarted
from workers.bootstrap import Inbox, WorkerStopping, become, parse_run_dir, push_socket, send

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2


class Predictor:
    def __init__(self, cfg: RuntimeConfig, inbox: Inbox, send_to_coordinator: zmq.Socket) -> None:
        self.cfg = cfg
        self.inbox = inbox
        self.send_to_coordinator = send_to_coordinator
        self.handlers: dict[type[Message], Any] = {Ping: self.on_ping}

    def on_ping(self, msg: Ping) -> None:
        send(self.send_to_coordinator, PingAnswered(role="predictor", nonce=msg.nonce, sent_ns=msg.sent_ns))

    def serve(self) -> None:
        while True:
            msg = self.inbox.poll(IDLE_POLL_S)
            if msg is not None:
                dispatch(self.handlers, msg)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_run_dir("predictor", argv)
    become("predictor", cfg.supervisor_pid)
    ctx = zmq.Context()
    inbox = Inbox(ctx, cfg.endpoint("predictor"))
    send_to_coordinator = push_socket(ctx, cfg.endpoint("coordinator"))
    send_to_supervisor = push_socket(ctx, cfg.endpoint("supervisor"))
    try:
        if cfg.predictor_path is None:
            log.info("no trained predictor given; prediction is not implemented yet, nothing is prefetched")
        send(send_to_supervisor, WorkerStarted(role="predictor", pid=os.getpid()))
        Predictor(cfg, inbox, send_to_coordinator).serve()
    except WorkerStopping as stop:
        log.info("predictor stopping (%s)", stop)
    finally:
        inbox.close()
        send_to_coordinator.close(linger=0)
        send_to_supervisor.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    main()
