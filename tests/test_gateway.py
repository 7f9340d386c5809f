"""The HTTP API on a live runtime (``--http``), through the real ``openai`` client: completions and chat, streamed
and not, the same greedy tokens as the ZeroMQ path, error statuses, a client that leaves mid-stream, a gateway
killed with SIGKILL (restarted), and 503 while the runtime drains (the fixture checks that nothing is left behind)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from coordinator.runtime_process import RuntimeProcess
from tests.conftest import free_port

PROMPT = "def fibonacci(n):"
NEW = 10
HEARTBEAT_S = 5.0
"""--heartbeat-timeout-s of the module's runtime: how long a silent gateway lives."""
LONG = 480
"""max_tokens of a request that outlives the test's patience (the tiny model has 512 positions)."""


@pytest.fixture(scope="module")
def http_rt(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RuntimeProcess]:
    """The tiny qwen2_moe checkpoint (a byte tokenizer with a chat template) served over HTTP, one request running
    and one queued at most behind it; the gateway holds one more than that (so that ``busy`` is the coordinator's:
    the gateway's own bound is tests/test_cache_view_live.py's)."""
    rt = RuntimeProcess(tmp_path_factory.mktemp("http"), tiny_checkpoints["qwen2_moe"], "--policy", "lru",
                        "--http", f"127.0.0.1:{free_port()}", "--max-queue", "1", "--http-max-inflight", "3",
                        "--max-batch", "1",
                        "--heartbeat-timeout-s", str(HEARTBEAT_S))
    yield rt
    rt.stop()
    assert rt.leftovers() == [], rt.log()


@pytest.fixture
def api(http_rt: RuntimeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://{http_rt.http}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def promoe(obj: object) -> dict:
    extra = getattr(obj, "model_extra", None) or {}
    return extra["promoe"]


def test_completions_are_the_zeromq_path_tokens(http_rt, api):
    with http_rt.client() as client:
        zmq_done = client.generate(prompt=PROMPT, max_new_tokens=NEW)
    done = api.completions.create(model="any", prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert promoe(done)["token_ids"] == zmq_done.token_ids
    assert done.choices[0].text == zmq_done.text and done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(PROMPT.encode()), NEW)
    assert promoe(done)["ttft_ms"] > 0 and "hit_rate" in promoe(done)
    chunks = list(api.completions.create(model="any", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == zmq_done.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"]
    assert promoe(finish[0])["token_ids"] == zmq_done.token_ids
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == NEW
    by_ids = api.completions.create(model="any", prompt=list(PROMPT.encode()), max_tokens=NEW, temperature=0)
    assert promoe(by_ids)["token_ids"] == zmq_done.token_ids


def test_chat_streamed_and_not_is_the_chat_template(http_rt, api):
    with http_rt.client() as client:
        zmq_done = client.generate(prompt="hello", chat=True, max_new_tokens=NEW)
    messages = [{"role": "user", "content": "hello"}]
    done = api.chat.completions.create(model="any", messages=messages, max_tokens=NEW, temperature=0)  # type: ignore
    assert promoe(done)["token_ids"] == zmq_done.token_ids
    assert done.choices[0].message.content == zmq_done.text and done.choices[0].message.role == "assistant"
    stream = api.chat.completions.create(model="any", messages=messages, max_tokens=NEW, temperature=0,  # type: ignore
                                         stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == zmq_done.text
    system = api.chat.completions.create(model="any", max_tokens=2, temperature=0, messages=[  # type: ignore
        {"role": "system", "content": "be brief"}, *messages])
    assert system.usage is not None and system.usage.prompt_tokens == len("<system>be brief\n<user>hello\n<assistant>")


def test_stop_strings_and_stop_ids(http_rt, api):
    greedy = api.completions.create(model="any", prompt=PROMPT, max_tokens=NEW, temperature=0)
    ids, text = promoe(greedy)["token_ids"], greedy.choices[0].text
    cut = text[3:5] if text[3:5].strip() else text[4:6]
    stopped = api.completions.create(model="any", prompt=PROMPT, max_tokens=NEW, temperature=0, stop=[cut])
    assert stopped.choices[0].text == text[:text.index(cut)] and stopped.choices[0].finish_reason == "stop"
    by_id = api.completions.create(model="any", prompt=PROMPT, max_tokens=NEW, temperature=0,
                                   extra_body={"stop_token_ids": [ids[2]]})
    assert promoe(by_id)["token_ids"] == ids[:ids.index(ids[2]) + 1]
    assert by_id.choices[0].finish_reason == "stop"
    assert text.startswith(by_id.choices[0].text)  # without the stop id's own text


def test_bad_input_is_400_in_openai_shape(api):
    for kwargs, code in (({"max_tokens": 0}, "bad_request"), ({"n": 2}, "bad_request"),
                         ({"temperature": -1}, "bad_request"), ({"prompt": [9999]}, "bad_token_ids")):
        with pytest.raises(openai.BadRequestError) as caught:
            api.completions.create(**{"model": "any", "prompt": PROMPT, **kwargs})  # type: ignore[call-overload]
        assert caught.value.status_code == 400 and caught.value.code == code, kwargs
    with pytest.raises(openai.APIStatusError) as late:
        api.completions.create(model="any", prompt=PROMPT, max_tokens=LONG, extra_body={"deadline_s": 0.3})
    assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"
    with pytest.raises(openai.APIError) as in_stream:  # after the stream began: its last event is the error
        list(api.completions.create(model="any", prompt=PROMPT, max_tokens=LONG, stream=True,
                                    extra_body={"deadline_s": 0.3}))
    assert isinstance(in_stream.value.body, dict) and in_stream.value.body["code"] == "deadline_exceeded"


def test_busy_is_429_and_clients_that_leave_are_cancelled(http_rt, api):
    url = f"http://{http_rt.http}/v1/completions"
    with http_rt.client() as client:
        before = client.stats()["requests_cancelled"] or 0
    body = {"prompt": PROMPT, "max_tokens": LONG, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as running, \
            http.stream("POST", url, json=body) as queued:
        lines = running.iter_lines()  # (kept: a dropped iterator closes its connection)
        assert next(lines).startswith("data: ")  # the first one runs
        assert queued.status_code == 200  # the second one waits (it has its first reply)
        with pytest.raises(openai.RateLimitError) as busy:
            api.completions.create(model="any", prompt=PROMPT, max_tokens=2)
        assert busy.value.status_code == 429 and busy.value.code == "busy"
        assert "--http-max-inflight" not in busy.value.message  # the coordinator's queue was full
    # both streams closed mid-way: their requests are cancelled through cancel_generation; so is a request whose
    # client gives up before the whole answer comes
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": PROMPT, "max_tokens": LONG}, timeout=1.0)
    deadline = time.monotonic() + 30
    with http_rt.client() as client:
        while True:
            health, stats = client.health(), client.stats()
            if health.queued == 0 and health.running is None and (stats["requests_cancelled"] or 0) >= before + 3:
                break
            assert time.monotonic() < deadline, (health, stats)
            time.sleep(0.1)
    # the abandoned plain request ended as a 499 (counted), not in an unhandled error of the app
    with httpx.Client(base_url=f"http://{http_rt.http}", timeout=30) as http:
        deadline = time.monotonic() + 10
        while 'status="499"' not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "no 499 counted for the client that left"
            time.sleep(0.1)
    assert "Exception in ASGI application" not in http_rt.log()


def test_models_health_and_metrics(http_rt, api):
    assert [m.id for m in api.models.list()] == ["qwen2_moe"]
    with httpx.Client(base_url=f"http://{http_rt.http}", timeout=30) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        metrics = http.get("/metrics").text
    for line in ('promoe_requests_total{outcome="done"}', "promoe_tokens_generated_total", "promoe_hit_rate",
                 "promoe_stall_seconds_total", "promoe_bytes_loaded_total", "promoe_queue_depth",
                 'promoe_worker_restarts_total{role="inference"}', "promoe_http_ttft_seconds_bucket",
                 "promoe_http_tpot_seconds_count", 'promoe_http_responses_total{endpoint="/v1/completions",status='):
        assert line in metrics, line


def test_a_killed_gateway_is_restarted(http_rt, api):
    """The runtime's teardown checks that neither gateway is left."""
    http_rt.kill_worker("gateway")
    deadline = time.monotonic() + 60
    with http_rt.client() as client:
        while client.health().restarts.get("gateway", 0) < 1 or not http_rt._http_ready():
            assert time.monotonic() < deadline, http_rt.log()
            time.sleep(0.2)
    http_rt.find_children()
    done = api.completions.create(model="any", prompt=PROMPT, max_tokens=2, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens == 2


def test_a_hung_gateway_is_killed_and_restarted(http_rt, api):
    """A gateway whose event loop stops (SIGSTOP: alive, silent) sends no beacon: the supervisor kills it after the
    heartbeat deadline and the usual restart follows."""
    hung = http_rt.children["gateway"]
    restarts = 0
    with http_rt.client() as client:
        restarts = client.health().restarts.get("gateway", 0)
        os.kill(hung.pid, signal.SIGSTOP)
        deadline = time.monotonic() + HEARTBEAT_S + 60
        while client.health().restarts.get("gateway", 0) <= restarts or not http_rt._http_ready():
            assert time.monotonic() < deadline, http_rt.log()
            time.sleep(0.2)
    assert not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE, "the hung gateway was not killed"
    assert "sent no beacon" in http_rt.log()
    http_rt.find_children()
    done = api.completions.create(model="any", prompt=PROMPT, max_tokens=2, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens == 2


def test_draining_is_503_and_the_runtime_stops(http_rt, api):
    """Last of all: SIGTERM drains; meanwhile the gateway answers 503 (health and new requests), and once the running
    stream is closed (so cancelled) the runtime stops with nothing left behind (the fixture's check)."""
    url = f"http://{http_rt.http}"
    body = {"prompt": PROMPT, "max_tokens": LONG, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        http_rt.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (health := http.get("/health")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as refused:
            api.completions.create(model="any", prompt=PROMPT, max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.code == "shutting_down"
    assert http_rt.wait_exit(60) == 0
