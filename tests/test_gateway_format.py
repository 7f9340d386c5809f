"""The HTTP gateway without a runtime: error codes to statuses, the error shape, server-sent events, stop strings,
the --http flag rules, the bearer key and request validation."""

from __future__ import annotations

import argparse
import json
import threading

import pytest
from fastapi.testclient import TestClient
from jinja2 import TemplateError

from launch import check_http_flags
from protocol.codec import MAX_MESSAGE_NBYTES
from workers.gateway import parse_http_address
from workers.gateway_app import GatewayApp, GatewaySettings
from workers.gateway_openai import (
    STATUS_OF_CODE,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Outcome,
    ResponseShape,
    StopMatcher,
    chat_messages,
    completion_prompt,
    generate_message,
    request_frame,
    sse,
)
from workers.gateway_upstream import Upstream, connect_address

README_CODES = ("malformed", "bad_version", "unknown_type", "unexpected_type", "missing_field", "unknown_field",
                "bad_field", "bad_request", "bad_token_ids", "no_tokenizer", "no_chat_template", "busy",
                "deadline_exceeded", "cancelled", "unknown_request", "load_timeout", "internal", "worker_died",
                "shutting_down")
"""Every error code of the client protocol (README, "The client protocol")."""


def test_every_error_code_has_its_status_and_openai_shape():
    assert set(README_CODES) <= set(STATUS_OF_CODE)
    for code in ("malformed", "bad_field", "bad_request", "bad_token_ids", "no_tokenizer", "no_chat_template"):
        assert ApiError(code, "x").status == 400
    assert ApiError("busy", "x").status == 429
    assert ApiError("shutting_down", "x").status == ApiError("worker_died", "x").status == 503
    assert ApiError("deadline_exceeded", "x").status == 504
    assert ApiError("something_new", "x").status == 500
    body = ApiError("busy", "queue full").body()
    assert body == {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": "busy"}}


def test_server_sent_events():
    assert sse({"a": 1}) == 'data: {"a":1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"
    shape = ResponseShape("chat", "m", id="x", created=5)
    first = shape.chunk("", first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                          "content": ""}
    last = shape.chunk(None, finish_reason="length", extra={"ttft_ms": 1.0})
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert last["promoe"] == {"ttft_ms": 1.0}
    whole = ResponseShape("completion", "m").whole(Outcome(text="hi", token_ids=[1, 2], finish_reason="stop",
                                                           prompt_tokens=3))
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert whole["choices"][0]["text"] == "hi" and whole["promoe"]["token_ids"] == [1, 2]


def test_stop_strings_hold_back_only_what_may_start_one():
    m = StopMatcher(["END", "xy"])
    assert m.push("abc") == ("abc", False)
    assert m.push("E") == ("", False)  # may start END
    assert m.push("Nd") == ("ENd", False)  # it did not
    assert m.push("x") == ("", False)
    assert m.push("yz") == ("", True)  # the stop string and what follows are dropped
    m = StopMatcher(["END"])
    assert m.push("aEN") == ("a", False)
    assert m.flush() == "EN"
    assert StopMatcher([]).push("abc") == ("abc", False)


def test_request_bodies_to_generate():
    body = CompletionRequest(prompt=[[1, 2, 3]], stop=["s", 7], stop_token_ids=[9], max_tokens=None)
    assert completion_prompt(body) == [1, 2, 3]
    msg, stops = generate_message(body, [1, 2, 3], None, body.max_tokens, 16)
    assert (msg.max_new_tokens, msg.temperature, msg.stop_ids, stops, msg.stream) == (16, 1.0, [7, 9], ["s"], True)
    with pytest.raises(ApiError, match="n = 1"):
        generate_message(CompletionRequest(prompt="x", n=2), None, "x", None, 16)
    with pytest.raises(ApiError, match="one prompt"):
        completion_prompt(CompletionRequest(prompt=["a", "b"]))
    chat = ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert chat_messages(chat) == [{"role": "user", "content": "hi"}]


def test_what_the_coordinator_would_drop_is_refused_here():
    """A seed past 64 bits cannot be encoded, and a prompt past the frame limit would be dropped by the coordinator's
    socket without a reply: both are refused with OpenAI's error shape, not a 500 or a 10 s wait."""
    msg, _ = generate_message(CompletionRequest(prompt=[1], seed=2**70), [1], None, None, 16)
    with pytest.raises(ApiError, match="out of range") as info:
        request_frame(msg)
    assert info.value.status == 400
    too_long = [1000] * (MAX_MESSAGE_NBYTES // 2)  # 3 bytes each in msgpack
    msg, _ = generate_message(CompletionRequest(prompt=too_long), too_long, None, None, 16)
    with pytest.raises(ApiError, match="bytes") as info:
        request_frame(msg)
    assert info.value.status == 413 and info.value.body()["error"]["type"] == "invalid_request_error"


def test_http_flags_loopback_by_default():
    def flags(http: str, api_key: str | None = None, insecure: bool = False) -> argparse.Namespace:
        return argparse.Namespace(http=http, api_key=api_key, insecure=insecure, curve_keys=None, prompt=None,
                                  prompt_ids=None)

    assert check_http_flags(flags("127.0.0.1:8000")) is None
    assert check_http_flags(flags("localhost:8000")) is None
    assert check_http_flags(flags("[::1]:8000")) is None
    assert "--api-key" in (check_http_flags(flags("0.0.0.0:8000")) or "")
    assert check_http_flags(flags("0.0.0.0:8000", api_key="k")) is None
    assert check_http_flags(flags("0.0.0.0:8000", insecure=True)) is None
    assert "HOST:PORT" in (check_http_flags(flags("8000")) or "")
    assert parse_http_address("[::1]:80") == ("::1", 80)
    assert connect_address("tcp://*:5555") == "tcp://127.0.0.1:5555"
    assert connect_address("ipc:///x") == "ipc:///x"


def test_bearer_key_and_bad_bodies_without_a_runtime():
    upstream = Upstream("ipc:///nonexistent-promoe-test")
    try:
        app = GatewayApp(GatewaySettings(model="m", api_key="s3cret"), upstream, tokenizer=None)
        with TestClient(app.api) as http:
            assert http.get("/v1/models").status_code == 401
            # refused before the body is read: bad JSON without the key is a 401, not a parse error
            no_key = http.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
            assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/metrics").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"
            auth = {"Authorization": "Bearer s3cret"}
            bad = http.post("/v1/completions", content=b"{nope", headers={**auth, "Content-Type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
            missing = http.post("/v1/completions", json={"max_tokens": 3}, headers=auth)
            assert missing.status_code == 400 and "prompt" in json.dumps(missing.json())
            assert http.post("/v1/completions", json={"prompt": "x", "n": 3}, headers=auth).status_code == 400
            assert http.get("/nowhere").json()["error"]["code"] == "not_found"
    finally:
        upstream.close()


class RefusingTemplate:
    """A tokenizer whose chat template refuses every conversation (as a template that checks roles does), noting the
    thread it ran on."""

    chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    all_special_ids: list[int] = []

    def __init__(self) -> None:
        self.threads: list[str] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: object) -> list[int]:
        self.threads.append(threading.current_thread().name)
        raise TemplateError("roles must alternate user/assistant")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        self.threads.append(threading.current_thread().name)
        raise AssertionError("not asked")


def test_a_chat_template_error_is_400_in_openai_shape_and_tokenising_is_off_the_event_loop():
    upstream = Upstream("ipc:///nonexistent-promoe-test")
    tokenizer = RefusingTemplate()
    app = GatewayApp(GatewaySettings(model="m"), upstream, tokenizer=tokenizer)
    try:
        with TestClient(app.api) as http:
            refused = http.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]})
            streamed = http.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "x"}], "stream": True})
    finally:
        app.close()
        upstream.close()
    for response in (refused, streamed):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "bad_request", "messages")
        assert "roles must alternate" in error["message"]
    assert len(tokenizer.threads) == 2 and all(t.startswith("promoe-tokenize") for t in tokenizer.threads)
