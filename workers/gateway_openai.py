"""The OpenAI wire format of the HTTP gateway, without any I/O: the request bodies, the error shape and the status
of every error code of the client protocol, server-sent events, stop strings, and the response objects.

Everything here is a pure function or a small value type, so that ``tests/test_gateway_format.py`` checks it without
a runtime.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from protocol.codec import MAX_MESSAGE_NBYTES, encode
from protocol.messages import Generate

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of a completion."""
DEFAULT_CHAT_MAX_TOKENS = 256
"""A chat completion without ``max_tokens`` (OpenAI: until the context ends; here a bounded default)."""

BAD_INPUT_CODES = ("malformed", "bad_version", "unknown_type", "unexpected_type", "missing_field", "unknown_field",
                   "bad_field", "bad_request", "bad_token_ids", "no_tokenizer", "no_chat_template", "unknown_request")
STATUS_OF_CODE: dict[str, int] = {
    **dict.fromkeys(BAD_INPUT_CODES, 400),
    "busy": 429,
    "shutting_down": 503,
    "worker_died": 503,
    "unavailable": 503,
    "deadline_exceeded": 504,
    "load_timeout": 504,
    "cancelled": 500,
    "internal": 500,
}
"""HTTP status of every ``error`` code of the client protocol (README, "The client protocol"); anything else: 500."""
TYPE_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                  413: "invalid_request_error",
                  429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, code: str, message: str, status: int | None = None, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_OF_CODE.get(code, 500)
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPE_OF_STATUS.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ request bodies
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """The fields shared by both endpoints; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    deadline_s: float | None = None
    """Our extension: seconds from arrival until the request is abandoned (504), as ``deadline_s`` of v1."""


class CompletionRequest(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def completion_prompt(body: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text or token ids (a batch of several is refused)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError("bad_request", "one prompt per request (batches are not supported)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt:
        raise ApiError("bad_request", "the prompt is empty", param="prompt")
    return prompt  # type: ignore[return-value]


def chat_messages(body: ChatRequest) -> list[dict[str, str]]:
    """The conversation as the chat template takes it; content parts other than text are refused."""
    if not body.messages:
        raise ApiError("bad_request", "messages must not be empty", param="messages")
    out = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ApiError("bad_request", "only text content parts are supported", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({"role": m.role, "content": content or ""})
    return out


def generate_message(body: SamplingBody, prompt_ids: list[int] | None, prompt: str | None,
                     max_tokens: int | None, default_max_tokens: int) -> tuple[Generate, list[str]]:
    """The ``generate`` request for the coordinator (always streamed, so that stop strings and disconnects can end
    it early) and the stop strings the gateway itself watches for."""
    if body.n not in (None, 1):
        raise ApiError("bad_request", "only n = 1 is supported", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop_strings = [s for s in stops if isinstance(s, str) and s]
    stop_ids = [s for s in stops if isinstance(s, int)] + list(body.stop_token_ids or [])
    msg = Generate(prompt=prompt, prompt_ids=prompt_ids,
                   max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
                   temperature=1.0 if body.temperature is None else body.temperature,
                   top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stream=True,
                   stop_ids=stop_ids or None, deadline_s=body.deadline_s)
    return msg, stop_strings


def request_frame(msg: Generate) -> bytes:
    """``msg`` encoded for the coordinator, refused here (``ApiError``) where the coordinator's socket would drop it
    without a word (a frame over ``MAX_MESSAGE_NBYTES``) or where it cannot be encoded (an integer past 64 bits)."""
    try:
        frame = encode(msg)
    except (OverflowError, ValueError) as exc:
        raise ApiError("bad_request", f"a value is out of range: {exc}") from None
    if len(frame) > MAX_MESSAGE_NBYTES:
        raise ApiError("bad_request", f"the request encodes to {len(frame)} bytes, more than the "
                       f"{MAX_MESSAGE_NBYTES} a request may have", status=413)
    return frame


# ------------------------------------------------------------------ stop strings
class StopMatcher:
    """Ends the text at the first stop string: text that might be the start of one is held back until it is not."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """The text that may be released now, and whether a stop string was reached (nothing after it is kept)."""
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        held = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - held:] if held else ""
        return text[:len(text) - held], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ------------------------------------------------------------------ responses
def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line (``data: [DONE]`` ends a stream)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass
class Outcome:
    """What one request produced, as the gateway saw it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def extra(self) -> dict[str, Any]:
        """Our per-request metrics (TTFT, TPOT, hit rate, stall, GoodPred, ...) and the token ids, in the field
        ``promoe`` that standard clients ignore."""
        return {**self.metrics, "token_ids": self.token_ids}


@dataclass(frozen=True)
class ResponseShape:
    """The fixed part of one response's objects."""

    kind: Literal["completion", "chat"]
    """Which endpoint: ``/v1/completions`` or ``/v1/chat/completions``."""
    model: str
    """The served model's id."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    """Unique per response; prefixed by the kind's prefix."""
    created: int = field(default_factory=lambda: int(time.time()))
    """Unix time of the request."""

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "completion":
            return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created,
                    "model": self.model}
        return {"id": f"chatcmpl-{self.id}", "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.created, "model": self.model}

    def whole(self, out: Outcome) -> dict[str, Any]:
        """The non-streamed response."""
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": out.text, "finish_reason": out.finish_reason,
                                      "logprobs": None}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                      "finish_reason": out.finish_reason, "logprobs": None}
        return {**self._head(False), "choices": [choice], "usage": out.usage(), "promoe": out.extra()}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk: a text delta, or (``finish_reason``) the last one, carrying ``promoe``."""
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": text or "", "finish_reason": finish_reason,
                                      "logprobs": None}
        else:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        out = {**self._head(True), "choices": [choice]}
        if extra is not None:
            out["promoe"] = extra
        return out

    def usage_chunk(self, out: Outcome) -> dict[str, Any]:
        """``stream_options.include_usage``: the last chunk before ``[DONE]``, no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": out.usage()}
