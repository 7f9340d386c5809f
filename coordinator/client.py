"""The Python client of a running runtime (a ZeroMQ DEALER speaking the messages of ``protocol.messages``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from coordinator.auth import ClientKeys
from protocol.codec import MAX_MESSAGE_NBYTES, decode, encode
from protocol.ids import RequestId
from protocol.messages import (
    CacheConfigured,
    CacheDescribed,
    CancelGeneration,
    ConfigureCache,
    DescribeCache,
    ErrorReported,
    Generate,
    GenerationCancelled,
    GenerationDone,
    GenerationQueued,
    GenerationStarted,
    GetHealth,
    GetStats,
    HealthReported,
    Message,
    StatsReported,
    TokenStreamed,
)

POLL_SLICE_S = 0.1


class RequestFailed(RuntimeError):
    """The server answered with an error (recoverable: the runtime goes on serving)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class PromoeClient:
    """``with PromoeClient("tcp://127.0.0.1:5555") as c: c.generate(prompt="def f(", max_new_tokens=16)``.

    ``curve``: the client's keys and the server's public key, for a server started with ``--curve-keys``.
    """

    def __init__(self, address: str, timeout_s: float = 300.0, curve: ClientKeys | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.socket.setsockopt(zmq.SNDTIMEO, max(int(timeout_s * 1000), 1))  # no peer (yet): a send gives up
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(address)

    def __enter__(self) -> PromoeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close(linger=0)
        self._ctx.term()

    def send_raw(self, payload: bytes) -> None:
        """Send any bytes as a request frame (for tests of hostile input)."""
        try:
            self.socket.send(payload)
        except zmq.Again:
            raise TimeoutError(f"could not send to {self.address} within {self.timeout_s:.1f} s (no connection "
                               "completed: is the server there, and does it accept this client's key?)") from None

    def send(self, message: Message) -> None:
        self.send_raw(encode(message))

    def receive(self, timeout_s: float | None = None, while_waiting: Callable[[], None] | None = None) -> Message:
        """The next reply, within ``timeout_s``; ``while_waiting`` runs every 100 ms (it may raise to give up)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from {self.address} within {timeout_s or self.timeout_s:.1f} s")
            if self.socket.poll(int(min(remaining, POLL_SLICE_S) * 1000)):
                return decode(self.socket.recv())
            if while_waiting is not None:
                while_waiting()

    def generate(
        self,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[TokenStreamed], None] | None = None,
        timeout_s: float | None = None,
        while_waiting: Callable[[], None] | None = None,
        chat: bool = False,
        stop_ids: list[int] | None = None,
        deadline_s: float | None = None,
        on_queued: Callable[[GenerationQueued], None] | None = None,
    ) -> GenerationDone:
        """Send one request and wait for its final reply; ``RequestFailed`` carries an error reply's code.

        ``on_queued`` gets the request id (for ``send_cancel``) as soon as the server accepts the request.
        """
        request = Generate(max_new_tokens=max_new_tokens, prompt=prompt, prompt_ids=prompt_ids,
                           temperature=temperature, top_p=top_p, seed=seed, stream=on_token is not None,
                           chat=chat, stop_ids=stop_ids, deadline_s=deadline_s)
        self.send(request)
        while True:
            reply = self.receive(timeout_s, while_waiting)
            if isinstance(reply, TokenStreamed):
                if on_token is not None:
                    on_token(reply)
            elif isinstance(reply, GenerationQueued):
                if on_queued is not None:
                    on_queued(reply)
            elif not isinstance(reply, (GenerationStarted, GenerationCancelled)):
                return self._expect(reply, GenerationDone)

    def send_cancel(self, request_id: RequestId) -> None:
        """Ask, without waiting, to cancel a request sent on this connection (usable while ``generate`` waits)."""
        self.send(CancelGeneration(request_id=request_id))

    def health(self, timeout_s: float = 5.0) -> HealthReported:
        self.send(GetHealth())
        return self._expect(self.receive(timeout_s), HealthReported)

    def stats(self, timeout_s: float = 5.0) -> dict[str, float | int | None]:
        """Totals since the runtime started (the per-request metrics, summed)."""
        self.send(GetStats())
        reply: StatsReported = self._expect(self.receive(timeout_s), StatsReported)
        return reply.totals

    def describe_cache(self, timeout_s: float = 5.0) -> CacheDescribed:
        """A snapshot of the expert cache: per MoE layer what is resident, loading, predicted, recently evicted."""
        self.send(DescribeCache())
        return self._expect(self.receive(timeout_s), CacheDescribed)

    def configure_cache(self, policy: str | None = None, cache_experts: int | None = None,
                        early_preemption: bool | None = None, reordered_inference: bool | None = None,
                        chunked_loads: bool | None = None, prefetch: bool | None = None,
                        host_compute: str | None = None, timeout_s: float = 60.0) -> CacheConfigured:
        """Between requests: switch the policy, the slots in use and the promoe mechanisms (None keeps a setting);
        the cache is emptied. ``RequestFailed`` with ``busy`` while a request runs or waits, ``bad_request`` for
        values out of range."""
        self.send(ConfigureCache(policy=policy, cache_experts=cache_experts, early_preemption=early_preemption,
                                 reordered_inference=reordered_inference, chunked_loads=chunked_loads,
                                 prefetch=prefetch, host_compute=host_compute))
        return self._expect(self.receive(timeout_s), CacheConfigured)

    @staticmethod
    def _expect(reply: Message, kind: type[Any]) -> Any:
        if isinstance(reply, ErrorReported):
            raise RequestFailed(reply.code, reply.message)
        if not isinstance(reply, kind):
            raise RequestFailed("unexpected_reply", f"expected {kind.__name__}, got {type(reply).__name__}")
        return reply
