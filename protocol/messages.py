"""Every message that crosses a process boundary, defined once: the internal ones here, the client protocol in
``protocol.client_messages``, their shared base and ranges in ``protocol.schema``; ``ALL_MESSAGES`` lists them all.

On the wire a message is a msgpack map ``{"v": PROTOCOL_VERSION, "type": TAG, **fields}``; ``protocol.codec``
encodes and decodes it. Commands are verb-noun (``LoadExpert``), events past tense (``ExpertLoaded``). Big
tensors never ride these messages: they live in ``shm/`` and messages carry expert and slot numbers.
"""

from __future__ import annotations

from protocol.client_messages import (
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
    StatsReported,
    TokenStreamed,
)
from protocol.ids import ExpertId, LoadId, RequestId, SlotId
from protocol.schema import PROTOCOL_VERSION as PROTOCOL_VERSION
from protocol.schema import Message, PromptIds, PromptText, SamplingParams

PRIORITY_PRECISE = 0
"""Load priority of experts the gate has chosen (misses): served before any speculative load."""
PRIORITY_SPECULATIVE = 1
"""Load priority of predicted experts (prefetches)."""


# ---------------------------------------------------------------- lifecycle (every worker)
class WorkerStarted(Message):
    """A process finished start-up and serves its inbox."""

    role: str
    pid: int


class WorkerAlive(Message):
    """Gateway -> supervisor, every ``ALIVE_INTERVAL_S``, sent from its event loop: the loop runs (the coordinator
    pings the workers; the gateway is a client, so the supervisor watches it by these instead)."""

    role: str
    pid: int


ALIVE_INTERVAL_S = 1.0


class WorkerDied(Message):
    """Supervisor -> coordinator: ``role`` exited (``exit_code``, negative for a signal); it is being restarted."""

    role: str
    pid: int
    exit_code: int


class WorkerRestarted(Message):
    """Supervisor -> coordinator: the restarted ``role`` reported ready (it attached to the same shared memory)."""

    role: str
    pid: int


class WorkerSilent(Message):
    """Coordinator -> supervisor: ``role`` answered no ping for ``silent_s``: kill it (it is then restarted)."""

    role: str
    silent_s: float


class DrainRequested(Message):
    """Supervisor -> coordinator (first SIGTERM/SIGINT): refuse new requests, finish the accepted ones within
    ``timeout_s``, answer what is left with ``shutting_down``, then report ``Drained``."""

    timeout_s: float


class Drained(Message):
    """Coordinator -> supervisor: no request is running or queued any more; the runtime may stop."""



class Ping(Message):
    """Asks a worker to answer; used for health and to measure a ZeroMQ round trip."""

    nonce: int
    sent_ns: int


class PingAnswered(Message):
    role: str
    nonce: int
    sent_ns: int


# ---------------------------------------------------------------- coordinator <-> loader
class LoadExpert(Message):
    """Copy ``expert`` from the host store into ``slot``, chunk by chunk, from ``first_chunk`` on."""

    load_id: LoadId
    expert: ExpertId
    slot: SlotId
    seq: int
    priority: int = PRIORITY_PRECISE
    first_chunk: int = 0


class Preempt(Message):
    """Drop every queued (not yet copied) chunk of the given loads."""

    load_ids: list[LoadId]


class Reorder(Message):
    """Make the given loads precise and move them, in the given order, to the front of the queue."""

    load_ids: list[LoadId]


class ExpertLoaded(Message):
    """Every chunk of load ``load_id`` (the slot's load with sequence number ``seq``) is in its slot (the slot table
    already says so); the coordinator knows the rest from the load id."""

    load_id: LoadId
    seq: int
    copy_ns: int = 0
    """Time the loader spent copying this load's chunks (the link's time, not the queue's; 0: not measured)."""
    copied_nbytes: int = 0
    """Bytes this load copied over the link (its chunks from ``first_chunk`` on)."""


class ComputeExpert(Message):
    """Compute ``expert`` on the host for the gate of MoE layer ``layer`` at step ``step`` (``--host-compute``):
    its input is in the host exchange's record of ``layer``, its output goes to the record (``layer``, ``index``),
    ``index`` being its place among the gate's chosen experts in ascending order. Dropped if the input record no
    longer holds (``request_id``, ``step``)."""

    request_id: RequestId
    layer: int
    step: int
    expert: ExpertId
    index: int


class ExpertComputed(Message):
    """Loader -> coordinator: ``expert`` was computed on the host for ``n_tokens`` tokens in ``duration_ns`` (from
    reading its input to its output written)."""

    request_id: RequestId
    expert: ExpertId
    n_tokens: int
    duration_ns: int


class LoadsPreempted(Message):
    """The loader dropped these loads; ``chunks_done[i]`` chunks of ``load_ids[i]`` had already landed."""

    load_ids: list[LoadId]
    chunks_done: list[int]


# ---------------------------------------------------------------- inference -> loader (CUDA path, once at start-up)
class SlotsExported(Message):
    """The inference worker's GPU cache slots, exported by CUDA IPC: the fields of torch's
    ``UntypedStorage._share_cuda_()`` tuple, one typed field each (no pickle), plus the geometry to check them by.

    The loader rebuilds the storage with ``UntypedStorage._new_shared_cuda`` over these eight values in this order.
    """

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
    """Elements per slot (one expert; quantized experts: its bytes)."""
    dtype: str
    """Slot dtype (a name of ``shm.layout.DTYPE_NBYTES``, or ``uint8`` for quantized experts)."""


# ---------------------------------------------------------------- coordinator <-> inference (also: CancelGeneration,
# TokenStreamed, in protocol.client_messages)
class StartGeneration(Message):
    """Run one request on the inference worker (prompt as text or as token ids; exactly one of them)."""

    request_id: RequestId
    params: SamplingParams
    prompt: PromptText | None = None
    prompt_ids: PromptIds | None = None
    chat: bool = False


class GateDecided(Message):
    """The gate of ``layer`` chose ``experts`` for step ``step`` (0 = prefill); they are pinned until computed.

    ``ready_experts``: the layer's experts that were fully in the cache when the gate decided (FetchRate is judged on
    them, not on what the coordinator finds later).
    """

    request_id: RequestId
    step: int
    layer: int
    experts: list[ExpertId]
    ready_experts: list[ExpertId]
    sent_ns: int
    request_ids: list[RequestId] = []
    """The requests whose tokens the step serves (``--max-batch`` > 1; ``request_id`` then keys the batch's routing:
    it is its first request's id); empty: ``request_id`` alone."""
    n_tokens: int = 1
    """Tokens in the step."""
    host_input: bool = False
    """The layer's input and routing are in the host exchange: its missing experts may be computed on the host."""
    device_ns: int = 0
    """Time the worker spent computing experts from the slots since its previous gate report."""
    device_experts: int = 0
    """Experts it computed from the slots in that time."""


class ExpertsReleased(Message):
    """The inference worker finished with these experts; sent only while the coordinator waits for a slot."""

    experts: list[ExpertId]


class GenerationFinished(Message):
    """Inference-side result and metrics of one request."""

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
    host_experts: int = 0
    """Expert uses served by an output computed on the host (``--host-compute``)."""


class GenerationFailed(Message):
    request_id: RequestId
    code: str
    message: str


# ---------------------------------------------------------------- inference -> predictor -> coordinator
class HiddenStateWritten(Message):
    """The input of MoE layer ``layer`` at step ``step`` is in the hidden-state exchange (``n_tokens`` rows)."""

    request_id: RequestId
    step: int
    layer: int
    n_tokens: int


class GateRouted(Message):
    """Inference -> predictor (``--routing-predictor``), one-way at every gate: the gate of MoE layer ``layer`` at
    step ``step`` routed the step's last ``len(token_ids)`` tokens (at most ``workers.routing_live.KEEP_TOKENS``)."""

    request_id: RequestId
    step: int
    layer: int
    n_tokens: int
    """Tokens in the step (the prompt's length at step 0, else 1)."""
    token_ids: list[int]
    """The model's ids of the step's last tokens, oldest first."""
    experts: list[list[int]]
    """``[len(token_ids)][top_k]`` the experts (local to the layer) the gate chose for each of them."""


class BatchRouted(Message):
    """Inference -> predictor (``--routing-predictor`` with the step loop), one-way at every gate of a forward pass
    of several requests: per row, the row's last tokens of the pass (at most ``workers.routing_live.KEEP_TOKENS``)
    and what the gate chose for them. Predictions for the pass go out under ``request_id`` (the batch's key) and
    ``step`` (the pass), as the gate reports do."""

    request_id: RequestId
    step: int
    layer: int
    requests: list[RequestId]
    """The request of each row."""
    positions: list[int]
    """Per row, the position in its request (prompt and generated tokens) of its first token reported here."""
    n_tokens: list[int]
    """Per row, its tokens in the pass (a prefill chunk's length, or 1 when decoding)."""
    token_ids: list[list[int]]
    """Per row, the model's ids of its reported tokens, oldest first."""
    experts: list[list[list[int]]]
    """Per row, ``[len(token_ids[row])][top_k]`` the experts (local to the layer) the gate chose for each token."""


class ExpertsPredicted(Message):
    """The predictor expects the gate of MoE layer ``layer`` at step ``step`` to choose ``experts``."""

    request_id: RequestId
    step: int
    layer: int
    experts: list[ExpertId]
    probabilities: list[float] | None = None
    """The predictor's probability of each of ``experts`` (None: it gives none; the policy uses its precision)."""


class OutlookPredicted(Message):
    """Predictor -> coordinator (``--routing-predictor``), one-way: the probability that the gate of MoE layer
    ``layer`` at step ``step`` chooses each of the layer's experts (the policy ranks resident experts with it)."""

    request_id: RequestId
    step: int
    layer: int
    probabilities: list[float]
    """``[experts_per_layer]``, by local expert id."""


class ConfigureInference(Message):
    """Coordinator -> inference worker, between requests (after ``ConfigureCache``, or after a restart)."""

    hidden_states: bool
    """Feed the predictor at each MoE layer (its input, or with ``--routing-predictor`` the gate's routing; only
    while predictions drive loads)."""
    reordered_inference: bool
    """Compute experts as they become ready."""
    host_inputs: bool = False
    """Publish small steps' MoE inputs for host compute (only where the runtime started with it on; off under
    ``never``: on a GPU each publication is a device-to-host copy per layer)."""


class ConfigureLoader(Message):
    """Coordinator -> loader, between requests (after ``ConfigureCache``, or after a restart)."""

    chunked_loads: bool
    """Read the inbox between chunks (False: between whole experts only)."""


ALL_MESSAGES: tuple[type[Message], ...] = (
    WorkerStarted,
    WorkerDied,
    WorkerRestarted,
    WorkerSilent,
    WorkerAlive,
    DrainRequested,
    Drained,
    Ping,
    PingAnswered,
    LoadExpert,
    Preempt,
    Reorder,
    ExpertLoaded,
    LoadsPreempted,
    ComputeExpert,
    ExpertComputed,
    SlotsExported,
    StartGeneration,
    GateDecided,
    ExpertsReleased,
    GenerationFinished,
    GenerationFailed,
    HiddenStateWritten,
    GateRouted,
    BatchRouted,
    ExpertsPredicted,
    OutlookPredicted,
    ConfigureInference,
    ConfigureLoader,
    Generate,
    GenerationQueued,
    GenerationStarted,
    GenerationCancelled,
    CancelGeneration,
    TokenStreamed,
    GenerationDone,
    GetHealth,
    HealthReported,
    GetStats,
    StatsReported,
    ConfigureCache,
    CacheConfigured,
    DescribeCache,
    CacheDescribed,
    ErrorReported,
)
"""Every message type of the protocol (``protocol.codec`` decodes exactly these)."""
for _cls in ALL_MESSAGES:
    _cls.TAG = str(_cls.__struct_config__.tag)
