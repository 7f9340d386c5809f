"""Hostile clients against one live runtime: thousands of mutated requests, each answered with an error, after
which the runtime still serves the reference tokens."""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.client import PromoeClient
from protocol.codec import MAX_MESSAGE_NBYTES
from protocol.messages import ErrorReported
from tests.conftest import NEW_TOKENS, PROMPT_IDS

BATCH = 50
EXAMPLES = 70
"""70 batches of 50: 3500 hostile frames."""
ERROR_CODES = {"malformed", "bad_version", "unknown_type", "unexpected_type", "missing_field", "unknown_field",
               "bad_field", "bad_request", "bad_token_ids", "unknown_request"}
VOCAB = 257
UNKNOWN_REQUEST = 10**9
"""No request of the fuzzing connection has this id, so cancelling it is always an error."""

VALID: dict[str, dict[str, Any]] = {
    "generate": {"prompt_ids": [1, 2, 3], "max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0, "seed": 3,
                 "stream": False, "stop_ids": [5], "deadline_s": 30.0},
    "cancel_generation": {"request_id": UNKNOWN_REQUEST},
    "get_health": {},
    "get_stats": {},
}
"""Valid client requests (the cancel is of an unknown request, the only variant whose reply is an error)."""

INT_MIN, INT_MAX = -(2**63), 2**64 - 1
"""What msgpack can carry."""


def ints(lo: int = INT_MIN, hi: int = INT_MAX) -> st.SearchStrategy[int]:
    return st.integers(min_value=lo, max_value=hi)


junk = st.recursive(
    st.none() | st.booleans() | ints() | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
huge = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**18, -(10**18)])
not_a_list = st.none() | st.booleans() | st.text(max_size=8) | st.floats() | st.dictionaries(st.text(max_size=3), junk)
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_new_tokens": ints(hi=0) | ints(lo=4097) | huge | st.text(max_size=5)
    | st.floats() | st.booleans() | st.lists(ints(), max_size=3),
    "prompt_ids": st.just([]) | st.lists(ints(lo=VOCAB), min_size=1, max_size=5)
    | st.lists(ints(hi=-1), min_size=1, max_size=5) | st.lists(huge, min_size=1, max_size=3)
    | st.lists(st.text(max_size=3) | st.floats() | st.none(), min_size=1, max_size=3) | not_a_list,
    "temperature": st.floats(max_value=-1e-9) | st.floats(min_value=100.5) | st.just(math.nan) | st.text(max_size=4)
    | st.lists(st.floats(), max_size=2) | st.booleans(),
    "top_p": st.floats(max_value=0.0) | st.floats(min_value=1.0001) | st.just(math.inf) | st.text(max_size=4),
    "seed": ints(hi=-1) | st.text(max_size=4) | st.floats() | st.booleans(),
    "stream": ints() | st.text(max_size=4) | st.none() | st.floats(),
    "stop_ids": st.just([]) | st.lists(ints(lo=VOCAB), min_size=1, max_size=3)
    | st.lists(ints(hi=-1), min_size=1, max_size=3) | st.lists(ints(), min_size=65, max_size=70)
    | st.text(max_size=3),
    "deadline_s": st.floats(max_value=0.0) | st.floats(min_value=86_401.0) | st.just(math.nan) | st.text(max_size=3),
    "request_id": st.text(max_size=4) | st.floats() | st.none() | st.lists(ints(), max_size=2)
    | ints(lo=UNKNOWN_REQUEST) | ints(hi=-1),
}


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@st.composite
def hostile_frame(draw: st.DrawFn) -> list[bytes]:
    """One request as frames, always invalid in some way."""
    tag = draw(st.sampled_from(sorted(VALID)))
    body: dict[Any, Any] = {"v": 1, "type": tag, **VALID[tag]}
    how = draw(st.sampled_from(["wrong_value", "missing", "extra", "version", "type", "not_a_map", "bytes",
                                "bad_utf8", "frames"]))
    if how == "wrong_value" and body.keys() - {"v", "type"}:
        name = draw(st.sampled_from(sorted(body.keys() - {"v", "type"})))
        body[name] = draw(BAD_VALUES[name])
    elif how == "missing" and tag in ("generate", "cancel_generation"):
        del body["prompt_ids" if tag == "generate" else "request_id"]
    elif how == "version":
        body["v"] = draw(junk.filter(lambda v: v != 1))
    elif how == "type":
        internal = st.sampled_from(["load_expert", "start_generation", "ping", "generation_done", "error", "Generate"])
        body["type"] = draw(internal | junk.filter(lambda t: not isinstance(t, str) or t not in VALID))
    elif how == "not_a_map":
        return [pack(draw(st.lists(junk, max_size=4) | ints() | st.text(max_size=10) | st.none()))]
    elif how == "bytes":
        return [draw(st.binary(max_size=64))]
    elif how == "bad_utf8":
        raw = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80"]))
        body[draw(st.sampled_from(["prompt", "type", "x_key"]))] = raw
        return [msgpack.packb(body, use_bin_type=False)]  # bytes packed as msgpack str: not UTF-8
    elif how == "frames":
        return [pack(body), draw(st.binary(max_size=8))]
    else:  # extra field (also the fallback for messages without fields)
        body[draw(st.text(min_size=1, max_size=6).map(lambda k: "x_" + k))] = draw(junk)
    return [pack(body)]


def test_oversized_frame_is_refused_and_serving_goes_on(serving):
    with serving.client() as client:
        client.send_raw(b"\x00" * (MAX_MESSAGE_NBYTES + 1))
        assert not client.socket.poll(2000), "an oversized frame got an answer"
    with serving.client() as client:
        assert client.generate(prompt_ids=[1, 2, 3], max_new_tokens=2).token_ids


def test_thousands_of_hostile_requests_get_errors_and_serving_goes_on(serving, reference):
    client = PromoeClient(serving.address)
    counts: dict[str, int] = {}
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(hostile_frame(), min_size=BATCH, max_size=BATCH))
    def batch(frames: list[list[bytes]]) -> None:
        for parts in frames:
            client.socket.send_multipart(parts)
        for parts in frames:
            reply = client.receive(timeout_s=30)
            assert isinstance(reply, ErrorReported), (parts, reply)
            assert reply.code in ERROR_CODES and reply.message, (parts, reply)
            counts[reply.code] = counts.get(reply.code, 0) + 1

    try:
        batch()
        assert not client.socket.poll(200), "more replies than requests"
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        health = client.health()
    finally:
        client.close()
    assert done.token_ids == reference["ids"]
    assert all(health.workers.values()) and health.queued == 0
    assert sum(counts.values()) >= EXAMPLES * BATCH
    assert {"malformed", "bad_field", "bad_request", "unknown_field", "unknown_type"} <= counts.keys(), counts
    assert time.monotonic() - started < 120


def test_clients_that_connect_and_leave_cost_nothing(serving):
    ctx = zmq.Context()
    try:
        for _ in range(50):
            s = ctx.socket(zmq.DEALER)
            s.connect(serving.address)
            s.close(linger=0)
    finally:
        ctx.term()
    with serving.client() as client:
        assert client.health().queued == 0
