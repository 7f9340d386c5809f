"""Every message that crosses a process boundary, defined once.

On the wire a message is a msgpack map ``{"v": PROTOCOL_VERSION, "type": TAG, **fields}``; ``protocol.codec``
encodes and decodes it. Commands are verb-noun (``LoadExpert``), events past tense (``ExpertLoaded``). Big
tensors never ride these messages: they live in ``shm/`` and messages carry expert and slot numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from protocol.ids import ExpertId, LoadId, RequestId, SlotId

PROTOCOL_VERSION = 1

PRIORITY_PRECISE = 0
"""Load priority of experts the gate has chosen (misses): served before any speculative load."""
PRIORITY_SPECULATIVE = 1
"""Load priority of predicted experts (prefetches)."""


@dataclass(frozen=True)
class Message:
    TAG: ClassVar[str] = ""


# ---------------------------------------------------------------- lifecycle (every worker)
@dataclass(frozen=True)
class WorkerStarted(Message):
    """A process finished start-up and serves its inbox."""

    TAG: ClassVar[str] = "worker_started"
    role: str
    pid: int


@dataclass(frozen=True)
class WorkerDied(Message):
    """Supervisor -> coordinator: ``role`` exited (``exit_code``, negative for a signal); it is being restarted."""

    TAG: ClassVar[str] = "worker_died"
    role: str
    pid: int
    exit_code: int


@dataclass(frozen=True)
class WorkerRestarted(Message):
    """Supervisor -> coordinator: the restarted ``role`` reported ready (it attached to the same shared memory)."""

    TAG: ClassVar[str] = "worker_restarted"
    role: str
    pid: int


@dataclass(frozen=True)
class WorkerSilent(Message):
    """Coordinator -> supervisor: ``role`` answered no ping for ``silent_s``: kill it (it is then restarted)."""

    TAG: ClassVar[str] = "worker_silent"
    role: str
    silent_s: float


@dataclass(frozen=True)
class DrainRequested(Message):
    """Supervisor -> coordinator (first SIGTERM/SIGINT): refuse new requests, finish the accepted ones within
    ``timeout_s``, answer what is left with ``shutting_down``, then report ``Drained``."""

    TAG: ClassVar[str] = "drain_requested"
    timeout_s: float


@dataclass(frozen=True)
class Drained(Message):
    """Coordinator -> supervisor: no request is running or queued any more; the runtime may stop."""

    TAG: ClassVar[str] = "drained"


@dataclass(frozen=True)
class Ping(Message):
    """Asks a worker to answer; used for health and to measure a ZeroMQ round trip."""

    TAG: ClassVar[str] = "ping"
    nonce: int
    sent_ns: int


@dataclass(frozen=True)
class PingAnswered(Message):
    TAG: ClassVar[str] = "ping_answered"
    role: str
    nonce: int
    sent_ns: int


# ---------------------------------------------------------------- coordinator <-> loader
@dataclass(frozen=True)
class LoadExpert(Message):
    """Copy ``expert`` from the host store into ``slot``, chunk by chunk, from ``first_chunk`` on."""

    TAG: ClassVar[str] = "load_expert"
    load_id: LoadId
    expert: ExpertId
    slot: SlotId
    seq: int
    priority: int = PRIORITY_PRECISE
    first_chunk: int = 0


@dataclass(frozen=True)
class Preempt(Message):
    """Drop every queued (not yet copied) chunk of the given loads."""

    TAG: ClassVar[str] = "preempt"
    load_ids: list[LoadId]


@dataclass(frozen=True)
class Reorder(Message):
    """Make the given loads precise and move them, in the given order, to the front of the queue."""

    TAG: ClassVar[str] = "reorder"
    load_ids: list[LoadId]


@dataclass(frozen=True)
class ExpertLoaded(Message):
    """Every chunk of a load is in its slot (the slot table already says so)."""

    TAG: ClassVar[str] = "expert_loaded"
    load_id: LoadId
    expert: ExpertId
    slot: SlotId
    seq: int
    nbytes: int
    copy_ns: int


@dataclass(frozen=True)
class LoadsPreempted(Message):
    """The loader dropped these loads; ``chunks_done[i]`` chunks of ``load_ids[i]`` had already landed."""

    TAG: ClassVar[str] = "loads_preempted"
    load_ids: list[LoadId]
    chunks_done: list[int]


# ---------------------------------------------------------------- inference -> loader (CUDA path, once at start-up)
@dataclass(frozen=True)
class SlotsExported(Message):
    """The inference worker's GPU cache slots, exported by CUDA IPC: the fields of torch's
    ``UntypedStorage._share_cuda_()`` tuple, one typed field each (no pickle), plus the geometry to check them by.

    The loader rebuilds the storage with ``UntypedStorage._new_shared_cuda`` over these eight values in this order.
    """

    TAG: ClassVar[str] = "slots_exported"
    device: int
    """CUDA device index of the allocation."""
    handle: bytes
    """``cudaIpcMemHandle_t`` of the caching allocator's block that holds the slots."""
    storage_nbytes: int
    """Bytes of the slots' storage."""
    storage_offset_nbytes: int
    """Where the storage begins inside that block."""
    ref_counter_handle: bytes
    """Name of torch's shared reference-counter file for this export."""
    ref_counter_offset: int
    """This export's counter in that file."""
    event_handle: bytes
    """``cudaIpcEventHandle_t`` recorded after the producer's last write before export."""
    event_sync_required: bool
    """Whether the loader must wait on that event before touching the slots."""
    n_slots: int
    """Rows of the slot array."""
    slot_numel: int
    """Elements per slot (one expert)."""
    dtype: str
    """Slot dtype (a name of ``shm.layout.DTYPES``)."""


# ---------------------------------------------------------------- coordinator <-> inference
@dataclass(frozen=True)
class StartGeneration(Message):
    """Run one request on the inference worker (prompt as text or as token ids)."""

    TAG: ClassVar[str] = "start_generation"
    request_id: RequestId
    max_new_tokens: int
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False
    stop_ids: list[int] | None = None
    """Generation ends (finish_reason "stop") right after any of these ids is generated."""


@dataclass(frozen=True)
class CancelGeneration(Message):
    """Stop request ``request_id``: from a client to the coordinator (a queued or running request of its own), and
    from the coordinator to the inference worker, one-way, which checks its inbox for it between tokens."""

    TAG: ClassVar[str] = "cancel_generation"
    request_id: RequestId


@dataclass(frozen=True)
class GateDecided(Message):
    """The gate of ``layer`` chose ``experts`` for step ``step`` (0 = prefill); they are pinned until computed.

    ``ready_experts``: the layer's experts that were fully in the cache when the gate decided (FetchRate is judged on
    them, not on what the coordinator finds later).
    """

    TAG: ClassVar[str] = "gate_decided"
    request_id: RequestId
    step: int
    layer: int
    experts: list[ExpertId]
    ready_experts: list[ExpertId]
    sent_ns: int


@dataclass(frozen=True)
class ExpertsReleased(Message):
    """The inference worker finished with these experts; sent only while the coordinator waits for a slot."""

    TAG: ClassVar[str] = "experts_released"
    experts: list[ExpertId]


@dataclass(frozen=True)
class TokenGenerated(Message):
    TAG: ClassVar[str] = "token_generated"
    request_id: RequestId
    index: int
    token_id: int
    text: str = ""
    """Text completed by this token (empty while a multi-byte character is still incomplete)."""


@dataclass(frozen=True)
class GenerationFinished(Message):
    """Inference-side result and metrics of one request."""

    TAG: ClassVar[str] = "generation_finished"
    request_id: RequestId
    token_ids: list[int]
    text: str | None
    prompt_tokens: int
    ttft_ms: float
    tpot_ms: float
    stall_ms: float
    expert_uses: int
    expert_hits: int
    finish_reason: str


@dataclass(frozen=True)
class GenerationFailed(Message):
    TAG: ClassVar[str] = "generation_failed"
    request_id: RequestId
    code: str
    message: str


# ---------------------------------------------------------------- inference -> predictor -> coordinator
@dataclass(frozen=True)
class HiddenStateWritten(Message):
    """The input of MoE layer ``layer`` at step ``step`` is in the hidden-state exchange (``n_tokens`` rows)."""

    TAG: ClassVar[str] = "hidden_state_written"
    request_id: RequestId
    step: int
    layer: int
    n_tokens: int


@dataclass(frozen=True)
class GateRouted(Message):
    """Inference -> predictor (``--routing-predictor``), one-way at every gate: the gate of MoE layer ``layer`` at
    step ``step`` routed the step's last ``len(token_ids)`` tokens (at most ``workers.routing_live.KEEP_TOKENS``)."""

    TAG: ClassVar[str] = "gate_routed"
    request_id: RequestId
    step: int
    layer: int
    n_tokens: int
    """Tokens in the step (the prompt's length at step 0, else 1)."""
    token_ids: list[int]
    """The model's ids of the step's last tokens, oldest first."""
    experts: list[list[int]]
    """``[len(token_ids)][top_k]`` the experts (local to the layer) the gate chose for each of them."""


@dataclass(frozen=True)
class ExpertsPredicted(Message):
    """The predictor expects the gate of MoE layer ``layer`` at step ``step`` to choose ``experts``."""

    TAG: ClassVar[str] = "experts_predicted"
    request_id: RequestId
    step: int
    layer: int
    experts: list[ExpertId]
    probabilities: list[float] | None = None
    """The predictor's probability of each of ``experts`` (None: it gives none; the policy uses its precision)."""


@dataclass(frozen=True)
class OutlookPredicted(Message):
    """Predictor -> coordinator (``--routing-predictor``), one-way: the probability that the gate of MoE layer
    ``layer`` at step ``step`` chooses each of the layer's experts (the policy ranks resident experts with it)."""

    TAG: ClassVar[str] = "outlook_predicted"
    request_id: RequestId
    step: int
    layer: int
    probabilities: list[float]
    """``[experts_per_layer]``, by local expert id."""


# ---------------------------------------------------------------- client <-> coordinator
@dataclass(frozen=True)
class Generate(Message):
    """Client request: generate up to ``max_new_tokens`` tokens after ``prompt`` or ``prompt_ids``."""

    TAG: ClassVar[str] = "generate"
    max_new_tokens: int = 32
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    chat: bool = False
    """Wrap ``prompt`` as one user message in the checkpoint's chat template."""
    stop_ids: list[int] | None = None
    """Stop right after generating any of these ids (the id is included; finish_reason "stop")."""
    deadline_s: float | None = None
    """Seconds from arrival until the request is abandoned (queued or running) with ``deadline_exceeded``."""


@dataclass(frozen=True)
class GenerationQueued(Message):
    """First reply to an accepted ``Generate``: its id (to cancel it) and how many requests wait before it."""

    TAG: ClassVar[str] = "generation_queued"
    request_id: RequestId
    position: int


@dataclass(frozen=True)
class GenerationStarted(Message):
    """The request left the queue and runs on the inference worker."""

    TAG: ClassVar[str] = "generation_started"
    request_id: RequestId


@dataclass(frozen=True)
class GenerationCancelled(Message):
    """Reply to ``CancelGeneration``: the request is out of the queue, or stops at its next token; the request
    itself then ends with an ``error`` of code ``cancelled``."""

    TAG: ClassVar[str] = "generation_cancelled"
    request_id: RequestId


@dataclass(frozen=True)
class TokenStreamed(Message):
    """Sent to a client that asked for ``stream``, once per generated token, before the final reply."""

    TAG: ClassVar[str] = "token_streamed"
    request_id: RequestId
    index: int
    token_id: int
    text: str = ""
    """Text completed by this token; the concatenation over a request is its text."""


@dataclass(frozen=True)
class GenerationDone(Message):
    """Final reply to ``Generate``: the generated ids (prompt excluded), the text, and the metrics."""

    TAG: ClassVar[str] = "generation_done"
    request_id: RequestId
    token_ids: list[int]
    text: str | None
    finish_reason: str
    metrics: dict[str, float | int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class GetHealth(Message):
    TAG: ClassVar[str] = "get_health"


@dataclass(frozen=True)
class HealthReported(Message):
    TAG: ClassVar[str] = "health_reported"
    workers: dict[str, bool]
    queued: int
    running: int | None
    round_trip_us: dict[str, float]
    restarts: dict[str, int] = field(default_factory=dict)
    """Role -> times the supervisor restarted it since start."""
    draining: bool = False
    """True once the runtime was asked to stop: new requests are refused with ``shutting_down``."""


@dataclass(frozen=True)
class GetStats(Message):
    """Ask for the totals since start."""

    TAG: ClassVar[str] = "get_stats"


@dataclass(frozen=True)
class StatsReported(Message):
    """Totals since start: requests, tokens, hit rate, stall, loads, bytes, waste, prediction quality, link use."""

    TAG: ClassVar[str] = "stats_reported"
    totals: dict[str, float | int | None]


@dataclass(frozen=True)
class ConfigureCache(Message):
    """Client request (an operator's): between requests, switch the cache policy, the number of cache slots in use
    (at most those allocated at start) and the promoe mechanisms. The cache is emptied; nothing else is reset
    (totals, the queue, the workers). A field left nil keeps its current value."""

    TAG: ClassVar[str] = "configure_cache"
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


@dataclass(frozen=True)
class CacheConfigured(Message):
    """Reply to ``ConfigureCache``: the configuration now in force (the cache is empty)."""

    TAG: ClassVar[str] = "cache_configured"
    policy: str
    cache_experts: int
    max_cache_experts: int
    """Slots allocated at start: the most ``cache_experts`` may be."""
    early_preemption: bool
    reordered_inference: bool
    chunked_loads: bool
    prefetch: bool


@dataclass(frozen=True)
class ConfigureInference(Message):
    """Coordinator -> inference worker, between requests (after ``ConfigureCache``, or after a restart)."""

    TAG: ClassVar[str] = "configure_inference"
    hidden_states: bool
    """Feed the predictor at each MoE layer (its input, or with ``--routing-predictor`` the gate's routing; only
    while predictions drive loads)."""
    reordered_inference: bool
    """Compute experts as they become ready."""


@dataclass(frozen=True)
class ConfigureLoader(Message):
    """Coordinator -> loader, between requests (after ``ConfigureCache``, or after a restart)."""

    TAG: ClassVar[str] = "configure_loader"
    chunked_loads: bool
    """Read the inbox between chunks (False: between whole experts only)."""


@dataclass(frozen=True)
class ErrorReported(Message):
    """The request could not be served; ``code`` is machine-readable, ``message`` says why."""

    TAG: ClassVar[str] = "error"
    code: str
    message: str
    request_id: RequestId | None = None


ALL_MESSAGES: tuple[type[Message], ...] = (
    WorkerStarted,
    WorkerDied,
    WorkerRestarted,
    WorkerSilent,
    DrainRequested,
    Drained,
    Ping,
    PingAnswered,
    LoadExpert,
    Preempt,
    Reorder,
    ExpertLoaded,
    LoadsPreempted,
    SlotsExported,
    StartGeneration,
    CancelGeneration,
    GateDecided,
    ExpertsReleased,
    TokenGenerated,
    GenerationFinished,
    GenerationFailed,
    HiddenStateWritten,
    GateRouted,
    ExpertsPredicted,
    OutlookPredicted,
    Generate,
    GenerationQueued,
    GenerationStarted,
    GenerationCancelled,
    TokenStreamed,
    GenerationDone,
    GetHealth,
    HealthReported,
    GetStats,
    StatsReported,
    ConfigureCache,
    CacheConfigured,
    ConfigureInference,
    ConfigureLoader,
    ErrorReported,
)
