"""The live view of the expert cache: ``GET /`` (a static page shipped in ``workers/static/``), ``GET /v1/cache`` (one
snapshot as JSON) and ``GET /v1/cache/events`` (server-sent events, one ``cache`` event per new snapshot).

The snapshots come from the coordinator's ``describe_cache`` (``coordinator/cache_view.py``), asked by one poller at
``VIEW_POLL_HZ`` at most, and only while at least one browser is subscribed: with nobody watching, the coordinator
is never asked. Every subscriber gets the latest snapshot (a slow one skips those it had no time for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from protocol.messages import CacheDescribed, DescribeCache
from workers.gateway_openai import ApiError
from workers.gateway_upstream import Upstream

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The page (``index.html``), its script and its style: no build step, nothing fetched from elsewhere."""
VIEW_POLL_HZ = 4.0
"""Snapshots asked of the coordinator per second while anyone watches."""
UNCHANGED_RESEND_S = 5.0
"""An unchanged snapshot is sent again after this long (the page sees the feed is alive)."""
DESCRIBE_TIMEOUT_S = 5.0
"""How long one snapshot may take before the page is told the coordinator does not answer."""

Snapshot = dict[str, Any]


def snapshot_json(reply: CacheDescribed) -> Snapshot:
    """The reply as the page reads it (the envelope's ``v`` and ``type`` left out)."""
    body: Snapshot = msgspec.to_builtins(reply)
    body.pop("v", None)
    body.pop("type", None)
    return body


def cache_event(snapshot: Snapshot) -> str:
    return f"event: cache\ndata: {json.dumps(snapshot, separators=(',', ':'))}\n\n"


class CacheFeed:
    """One poller of the coordinator, fanned out to every subscribed browser."""

    def __init__(self, upstream: Upstream, poll_hz: float = VIEW_POLL_HZ) -> None:
        self.upstream = upstream
        self.interval_s = 1.0 / poll_hz
        self.subscribers: set[asyncio.Queue[Snapshot]] = set()
        self.poller: asyncio.Task[None] | None = None
        self.polls = 0
        """``describe_cache`` requests sent since start."""

    async def snapshot(self) -> Snapshot:
        """One snapshot now (``ApiError`` when the coordinator does not answer)."""
        self.polls += 1
        return snapshot_json(await self.upstream.call(DescribeCache(), CacheDescribed, DESCRIBE_TIMEOUT_S))

    @contextlib.asynccontextmanager
    async def subscription(self) -> AsyncIterator[asyncio.Queue[Snapshot]]:
        """A queue that always holds the newest snapshot not yet taken; polling runs while any is open."""
        queue: asyncio.Queue[Snapshot] = asyncio.Queue(maxsize=1)
        self.subscribers.add(queue)
        if self.poller is None:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            yield queue
        finally:
            self.subscribers.discard(queue)
            if not self.subscribers and self.poller is not None:
                self.poller.cancel()
                self.poller = None

    def _publish(self, snapshot: Snapshot) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()  # not taken yet: replaced by the newer one
            queue.put_nowait(snapshot)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        last_key, last_sent_s = None, float("-inf")
        log.info("cache view: a browser watches; polling the coordinator at %.0f Hz", 1.0 / self.interval_s)
        try:
            while True:
                started_s = loop.time()
                try:
                    snapshot = await self.snapshot()
                except ApiError as exc:
                    snapshot = {"error": exc.body()["error"]}
                except Exception as exc:  # not the coordinator's answer: say so to the page, keep polling
                    snapshot = {"error": ApiError("internal", f"cache snapshot failed: {exc}").body()["error"]}
                key = json.dumps({k: v for k, v in snapshot.items() if k != "uptime_s"}, sort_keys=True)
                if "error" in snapshot and key != last_key:
                    log.warning("cache view: %s", snapshot["error"]["message"])
                if key != last_key or started_s - last_sent_s >= UNCHANGED_RESEND_S:
                    self._publish(snapshot)
                    last_key, last_sent_s = key, started_s
                await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started_s)))
        finally:
            log.info("cache view: nobody watches; polling stopped")

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of one subscriber: a comment at once (the stream is open), then the snapshots."""
        async with self.subscription() as queue:
            yield ": promoe cache view\n\n"
            while True:
                yield cache_event(await queue.get())


def add_view_routes(api: FastAPI, feed: CacheFeed) -> None:
    """``/``, ``/static/*``, ``/v1/cache`` and ``/v1/cache/events`` (the last two behind ``--api-key``, as all of
    ``/v1``; the page itself holds no data and is served to anyone)."""
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @api.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @api.get("/v1/cache")
    async def cache() -> JSONResponse:
        return JSONResponse(await feed.snapshot())

    @api.get("/v1/cache/events")
    async def cache_events() -> StreamingResponse:
        return StreamingResponse(feed.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
