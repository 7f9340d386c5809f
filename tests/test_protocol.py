"""The wire protocol: every message survives a round trip, and decoding rejects every malformed frame with a code."""

from __future__ import annotations

import logging
import types
import typing
from typing import Any, Union

import msgpack
import msgspec
import pytest

from protocol import messages
from protocol.codec import ProtocolError, decode, encode
from protocol.dispatch import Dispatcher
from protocol.messages import ALL_MESSAGES, PROTOCOL_VERSION, Message, SamplingParams


# ---------------------------------------------------------------- sample instances from the type hints
def _sample(hint: Any, seed: int, *, prefer_none: bool) -> Any:
    """A value of ``hint`` that depends on ``seed`` (so two fields of one message differ)."""
    if typing.get_origin(hint) is typing.Annotated:  # a declared range: the sample is clamped into it
        base, *metas = typing.get_args(hint)
        value = _sample(base, seed, prefer_none=prefer_none)
        for meta in metas:
            if isinstance(value, (int, float)) and meta.le is not None:
                value = min(value, meta.le)
        return value
    supertype = getattr(hint, "__supertype__", None)  # NewType ids
    if supertype is not None:
        return _sample(supertype, seed, prefer_none=prefer_none)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if prefer_none and type(None) in args:
            return None
        return _sample(next(a for a in args if a is not type(None)), seed, prefer_none=prefer_none)
    if hint is bool:
        return seed % 2 == 0
    if hint is int:
        return 1000 + seed
    if hint is float:
        return seed + 0.25
    if hint is str:
        return f"text-{seed}-\u00e9"
    if hint is bytes:
        return bytes(range(seed % 7, seed % 7 + 64))  # like a 64-byte CUDA IPC handle
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_sample(item, seed + i, prefer_none=False) for i in range(3)]
    if origin is dict:
        key, item = typing.get_args(hint)
        assert key is str, f"sample builder knows only str keys, not {key!r}"
        return {f"k{i}": _sample(item, seed + i, prefer_none=False) for i in range(2)}
    if hint is SamplingParams:  # in range: a nested struct is checked like a message
        return SamplingParams(max_new_tokens=seed % 4096 + 1, temperature=seed % 100 + 0.25, top_p=0.5, seed=seed,
                              stop_ids=[seed, seed + 1])
    raise AssertionError(f"sample builder does not know {hint!r}: extend it for the new message field")


def fields_of(cls: type[Message]) -> list[msgspec.structs.FieldInfo]:
    """The message's own fields (not the version every message carries)."""
    return [f for f in msgspec.structs.fields(cls) if f.name != "v"]


def sample_message(cls: type[Message], *, prefer_none: bool = False) -> Message:
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {f.name: _sample(hints[f.name], 10 * i + 1, prefer_none=prefer_none)
              for i, f in enumerate(fields_of(cls))}
    return cls(**kwargs)


def frame(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def body_of(message: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(message), raw=False)


# ---------------------------------------------------------------- round trips
def test_tags_are_unique_and_nonempty() -> None:
    tags = [cls.TAG for cls in ALL_MESSAGES]
    assert all(tags), "every message needs a TAG"
    assert len(set(tags)) == len(tags)


def test_all_messages_lists_every_message_class() -> None:
    defined = {obj for obj in vars(messages).values()
               if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message}
    assert defined == set(ALL_MESSAGES)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prefer_none", [False, True], ids=["values", "nones"])
def test_round_trip(cls: type[Message], prefer_none: bool) -> None:
    message = sample_message(cls, prefer_none=prefer_none)
    wire = encode(message)
    assert isinstance(wire, bytes)
    body = msgpack.unpackb(wire, raw=False)
    assert body["v"] == PROTOCOL_VERSION
    assert body["type"] == cls.TAG
    decoded = decode(wire)
    assert type(decoded) is cls
    assert decoded == message


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_round_trip_with_defaults(cls: type[Message]) -> None:
    """Only the required fields given: the defaults survive too."""
    hints = typing.get_type_hints(cls, include_extras=True)
    required = {f.name: _sample(hints[f.name], 3, prefer_none=False) for f in fields_of(cls) if f.required}
    message = cls(**required)
    assert decode(encode(message)) == message


def test_optional_fields_may_be_left_out_on_the_wire() -> None:
    decoded = decode(frame({"v": PROTOCOL_VERSION, "type": "load_expert", "load_id": 1, "expert": 2, "slot": 3,
                            "seq": 4}))
    assert decoded == messages.LoadExpert(load_id=1, expert=2, slot=3, seq=4)
    assert decoded.priority == messages.PRIORITY_PRECISE and decoded.first_chunk == 0


def test_int_is_accepted_where_a_float_is_expected() -> None:
    msg = sample_message(messages.GenerationFinished)
    body = body_of(msg)
    body["ttft_ms"] = 3
    assert decode(frame(body)).ttft_ms == 3


# ---------------------------------------------------------------- decode errors
def _ping_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "ping", "nonce": 1, "sent_ns": 2}
    body.update(overrides)
    return body


def _expect(code: str, wire: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(wire)
    assert info.value.code == code, f"{info.value.code}: {info.value}"
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize("wire", [b"\xc1", b"\x92\x01", b"\x81\xa1v", b"not msgpack at all", b""],
                         ids=["reserved-byte", "truncated-array", "truncated-map", "text", "empty"])
def test_garbage_is_malformed(wire: bytes) -> None:
    _expect("malformed", wire)


@pytest.mark.parametrize("body", [[PROTOCOL_VERSION, "ping", 1, 2], "ping", 7, None],
                         ids=["list", "str", "int", "nil"])
def test_non_map_is_malformed(body: Any) -> None:
    _expect("malformed", frame(body))


def test_map_with_non_string_keys_is_malformed() -> None:
    _expect("malformed", frame({1: 2}))


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, "1", None], ids=["next", "zero", "str", "nil"])
def test_wrong_version(version: Any) -> None:
    _expect("bad_version", frame(_ping_body(v=version)))


def test_missing_version() -> None:
    body = _ping_body()
    del body["v"]
    _expect("bad_version", frame(body))


@pytest.mark.parametrize("tag", ["no_such_message", "", 5, None], ids=["unknown", "empty", "int", "nil"])
def test_unknown_type(tag: Any) -> None:
    _expect("unknown_type", frame(_ping_body(type=tag)))


def test_missing_type() -> None:
    body = _ping_body()
    del body["type"]
    _expect("unknown_type", frame(body))


def test_missing_required_field() -> None:
    body = _ping_body()
    del body["sent_ns"]
    error = _expect("missing_field", frame(body))
    assert "sent_ns" in str(error)


def test_unknown_extra_field() -> None:
    error = _expect("unknown_field", frame(_ping_body(extra=1)))
    assert "extra" in str(error)


def test_version_and_type_are_the_whole_envelope() -> None:
    """A message without fields is exactly ``{"v", "type"}`` on the wire, and decodes from just that."""
    assert set(body_of(messages.GetHealth())) == {"v", "type"}
    assert decode(frame({"v": PROTOCOL_VERSION, "type": "get_health"})) == messages.GetHealth()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_ping_body(nonce="1"), "nonce"),
        (_ping_body(nonce=1.5), "nonce"),
        (_ping_body(nonce=None), "nonce"),
        (_ping_body(nonce=True), "nonce"),  # bool is an int in Python, not on this protocol
        (_ping_body(nonce=[1]), "nonce"),
        ({"v": PROTOCOL_VERSION, "type": "preempt", "load_ids": [1, "2", 3]}, "load_ids"),
        ({"v": PROTOCOL_VERSION, "type": "preempt", "load_ids": [1, True]}, "load_ids"),
        ({"v": PROTOCOL_VERSION, "type": "preempt", "load_ids": 1}, "load_ids"),
        ({"v": PROTOCOL_VERSION, "type": "preempt", "load_ids": {"a": 1}}, "load_ids"),
        ({"v": PROTOCOL_VERSION, "type": "worker_started", "role": b"bytes", "pid": 1}, "role"),
        ({"v": PROTOCOL_VERSION, "type": "error", "code": "c", "message": "m", "request_id": "x"}, "request_id"),
        ({"v": PROTOCOL_VERSION, "type": "generate", "stream": 1}, "stream"),
        ({"v": PROTOCOL_VERSION, "type": "generate", "temperature": "hot"}, "temperature"),
        ({"v": PROTOCOL_VERSION, "type": "generate", "temperature": False}, "temperature"),
        ({"v": PROTOCOL_VERSION, "type": "health_reported", "workers": {"loader": 1}, "queued": 0,
          "running": None, "round_trip_us": {}}, "workers"),
        ({"v": PROTOCOL_VERSION, "type": "generation_done", "request_id": 1, "token_ids": [], "text": None,
          "finish_reason": "length", "metrics": {"x": "not a number"}}, "metrics"),
    ],
    ids=["str-for-int", "float-for-int", "nil-for-int", "bool-for-int", "list-for-int", "str-in-list-int",
         "bool-in-list-int", "int-for-list", "map-for-list", "bytes-for-str", "str-for-optional-int",
         "int-for-bool", "str-for-float", "bool-for-float", "int-value-in-dict-bool", "str-value-in-dict-number"],
)
def test_wrong_field_type(body: dict[str, Any], field: str) -> None:
    error = _expect("bad_field", frame(body))
    assert field in str(error)


def test_bad_field_message_is_bounded() -> None:
    """A huge wrong value is not echoed back whole in the error message."""
    error = _expect("bad_field", frame(_ping_body(nonce="x" * 10_000)))
    assert len(str(error)) < 300


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_version_is_the_integer_one(version: Any) -> None:
    _expect("bad_version", frame(_ping_body(v=version)))


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"max_new_tokens": 0}, "bad_request"),
        ({"top_p": 1.5}, "bad_request"),
        ({"temperature": float("nan")}, "bad_request"),
        ({"stop_ids": []}, "bad_request"),
        ({"seed": -1}, "bad_request"),
        ({"max_new_tokens": 0, "colour": 1}, "unknown_field"),  # every other problem is named before a range
        ({"max_new_tokens": 0, "top_p": "high"}, "bad_field"),
    ],
    ids=["max-new-tokens", "top-p", "nan-temperature", "no-stop-ids", "negative-seed", "unknown-first",
         "type-first"],
)
def test_declared_ranges_are_checked_last(fields: dict[str, Any], code: str) -> None:
    error = _expect(code, frame({"v": PROTOCOL_VERSION, "type": "generate", "prompt_ids": [1], **fields}))
    assert error.args[0].startswith("generate")


def test_a_range_inside_a_nested_struct_is_checked() -> None:
    body = body_of(messages.StartGeneration(request_id=1, params=SamplingParams(), prompt_ids=[1]))
    body["params"]["top_p"] = 0.0
    _expect("bad_field", frame(body))


def test_generate_carries_the_sampling_params_flat() -> None:
    """Same names, types (with ranges) and defaults: ``Generate.sampling_params`` hands them on unchanged."""
    generate_hints = typing.get_type_hints(messages.Generate, include_extras=True)
    generate_defaults = {f.name: f.default for f in fields_of(messages.Generate)}
    for f in msgspec.structs.fields(SamplingParams):
        assert generate_hints[f.name] == typing.get_type_hints(SamplingParams, include_extras=True)[f.name]
        assert generate_defaults[f.name] == f.default
    request = messages.Generate(max_new_tokens=7, prompt="x", temperature=0.5, top_p=0.9, seed=3, stop_ids=[2])
    assert request.sampling_params() == SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3,
                                                       stop_ids=[2])


# ---------------------------------------------------------------- dispatch
def test_dispatcher_calls_the_handler_of_the_type_with_the_loop_s_context() -> None:
    calls: list[tuple[str, object, Message]] = []
    dispatch = Dispatcher("test", {
        messages.Ping: lambda envelope, m: calls.append(("ping", envelope, m)),
        messages.Preempt: lambda envelope, m: calls.append(("preempt", envelope, m)),
    })
    preempt = messages.Preempt(load_ids=[1, 2])
    ping = messages.Ping(nonce=1, sent_ns=2)
    assert dispatch(preempt, [b"peer"]) and dispatch(ping, [b"other"])
    assert calls == [("preempt", [b"peer"], preempt), ("ping", [b"other"], ping)]
    assert dispatch.unexpected == 0


def test_dispatcher_of_a_decoded_frame() -> None:
    seen: list[Message] = []
    message = messages.Reorder(load_ids=[3, 1])
    assert Dispatcher("test", {messages.Reorder: seen.append})(decode(encode(message)))
    assert seen == [message]


def test_dispatcher_logs_counts_and_drops_an_unhandled_type(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Message] = []
    dispatch = Dispatcher("loader", {messages.Ping: calls.append})
    with caplog.at_level(logging.ERROR, logger="protocol.dispatch"):
        assert dispatch(messages.Reorder(load_ids=[1])) is False
        assert dispatch(messages.Reorder(load_ids=[2])) is False
    assert calls == [] and dispatch.unexpected == 2
    assert [r.getMessage() for r in caplog.records] == [
        "loader: dropped Reorder, which is not handled here (1 so far)",
        "loader: dropped Reorder, which is not handled here (2 so far)"]
    assert calls == []
