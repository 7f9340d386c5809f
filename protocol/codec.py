"""The one codec: dataclass message <-> msgpack map, with strict validation on decode.

Decoding never trusts the sender: an undecodable frame, a wrong version, an unknown type, a missing or unknown
field, or a field of the wrong type each raise ``ProtocolError`` with a ``code`` a reply can carry.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import msgpack

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


def encode(message: Message) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": message.TAG}
    for f in dataclasses.fields(message):
        body[f.name] = getattr(message, f.name)
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes) -> Message:
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", f"frame is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("malformed", f"message must be a map, got {type(body).__name__}")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    tag = body.pop("type", None)
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {tag!r}")
    return _build(cls, body)


def _build(cls: type[Message], body: dict[str, Any]) -> Message:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            value = body.pop(f.name)
            if not _conforms(value, hints[f.name]):
                raise ProtocolError(
                    "bad_field", f"{cls.TAG}.{f.name}: {value!r:.80} is not {_type_name(hints[f.name])}"
                )
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError("missing_field", f"{cls.TAG}: missing field {f.name!r}")
    if body:
        raise ProtocolError("unknown_field", f"{cls.TAG}: unknown field(s) {sorted(map(str, body))}")
    return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conforms(value: Any, hint: Any) -> bool:
    supertype = getattr(hint, "__supertype__", None)  # NewType
    if supertype is not None:
        return _conforms(value, supertype)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is bytes:
        return isinstance(value, bytes)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    raise TypeError(f"codec cannot check fields of type {hint!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)

