"""The predictor worker process (``promoe::predictor``).

For now it starts, answers pings and stops: prediction (hidden states in from shared memory, expert scores out as
hints to the coordinator) lands here with the proactive-caching issue.
"""

from __future__ import annotations

import logging
from typing import Any

from protocol.config import RuntimeConfig
from protocol.messages import Message, Ping
from workers.bootstrap import WorkerSockets, run_worker

log = logging.getLogger(__name__)


def serve(cfg: RuntimeConfig, sockets: WorkerSockets) -> None:
    if cfg.predictor_path is None:
        log.info("no trained predictor given; prediction is not implemented yet, nothing is prefetched")
    handlers: dict[type[Message], Any] = {Ping: sockets.answer_ping}
    sockets.announce_ready()
    sockets.serve(handlers)


def main(argv: list[str] | None = None) -> None:
    run_worker("predictor", argv, serve)


if __name__ == "__main__":
    main()
