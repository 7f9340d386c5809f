"""The live view without a runtime: the snapshot (``DescribeCache``) over a real cache directory (resident, loading,
predicted and recently evicted experts per MoE layer, the running request's metrics); the gateway's feed of it (polls
only while subscribed, sends changes, newest first); the page and its files; ``--http-max-inflight``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from coordinator.cache_view import by_layer, describe_cache
from coordinator.metrics import Totals
from protocol.codec import decode, encode
from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, RequestId
from protocol.messages import CacheDescribed, DescribeCache, Message
from tests.test_cache import E, Rig, layout, loads_in
from workers.gateway_app import GatewayApp, GatewaySettings
from workers.gateway_openai import ApiError
from workers.gateway_upstream import Upstream
from workers.gateway_view import STATIC_DIR, CacheFeed


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig(n_slots=3, policy="promoe")
    try:
        yield made
    finally:
        made.close()


def test_by_layer_splits_flat_ids():
    assert by_layer([ExpertId(e) for e in (2 * E + 5, 1, 0, 2 * E)], 4, E) == [[0, 1], [], [0, 5], []]


def test_snapshot_shows_each_state_where_it_is(rig: Rig):
    request = RequestId(7)
    rig.cache.begin_request(request)
    first = loads_in(rig.gate(1, 2, at=(0, 0)))
    assert [c.expert for c in first] == [1, 2]
    rig.loaded(first[0])
    spec = loads_in(rig.predict(0, 1, E + 3))  # a guess for layer 1: speculative load of expert 3 there
    assert [c.expert for c in spec] == [E + 3]
    rig.predict(0, 3, 3 * E + 6)  # no slot left for this one: predicted, not loading
    snap = describe_cache(rig.cache, Totals(), 2.0, request, 0.5, 10.0)
    assert snap.resident == [[1], [], [], []]
    assert snap.loading == [[2], [3], [], []]
    assert snap.predicted == [[], [3], [], [6]]
    assert snap.evicted == [[], [], [], []]
    assert (snap.request_id, snap.step, snap.layer, snap.policy, snap.cache_experts) == (request, 0, 0, "promoe", 3)
    assert snap.request["experts_loaded"] == 1 and snap.request["link_utilisation"] is not None
    assert decode(encode(snap)) == snap  # within the declared schema

    rig.loaded(first[1])
    rig.loaded(spec[0])
    rig.unpin(1, 2)
    rig.use(2 * E + 4, 2 * E + 5, at=(0, 2))  # layer 2's gate: two slots needed, evictions follow
    snap = describe_cache(rig.cache, Totals(), None, None, 0.0, 11.0)
    evicted = {(layer, e) for layer, experts in enumerate(snap.evicted) for e in experts}
    resident = {(layer, e) for layer, experts in enumerate(snap.resident) for e in experts}
    assert {(2, 4), (2, 5)} <= resident and len(resident) == 3
    assert len(evicted) == 2 and not evicted & resident
    assert evicted <= {(0, 1), (0, 2), (1, 3)}
    assert (snap.request_id, snap.request, snap.step) == (None, {}, -1)  # no request running: no request metrics
    assert snap.predicted[3] == [6]  # still ahead of layer 2


def test_the_running_request_hit_rate_is_live_at_every_gate(rig: Rig):
    """Counted at each gate from what the worker saw landed (``ready``, read as the worker reads it), not only when
    the request ends: the snapshot's hit rate equals hits / uses over the gates so far, and a new request
    starts over."""

    def worker_ready(layer: int) -> list[int]:  # what the inference worker sends as ``ready_experts``
        return [int(e) for e in rig.table.ready_experts(ExpertId(layer * E), E)]

    def hit_rate() -> float | int | None:
        return describe_cache(rig.cache, Totals(), None, request, 0.5, 1.0).request["hit_rate"]

    request = RequestId(9)
    rig.cache.begin_request(request)
    assert hit_rate() is None  # no gate yet
    first = loads_in(rig.gate(1, 2, at=(0, 0), ready=worker_ready(0)))  # both missing: 0 of 2
    assert hit_rate() == 0.0
    for load in first:
        rig.loaded(load)
    rig.unpin(1, 2)
    rig.gate(1, 2, 3, at=(1, 0), ready=worker_ready(0))  # 1 and 2 landed, 3 missing: 2 of 3
    assert hit_rate() == pytest.approx(2 / 5)
    rig.gate(E + 0, at=(1, 1))  # no ``ready`` given: read from the slot table (missing: 0 of 1)
    snap = describe_cache(rig.cache, Totals(), None, request, 0.5, 1.0)
    assert snap.request["hit_rate"] == pytest.approx(2 / 6) and snap.request["expert_uses"] == 6
    assert (rig.cache.counters.expert_hits, rig.cache.counters.expert_uses) == (2, 6)  # the totals count them too
    rig.cache.begin_request(RequestId(10))
    request = RequestId(10)
    assert hit_rate() is None  # the next request's share starts empty


class FakeUpstream:
    """Answers ``describe_cache`` with a snapshot whose ``uptime_s`` counts the calls (``change``: the cache too)."""

    def __init__(self) -> None:
        self.calls = 0
        self.resident = [[0], []]

    async def call(self, request: Message, kind: type, timeout_s: float = 5.0) -> CacheDescribed:
        assert isinstance(request, DescribeCache) and kind is CacheDescribed
        self.calls += 1
        return CacheDescribed(policy="lru", experts_per_layer=4, cache_experts=2, resident=self.resident,
                              loading=[[], []], predicted=[[], []], evicted=[[], []], uptime_s=float(self.calls))


async def test_the_feed_polls_only_while_subscribed_and_sends_changes():
    upstream = FakeUpstream()
    feed = CacheFeed(upstream, poll_hz=1000.0)  # type: ignore[arg-type]
    assert feed.poller is None and upstream.calls == 0  # nobody watches: the coordinator is not asked
    events = feed.events()
    assert await asyncio.wait_for(anext(events), 5) == ": promoe cache view\n\n"
    first = await asyncio.wait_for(anext(events), 5)
    assert first.startswith("event: cache\ndata: ")
    body = json.loads(first.split("data: ", 1)[1])
    assert body["resident"] == [[0], []] and "type" not in body and "v" not in body
    assert feed.poller is not None and len(feed.subscribers) == 1
    upstream.resident = [[1, 3], [2]]  # only a change (or UNCHANGED_RESEND_S of silence) is sent again
    changed = json.loads((await asyncio.wait_for(anext(events), 5)).split("data: ", 1)[1])
    assert changed["resident"] == [[1, 3], [2]] and changed["uptime_s"] > body["uptime_s"]
    poller = feed.poller
    await events.aclose()  # the browser left
    assert feed.poller is None and feed.subscribers == set()
    await asyncio.wait_for(asyncio.wait({poller}), 5)
    assert poller.cancelled()  # the poller ended: the coordinator is asked no more


async def test_a_coordinator_that_does_not_answer_is_said_in_the_feed():
    upstream = FakeUpstream()

    async def silent(request: Message, kind: type, timeout_s: float = 5.0) -> CacheDescribed:
        raise ApiError("unavailable", "the coordinator did not answer within 2 s")

    upstream.call = silent  # type: ignore[method-assign]
    feed = CacheFeed(upstream, poll_hz=1000.0)  # type: ignore[arg-type]
    async with feed.subscription() as queue:
        snapshot = await asyncio.wait_for(queue.get(), 5)
    assert snapshot == {"error": ApiError("unavailable", "the coordinator did not answer within 2 s").body()["error"]}
    assert feed.poller is None


async def test_a_slow_subscriber_gets_the_newest_snapshot_only():
    feed = CacheFeed(FakeUpstream(), poll_hz=1.0)  # type: ignore[arg-type]
    async with feed.subscription() as queue:
        feed._publish({"n": 1})
        feed._publish({"n": 2})
        assert queue.qsize() == 1 and queue.get_nowait() == {"n": 2}


def test_the_page_is_served_whole_from_the_package_and_the_data_behind_the_key():
    for name in ("index.html", "cache-view.js", "cache-view.css"):
        text = (STATIC_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name  # nothing fetched
    upstream = Upstream("ipc:///nonexistent-promoe-test")
    try:
        app = GatewayApp(GatewaySettings(model="m", api_key="s3cret"), upstream, tokenizer=None)
        with TestClient(app.api) as http:
            page = http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert '<script src="/static/cache-view.js">' in page.text
            assert "EventSource" not in http.get("/static/cache-view.js").text  # fetch(): the key can go along
            assert "/v1/cache/events" in http.get("/static/cache-view.js").text
            assert http.get("/static/cache-view.css").status_code == 200
            assert http.get("/v1/cache").status_code == 401
            assert http.get("/v1/cache/events").status_code == 401
    finally:
        upstream.close()


def test_http_max_inflight_flag():
    from launch import build_parser, check_serving_flags

    def problem(*flags: str) -> str | None:
        return check_serving_flags(build_parser().parse_args(["--http", "127.0.0.1:8000", *flags]), "ipc:///x")

    assert "--http-max-inflight must be >= 1" in (problem("--http-max-inflight", "0") or "")
    assert problem("--http-max-inflight", "3") is None
    cfg = RuntimeConfig(run_id="x", run_dir="/tmp", checkpoint="", layout=layout(3), policy="lru", device="cpu",
                        bind="ipc:///x", link_gbps=None, lookahead=2, predictor_path=None, load_timeout_s=5.0,
                        supervisor_pid=0, max_queue=5)
    assert cfg.http_inflight_limit == 6  # by default what the coordinator can hold: the running request and its queue
    assert dataclasses.replace(cfg, http_max_inflight=2).http_inflight_limit == 2
