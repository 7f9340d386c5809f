"""What every wire message shares: the ``Message`` base (a tagged, strict ``msgspec.Struct``), the protocol version,
the sampling parameters a request carries from the client to the inference worker, and their ranges.

On the wire a message is a msgpack map ``{"v": PROTOCOL_VERSION, "type": TAG, **fields}``; ``TAG`` is the class
name in snake case (``GateDecided`` -> ``gate_decided``) unless the class names its own. The ranges below are
``msgspec.Meta`` constraints: decoding a message enforces them, constructing one in process does not.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1

MAX_NEW_TOKENS = 4096
MAX_PROMPT_TOKENS = 16384
MAX_STOP_IDS = 64
MAX_TEMPERATURE = 100.0
MAX_DEADLINE_S = 24 * 3600.0

MaxNewTokens = Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS)]
Temperature = Annotated[float, Meta(ge=0.0, le=MAX_TEMPERATURE)]
"""0 = greedy; NaN is out of range."""
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Seed = Annotated[int, Meta(ge=0)]
"""Up to 2**64-1, the largest integer msgpack carries."""
StopIds = Annotated[list[int], Meta(min_length=1, max_length=MAX_STOP_IDS)]
PromptText = Annotated[str, Meta(min_length=1)]
PromptIds = Annotated[list[int], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
DeadlineS = Annotated[float, Meta(gt=0.0, le=MAX_DEADLINE_S)]


def _snake_case(class_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type",
              tag=_snake_case):
    """Base of every message. Fields of subclasses may be given positionally; ``v`` only by name."""

    TAG: ClassVar[str] = ""
    """The ``type`` on the wire (set for every class listed in ``protocol.messages.ALL_MESSAGES``)."""
    v: int = PROTOCOL_VERSION
    """Protocol version: on the wire in every message; decoding refuses a missing or different one."""


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True):
    """How one request generates: ``Generate`` carries these fields flat (the client protocol), and
    ``StartGeneration`` passes them on to the inference worker as this one struct."""

    max_new_tokens: MaxNewTokens = 32
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop_ids: StopIds | None = None
    """Generation ends (finish_reason "stop") right after any of these ids is generated (the id is included)."""
