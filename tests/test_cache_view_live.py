"""The live view of the cache on a live runtime (``--http``): the coordinator's ``describe_cache``, the gateway's
``/v1/cache`` and its server-sent events while a request runs, the bound on requests in flight
(``--http-max-inflight 1``), and the page in a real headless Chromium (a screenshot of it mid-request lands in
``docs/cache-view.png`` when ``PROMOE_SCREENSHOT`` names a path). The fixture checks that nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.runtime_process import RuntimeProcess
from tests.conftest import free_port

PROMPT = "def fibonacci(n):"
LONG = 400
"""max_tokens of a request that runs until the test closes it."""
LINK_GBPS = "0.2"
"""A slow emulated link: loads take long enough (about 2 ms an expert) to be seen loading."""
PAGE_TOKENS = 48
"""max_tokens of the prompt sent from the page."""
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEADLINE_S = 60.0
NO_VALUE = "\u2013"
"""What the page shows for a figure it does not know (an en dash)."""


@pytest.fixture(scope="module")
def view_rt(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RuntimeProcess]:
    """The default model (6 MoE layers x 32 experts), promoe, served over HTTP with one request in flight at most."""
    rt = RuntimeProcess(tmp_path_factory.mktemp("view"), checkpoint, "--cache-experts", "48", "--link-gbps",
                        LINK_GBPS, "--http", f"127.0.0.1:{free_port()}", "--http-max-inflight", "1")
    yield rt
    rt.stop()
    assert rt.leftovers() == [], rt.log()


def cache_events(lines: Iterator[str]) -> Iterator[dict]:
    """The ``cache`` events of a server-sent event stream, parsed."""
    name = None
    for line in lines:
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:") and name == "cache":
            yield json.loads(line.removeprefix("data:"))
        elif not line:
            name = None


def first_of(events: Iterator[dict], wanted: Callable[[dict], bool], what: str) -> dict:
    """The first snapshot that is ``wanted``: every one must be a snapshot, not an error; each read waits at most the
    client's timeout (an unchanged snapshot comes every 5 s), all of them ``DEADLINE_S``."""
    deadline = time.monotonic() + DEADLINE_S
    snap: dict = {}
    for snap in events:
        assert "error" not in snap, snap
        if wanted(snap):
            return snap
        assert time.monotonic() < deadline, f"no snapshot of {what} within {DEADLINE_S} s; the last: {snap}"
    raise AssertionError(f"the feed ended before a snapshot of {what}; the last: {snap}")


def gauge(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_gauge(http: httpx.Client, name: str, value: float) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while gauge(http, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.05)


def test_snapshot_events_follow_a_request_and_in_flight_is_bounded(view_rt):
    with view_rt.client() as client:
        idle = client.describe_cache()
    assert (len(idle.resident), idle.experts_per_layer, idle.cache_experts, idle.policy) == (6, 32, 48, "promoe")
    assert idle.request_id is None and idle.link_gbps == float(LINK_GBPS)
    url = f"http://{view_rt.http}"
    body = {"prompt": PROMPT, "max_tokens": LONG, "stream": True, "temperature": 0}
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as http:  # loaded, 2 cores: a first token may take 10 s
        snapshot = http.get("/v1/cache").json()
        assert snapshot["experts_per_layer"] == 32 and "v" not in snapshot and "type" not in snapshot
        assert gauge(http, "promoe_http_cache_view_subscribers") == 0
        with http.stream("GET", "/v1/cache/events") as feed:
            assert feed.headers["content-type"].startswith("text/event-stream")
            events = cache_events(feed.iter_lines())
            first = next(events)
            assert "error" not in first, first
            assert first["request_id"] is None and len(first["resident"]) == 6
            assert gauge(http, "promoe_http_cache_view_subscribers") == 1
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()
                assert next(lines).startswith("data: ")  # it runs
                seen_predicted = False

                def running_with_experts(snap: dict) -> bool:
                    nonlocal seen_predicted
                    seen_predicted |= any(snap["predicted"])
                    return snap["request_id"] is not None and snap["step"] >= 0 and any(snap["resident"]) \
                        and seen_predicted

                snap = first_of(events, running_with_experts, "the running request with its experts")
                assert sum(map(len, snap["resident"])) <= 48 and snap["request"]["bytes_loaded"] > 0
                assert 0 <= snap["layer"] < 6
                # one request in flight already: the next one is refused at once, in OpenAI's shape
                refused = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "busy" and "--http-max-inflight" in refused.text
                assert gauge(http, "promoe_http_requests_in_flight") == 1
            # the stream closed mid-way: its request is cancelled, and the feed shows the cache idle again
            snap = first_of(events, lambda snap: snap["request_id"] is None, "the cancelled request's end")
            assert snap["totals"]["requests_cancelled"] >= 1 and any(snap["resident"])
        wait_gauge(http, "promoe_http_cache_view_subscribers", 0)  # nobody watches: the poller stops
        wait_gauge(http, "promoe_http_requests_in_flight", 0)
        done = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
    assert "cache view: nobody watches; polling stopped" in view_rt.log_path.read_text(errors="replace")


def chromium_missing() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return f"no {CHROMIUM} (Debian's chromium package; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def test_the_page_shows_the_cache_and_streams_tokens(view_rt, tmp_path):
    """Chromium opens ``/``, sends a prompt from the box and sees its tokens stream in while the grid shows resident
    experts; a screenshot is taken mid-request."""
    missing = chromium_missing()
    if missing is not None:
        if os.environ.get("PROMOE_REQUIRE_BROWSER"):  # .ci/run installs both: there, a missing browser is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    timeout_ms = DEADLINE_S * 1000
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800})
        try:
            page = browser.new_page()
            errors: list[str] = []  # the page's own script failing (an uncaught exception, a console error)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(f"http://{view_rt.http}/", timeout=timeout_ms)
            expect(page.locator("#grid .cell")).to_have_count(6 * 32, timeout=timeout_ms)
            expect(page.locator("#status")).to_contain_text("promoe · 48 slots · idle", timeout=timeout_ms)
            page.fill("#prompt", PROMPT)
            page.fill("#max-tokens", str(PAGE_TOKENS))
            page.click("#send")
            page.wait_for_function("Number(document.querySelector('#output').dataset.tokens) >= 8",
                                   timeout=timeout_ms)
            page.wait_for_selector("#grid .cell.resident", timeout=timeout_ms)
            expect(page.locator("#status")).to_contain_text("request", timeout=timeout_ms)
            screenshot = os.environ.get("PROMOE_SCREENSHOT")
            page.screenshot(path=screenshot or str(tmp_path / "cache-view.png"))
            page.wait_for_selector("#output[data-finished]", timeout=timeout_ms)
            assert page.get_attribute("#output", "data-finished") == "length"
            assert page.get_attribute("#output", "data-tokens") == str(PAGE_TOKENS)
            assert len(page.inner_text("#output")) > 0
            expect(page.locator("#done")).to_contain_text(f"{PAGE_TOKENS} tokens")
            resident = page.locator("#grid .cell.resident").count()
            assert 0 < resident <= 48
            expect(page.locator("#status")).to_contain_text("idle", timeout=timeout_ms)
            for figure in ("#v-hit", "#v-stall", "#v-goodpred", "#v-link"):  # every sparkline has a value
                expect(page.locator(figure)).not_to_have_text(NO_VALUE, timeout=timeout_ms)
            expect(page.locator("#v-link")).to_contain_text("%")  # utilisation: the link's speed is known
            assert errors == []
        finally:
            browser.close()
