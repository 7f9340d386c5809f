"""The client socket: requests are queued and all answered, bad input gets an error and serving goes on."""

from __future__ import annotations

import threading

import msgpack
import pytest

from coordinator.client import PromoeClient, RequestFailed
from protocol.codec import decode, encode
from protocol.messages import ErrorReported, Generate, GenerationDone, GenerationQueued, GenerationStarted
from tests.conftest import NEW_TOKENS, PROMPT_IDS


def test_generate_reports_metrics_and_streams(shared_runtime, reference):
    streamed = []
    with shared_runtime.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS, on_token=streamed.append)
    assert done.token_ids == reference["ids"]
    assert [t.token_id for t in streamed] == done.token_ids
    assert [t.index for t in streamed] == list(range(NEW_TOKENS))
    m = done.metrics
    assert m["ttft_ms"] > 0 and m["tpot_ms"] > 0
    assert 0 <= m["hit_rate"] <= 1
    assert m["experts_loaded"] > 0 and m["bytes_loaded"] > 0
    assert m["zmq_messages_per_token"] > 0
    assert m["gate_message_latency_us_p50"] > 0
    assert done.finish_reason == "length"


def test_concurrent_requests_are_queued_and_all_answered(shared_runtime, reference):
    results: dict[int, GenerationDone] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            with shared_runtime.client() as client:
                results[i] = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.token_ids == reference["ids"] for r in results.values())
    assert len({r.request_id for r in results.values()}) == 4


def test_pipelined_requests_on_one_socket_run_together_and_are_all_answered(shared_runtime):
    """Three requests sent back to back on one socket are each queued, started and answered with their own length
    (batched, the default, they run together and finish in any order; tests/test_batch.py checks the overlap)."""
    with shared_runtime.client() as client:
        for n in (3, 1, 2):
            client.socket.send(encode(Generate(prompt_ids=PROMPT_IDS, max_new_tokens=n)))
        replies = [client.receive(timeout_s=120) for _ in range(9)]
    kinds = [type(r) for r in replies]
    assert kinds[:2] == [GenerationQueued, GenerationStarted]  # the first one starts at once
    assert kinds.count(GenerationQueued) == kinds.count(GenerationStarted) == 3
    done = [r for r in replies if isinstance(r, GenerationDone)]
    assert [len(r.token_ids) for r in sorted(done, key=lambda r: r.request_id)] == [3, 1, 2]  # in the order sent


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1\xff not msgpack", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({"v": 99, "type": "generate"}), "bad_version"),
        (msgpack.packb({"v": 1, "type": "launch_missiles"}), "unknown_type"),
        (msgpack.packb({"v": 1, "type": "generate", "max_new_tokens": "many", "prompt": "x"}), "bad_field"),
        (msgpack.packb({"v": 1, "type": "generate", "prompt": "x", "colour": 3}), "unknown_field"),
        (msgpack.packb({"v": 1, "type": "load_expert", "load_id": 1, "expert": 1, "slot": 1, "seq": 1}),
         "unexpected_type"),
        (encode(Generate(max_new_tokens=0, prompt="x")), "bad_request"),
        (encode(Generate(max_new_tokens=-5, prompt_ids=[1])), "bad_request"),
        (encode(Generate(max_new_tokens=10**9, prompt_ids=[1])), "bad_request"),
        (encode(Generate(max_new_tokens=4)), "bad_request"),
        (encode(Generate(max_new_tokens=4, prompt="x", prompt_ids=[1])), "bad_request"),
        (encode(Generate(max_new_tokens=4, prompt_ids=[])), "bad_request"),
        (encode(Generate(max_new_tokens=4, prompt_ids=[1], temperature=-1.0)), "bad_request"),
        (encode(Generate(max_new_tokens=4, prompt_ids=[1], temperature=float("nan"))), "bad_request"),
        (encode(Generate(max_new_tokens=4, prompt_ids=[1], top_p=0.0)), "bad_request"),
        (encode(Generate(max_new_tokens=4, prompt_ids=[1, 99999])), "bad_token_ids"),
        (encode(Generate(max_new_tokens=4, prompt_ids=[-1])), "bad_token_ids"),
    ],
)
def test_bad_requests_get_an_error_and_serving_goes_on(shared_runtime, payload, code):
    with shared_runtime.client() as client:
        client.send_raw(payload)
        reply = client.receive(timeout_s=60)
        assert isinstance(reply, ErrorReported), reply
        assert reply.code == code, reply
        assert reply.message
        assert client.generate(prompt_ids=[1, 2, 3], max_new_tokens=2).token_ids


def test_sampling_is_reproducible_with_a_seed(shared_runtime):
    with shared_runtime.client() as client:
        a = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=8, temperature=1.5, seed=7)
        b = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=8, temperature=1.5, seed=7)
        c = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=8, temperature=1.5, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_health_reports_every_worker(shared_runtime):
    with shared_runtime.client() as client:
        health = client.health()
    assert health.workers == {"inference": True, "predictor": True, "loader": True}
    assert set(health.round_trip_us) == {"inference", "predictor", "loader"}


def test_request_failed_is_raised_by_the_client(shared_runtime):
    with PromoeClient(shared_runtime.address) as client, pytest.raises(RequestFailed) as info:
        client.generate(prompt_ids=[10**6], max_new_tokens=2)
    assert info.value.code == "bad_token_ids"
    assert decode(encode(Generate(prompt="x"))) == Generate(prompt="x")


def test_chat_without_a_template_or_with_ids_is_refused_and_serving_goes_on(shared_runtime):
    with shared_runtime.client() as client:
        with pytest.raises(RequestFailed, match="no_chat_template"):  # the default model has no chat template
            client.generate(prompt="hi", chat=True, max_new_tokens=2)
        with pytest.raises(RequestFailed, match="chat needs a text prompt"):
            client.generate(prompt_ids=PROMPT_IDS, chat=True, max_new_tokens=2)
        assert len(client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=2).token_ids) == 2
