"""The client protocol of record: every message a client sends to the coordinator or receives from it (README,
"The client protocol"). Their shape on the wire is what clients rely on: change it only with the version."""

from __future__ import annotations

import msgspec

from protocol.ids import RequestId
from protocol.schema import (
    DeadlineS,
    MaxNewTokens,
    Message,
    PromptIds,
    PromptText,
    SamplingParams,
    Seed,
    StopIds,
    Temperature,
    TopP,
)


class Generate(Message):
    """Client request: generate up to ``max_new_tokens`` tokens after ``prompt`` or ``prompt_ids``. The sampling
    fields are those of ``SamplingParams``, flat (same names, types and ranges)."""

    max_new_tokens: MaxNewTokens = 32
    prompt: PromptText | None = None
    prompt_ids: PromptIds | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stream: bool = False
    chat: bool = False
    """Wrap ``prompt`` as one user message in the checkpoint's chat template."""
    stop_ids: StopIds | None = None
    """Stop right after generating any of these ids (the id is included; finish_reason "stop")."""
    deadline_s: DeadlineS | None = None
    """Seconds from arrival until the request is abandoned (queued or running) with ``deadline_exceeded``."""

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**{name: getattr(self, name) for name in SamplingParams.__struct_fields__})


class CancelGeneration(Message):
    """Stop request ``request_id``: from a client to the coordinator (a queued or running request of its own), and
    from the coordinator to the inference worker, one-way, which checks its inbox for it between tokens."""

    request_id: RequestId


class GenerationQueued(Message):
    """First reply to an accepted ``Generate``: its id (to cancel it) and how many requests wait before it."""

    request_id: RequestId
    position: int


class GenerationStarted(Message):
    """The request left the queue and runs on the inference worker."""

    request_id: RequestId


class GenerationCancelled(Message):
    """Reply to ``CancelGeneration``: the request is out of the queue, or stops at its next token; the request
    itself then ends with an ``error`` of code ``cancelled``."""

    request_id: RequestId


class TokenStreamed(Message):
    """One generated token: inference worker -> coordinator for every token, and coordinator -> client, the same
    message, when the client asked for ``stream`` (before the final reply)."""

    request_id: RequestId
    index: int
    token_id: int
    text: str = ""
    """Text completed by this token (empty while a multi-byte character is still incomplete); the concatenation
    over a request is its text."""


class GenerationDone(Message):
    """Final reply to ``Generate``: the generated ids (prompt excluded), the text, and the metrics."""

    request_id: RequestId
    token_ids: list[int]
    text: str | None
    finish_reason: str
    metrics: dict[str, float | int | None] = msgspec.field(default_factory=dict)


class GetHealth(Message):
    pass


class HealthReported(Message):
    workers: dict[str, bool]
    queued: int
    running: int | None
    round_trip_us: dict[str, float]
    restarts: dict[str, int] = msgspec.field(default_factory=dict)
    """Role -> times the supervisor restarted it since start."""
    draining: bool = False
    """True once the runtime was asked to stop: new requests are refused with ``shutting_down``."""


class GetStats(Message):
    """Ask for the totals since start."""


class StatsReported(Message):
    """Totals since start: requests, tokens, hit rate, stall, loads, bytes, waste, prediction quality, link use."""

    totals: dict[str, float | int | None]


class DescribeCache(Message):
    """Ask for a snapshot of the expert cache (the live view's source): built on request only, from what the
    coordinator holds anyway."""


class CacheDescribed(Message):
    """Reply to ``DescribeCache``. Per MoE layer (outer list, in order), experts by their index within the layer."""

    policy: str
    experts_per_layer: int
    cache_experts: int
    """Slots in use."""
    resident: list[list[int]]
    """Every chunk landed."""
    loading: list[list[int]]
    """A load is in flight (precise or speculative; those being preempted left out)."""
    predicted: list[list[int]]
    """The predictions the coordinator holds for positions not yet reached (promoe; empty under other policies)."""
    evicted: list[list[int]]
    """Evicted recently (the last ``cache_experts`` evictions) and not back in the cache since."""
    request_id: RequestId | None = None
    """The running request (None: none runs)."""
    step: int = -1
    """Token step of the last gate the running request reported (0 = prefill; -1: none yet)."""
    layer: int = -1
    """MoE layer of that gate (-1: none yet)."""
    request: dict[str, float | int | None] = msgspec.field(default_factory=dict)
    """The running request's cache metrics so far (loads, bytes, GoodPred, link use, hit rate: live at every gate;
    empty when none runs)."""
    totals: dict[str, float | int | None] = msgspec.field(default_factory=dict)
    """What ``get_stats`` reports (hit rate and stall: of finished requests, as the inference worker reports them)."""
    uptime_s: float = 0.0
    """Seconds since the coordinator started, when the snapshot was taken."""
    link_gbps: float | None = None
    """The link's bandwidth, where known (``--link-gbps``): ``bytes_loaded`` over time, divided by it, is its use."""


class ConfigureCache(Message):
    """Client request (an operator's): between requests, switch the cache policy, the number of cache slots in use
    (at most those allocated at start) and the promoe mechanisms. The cache is emptied; nothing else is reset
    (totals, the queue, the workers). A field left nil keeps its current value."""

    policy: str | None = None
    """ondemand | lru | lfu | promoe."""
    cache_experts: int | None = None
    """Cache slots in use: one layer's top-k .. the slots allocated at start (``--cache-experts``)."""
    early_preemption: bool | None = None
    """promoe: preempt and reorder speculative loads when a gate reports."""
    reordered_inference: bool | None = None
    """Compute experts as they become ready (False: in ascending order, waiting for each)."""
    chunked_loads: bool | None = None
    """The loader reads its inbox between chunks (False: an expert's chunks are copied as one unit)."""
    prefetch: bool | None = None
    """promoe: predictions drive speculative loads (False: the predictor is not consulted at all)."""
    host_compute: str | None = None
    """auto | never | always: compute missing experts on the host (only if the runtime started with it on)."""


class CacheConfigured(Message):
    """Reply to ``ConfigureCache``: the configuration now in force (the cache is empty)."""

    policy: str
    cache_experts: int
    max_cache_experts: int
    """Slots allocated at start: the most ``cache_experts`` may be."""
    early_preemption: bool
    reordered_inference: bool
    chunked_loads: bool
    prefetch: bool
    host_compute: str = "never"


class ErrorReported(Message, tag="error"):
    """The request could not be served; ``code`` is machine-readable, ``message`` says why."""

    code: str
    message: str
    request_id: RequestId | None = None
