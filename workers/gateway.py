"""The gateway process (``promoe::gateway``, started with ``--http HOST:PORT``): OpenAI-compatible HTTP for clients,
the client protocol of record (ZeroMQ v1) to the coordinator, as one more client of its client socket.

It binds the HTTP port itself before it reports ready (a port in use stops the runtime at start-up, like any worker
that fails to start), loads the checkpoint's tokenizer (chat template, prompt tokens, usage counts) and serves with
uvicorn on a uvloop event loop (``workers/gateway_app.py``). The supervisor restarts it if it dies; SIGTERM (or the
supervisor's death, through PDEATHSIG) closes the port, ends open streams within a second, and exits. SIGINT is
left to the supervisor: a Ctrl-C drains the runtime while the gateway goes on answering (``503`` to new requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
import zmq

from coordinator.auth import ClientKeys
from models.text import load_tokenizer
from protocol.config import GATEWAY, RuntimeConfig
from protocol.messages import ALIVE_INTERVAL_S, WorkerAlive, WorkerStarted
from workers.bootstrap import WorkerStopping, become, parse_run_dir, push_socket, send
from workers.gateway_app import GatewayApp, GatewaySettings
from workers.gateway_upstream import Upstream, connect_address

log = logging.getLogger(__name__)

GRACEFUL_STOP_S = 1
"""On SIGTERM, how long open HTTP connections (streams) get before they are closed."""


def parse_http_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) -> (host, port); ``ValueError`` says what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (port 1..65535), got {address!r}")
    return host, int(port)


def bind_listener(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound now (so that a port in use is a start-up failure)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, but only SIGTERM stops it: SIGINT stays ignored (``become``), the supervisor decides."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        signal.signal(signal.SIGTERM, self.handle_exit)
        yield


async def send_beacons(announce: zmq.Socket) -> None:
    """``WorkerAlive`` every ``ALIVE_INTERVAL_S`` from the event loop: the supervisor kills (and so restarts) a
    gateway whose loop stopped turning for ``--heartbeat-timeout-s``."""
    while True:
        send(announce, WorkerAlive(role=GATEWAY, pid=os.getpid()))
        await asyncio.sleep(ALIVE_INTERVAL_S)


async def serve(cfg: RuntimeConfig, listener: socket.socket, tokenizer: object | None,
                curve: ClientKeys | None, announce: zmq.Socket) -> None:
    upstream = Upstream(connect_address(cfg.bind), curve, cfg.http_inflight_limit)
    app = GatewayApp(GatewaySettings(model=cfg.served_model_name, api_key=cfg.http_api_key,
                                     created=int(time.time())), upstream, tokenizer)
    server = _Server(uvicorn.Config(app.api, log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=GRACEFUL_STOP_S, timeout_keep_alive=30))
    task = asyncio.ensure_future(server.serve(sockets=[listener]))
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            send(announce, WorkerStarted(role=GATEWAY, pid=os.getpid()))
            log.info("gateway serving http://%s/v1 for %s", cfg.http, cfg.bind)
            beacon = asyncio.ensure_future(send_beacons(announce))
        await task
        if server.started:
            beacon.cancel()
        log.info("gateway stopped")
    finally:
        app.close()
        upstream.close()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_run_dir(GATEWAY, argv)
    become(GATEWAY, cfg.supervisor_pid)
    assert cfg.http is not None, "the gateway runs only with --http"
    ctx = zmq.Context()
    announce = push_socket(ctx, cfg.endpoint("supervisor"))
    try:
        try:
            listener = bind_listener(*parse_http_address(cfg.http))
        except (OSError, ValueError) as exc:
            log.error("cannot serve HTTP on %s: %s", cfg.http, exc)
            raise SystemExit(1) from None
        tokenizer = load_tokenizer(Path(cfg.checkpoint))
        curve = ClientKeys.load(Path(cfg.curve_keys_dir)) if cfg.curve_keys_dir else None
        import uvloop

        uvloop.run(serve(cfg, listener, tokenizer, curve, announce))
    except WorkerStopping as stop:
        log.info("gateway stopping (%s)", stop)
    finally:
        announce.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    main(sys.argv[1:])
