"""The coordinator's client-facing request book: admission (validation, the queue bound), per-request deadlines,
cancellation, and which requests belong to which client connection.

The queue is a dict in arrival order, so that a cancelled or expired request leaves it at once, wherever it is.
Deadlines are event-loop timers armed on admission: they fire whether the request is still queued or already
running, and the coordinator decides what firing means in each case.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from protocol.codec import range_problem
from protocol.ids import RequestId
from protocol.messages import Generate


@dataclass
class PendingRequest:
    request_id: RequestId
    envelope: list[bytes]
    """ROUTER routing frames (identity, and the empty delimiter of a REQ client)."""
    request: Generate
    timer: asyncio.TimerHandle | None = None
    """Fires at the request's deadline (None: no deadline)."""
    abandoned: str | None = None
    """Set while running once the request is cancelled: the error code its client gets (``cancelled``,
    ``deadline_exceeded``), or ``peer_gone`` when nobody is left to answer."""

    @property
    def peer(self) -> bytes:
        """The ROUTER identity of the connection that sent it."""
        return self.envelope[0]

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Rejected(Exception):
    """A request refused on admission; ``code`` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RequestQueue:
    """Requests waiting for the inference worker, oldest first, at most ``max_queued`` of them."""

    def __init__(self, max_queued: int, default_timeout_s: float | None,
                 on_deadline: Callable[[PendingRequest], None], vocab_size: int | None = None) -> None:
        self.max_queued = max_queued
        self.vocab_size = vocab_size
        self.default_timeout_s = default_timeout_s
        self.on_deadline = on_deadline
        self._queued: dict[RequestId, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def __iter__(self) -> Iterator[PendingRequest]:
        return iter(list(self._queued.values()))

    def timeout_s(self, msg: Generate) -> float | None:
        """The request's own deadline, capped by the server's default (a client cannot outstay the server)."""
        limits = [t for t in (msg.deadline_s, self.default_timeout_s) if t is not None]
        return min(limits) if limits else None

    def admit(self, envelope: list[bytes], msg: Generate, request_id: RequestId) -> PendingRequest:
        """Queue the request or raise ``Rejected`` (``bad_request``, ``bad_token_ids``, ``busy``)."""
        problem = validate_generate(msg)
        if problem is not None:
            raise Rejected("bad_request", problem)
        if self.vocab_size is not None:
            for what, ids in (("prompt_ids", msg.prompt_ids), ("stop_ids", msg.stop_ids)):
                bad = [i for i in ids or () if not 0 <= i < self.vocab_size]
                if bad:
                    raise Rejected("bad_token_ids",
                                   f"{what} {bad[:5]} outside the vocabulary 0..{self.vocab_size - 1}")
        if len(self._queued) >= self.max_queued:
            raise Rejected("busy", f"{len(self._queued)} requests are queued (--max-queue {self.max_queued}): "
                                   "try again later")
        pending = PendingRequest(request_id, envelope, msg)
        timeout_s = self.timeout_s(msg)
        if timeout_s is not None:
            pending.timer = asyncio.get_running_loop().call_later(timeout_s, self.on_deadline, pending)
        self._queued[request_id] = pending
        return pending

    def pop_next(self) -> PendingRequest | None:
        if not self._queued:
            return None
        return self._queued.pop(next(iter(self._queued)))

    def get(self, request_id: RequestId) -> PendingRequest | None:
        return self._queued.get(request_id)

    def remove(self, request_id: RequestId) -> PendingRequest | None:
        """Take a queued request out (its deadline disarmed); None if it is not queued."""
        pending = self._queued.pop(request_id, None)
        if pending is not None:
            pending.disarm()
        return pending

    def clear(self) -> None:
        for pending in self._queued.values():
            pending.disarm()
        self._queued.clear()

    def of_peer(self, peer: bytes) -> list[PendingRequest]:
        return [p for p in self._queued.values() if p.peer == peer]


def validate_generate(msg: Generate) -> str | None:
    """Why the request is not acceptable, or None: exactly one prompt, and the ranges the schema declares (decoding
    a frame checks them already; a ``Generate`` built in process has not been through it). Token ids are checked
    against the vocabulary on admission and by the worker."""
    if (msg.prompt is None) == (msg.prompt_ids is None):
        return "give exactly one of prompt and prompt_ids"
    return range_problem(msg)


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (identity [+ the empty delimiter of a REQ client], the request frames)."""
    if len(frames) > 2 and frames[1] == b"":
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]
