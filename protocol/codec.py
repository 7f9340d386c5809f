"""The one codec: ``protocol.messages`` structs <-> msgpack maps, validated by msgspec against the schema.

Decoding never trusts the sender. A valid frame takes the fast path (the envelope read, then one typed decode that
checks every field's type, unknown fields and the ranges). A frame that fails is diagnosed again, slowly, to name
the first problem with the ``code`` a reply carries, in this order: ``malformed`` (not msgpack, not a map, a key
neither str nor bytes, a string that is not UTF-8), ``bad_version`` (``v`` is not the integer 1),
``unknown_type``, then field by field in declaration order ``missing_field`` or ``bad_field``, then
``unknown_field``, and last ``bad_request`` (a value out of its declared range).
"""

from __future__ import annotations

import functools
import typing
from typing import Any

import msgspec

from protocol.messages import ALL_MESSAGES, PROTOCOL_VERSION, Message

MAX_MESSAGE_NBYTES = 1 << 20
"""Largest frame any socket of the runtime accepts (ZMQ_MAXMSGSIZE)."""

_BY_TAG: dict[str, type[Message]] = {cls.TAG: cls for cls in ALL_MESSAGES}
assert len(_BY_TAG) == len(ALL_MESSAGES), "two message types share a tag"


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Envelope(msgspec.Struct):
    """What every frame must carry whatever its type; other keys are skipped."""

    v: Any = None
    type: Any = None


_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)
_MESSAGE = msgspec.msgpack.Decoder(typing.Union[ALL_MESSAGES])  # noqa: UP007


def encode(message: Message) -> bytes:
    return _ENCODER.encode(message)


def decode(frame: bytes) -> Message:
    try:
        envelope = _ENVELOPE.decode(frame)
        if _is_version(envelope.v):
            return _MESSAGE.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    raise _diagnose(frame)


def range_problem(message: Message) -> str | None:
    """Why a message built in process breaks its declared ranges (decoding checks them), or None."""
    try:
        _redecode(message, type(message))
    except msgspec.ValidationError as exc:
        return f"{message.TAG}: {exc}"
    return None


def _is_version(value: Any) -> bool:
    return type(value) is int and value == PROTOCOL_VERSION


def _diagnose(frame: bytes) -> ProtocolError:
    """The first problem of a frame the fast path refused."""
    try:
        body = msgspec.msgpack.decode(frame)
    except Exception as exc:  # garbage: DecodeError, or an unhashable map key
        return ProtocolError("malformed", f"frame is not valid msgpack: {exc}")
    if not isinstance(body, dict):
        return ProtocolError("malformed", f"message must be a map, got {type(body).__name__}")
    if not all(isinstance(key, (str, bytes)) for key in body):
        return ProtocolError("malformed", "message keys must be strings")
    version = body.pop("v", None)
    if not _is_version(version):
        return ProtocolError("bad_version", f"protocol version {version!r:.40} is not {PROTOCOL_VERSION}")
    tag = body.pop("type", None)
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        return ProtocolError("unknown_type", f"unknown message type {tag!r:.40}")
    fields = {name: body.pop(name) for name in cls.__struct_fields__ if name in body}
    for f in msgspec.structs.fields(cls):
        if f.name not in fields:
            if f.required:
                return ProtocolError("missing_field", f"{cls.TAG}: missing field {f.name!r}")
            continue
        try:
            _redecode(fields[f.name], _plain_types(cls)[f.name])
        except msgspec.ValidationError:
            hint = _plain_types(cls)[f.name]
            return ProtocolError("bad_field", f"{cls.TAG}.{f.name}: {fields[f.name]!r:.80} is not "
                                              f"{getattr(hint, '__name__', None) or hint}")
    if body:
        return ProtocolError("unknown_field", f"{cls.TAG}: unknown field(s) {sorted(map(str, body))}")
    try:
        _redecode({"type": tag, **fields}, cls)
    except msgspec.ValidationError as exc:
        return ProtocolError("bad_request", f"{cls.TAG}: {exc}")
    return ProtocolError("malformed", f"{cls.TAG}: not decodable as sent (a key given twice?)")


def _redecode(value: Any, hint: Any) -> None:
    """Decode ``value`` as ``hint`` the way it came on the wire (msgpack str, bin, ext stay distinct)."""
    msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=hint)


@functools.cache
def _plain_types(cls: type[Message]) -> dict[str, Any]:
    """Field name -> type without its range (``Annotated`` constraints dropped): ``bad_field`` is only about type."""
    return typing.get_type_hints(cls)
