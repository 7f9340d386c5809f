"""Continuous batching in the inference worker (``--max-batch N`` > 1): a step loop instead of one ``generate()`` per
request.

Every iteration of the loop takes what the inbox holds (new requests, cancels, pings), prefills at most one admitted
request (alone, in one forward pass of its own, so that its numbers are those of ``generate()``), then decodes one
token for every running request in one forward pass: a ``DynamicCache`` of the running sequences, each left-padded
to the longest, with an attention mask that hides the padding and each row's own positions. transformers computes
the attention (no attention is written here); the experts backend sees the union of the batch's routing, so one
gate report, one pin set and one load serve every row routed to an expert.

The batched cache is kept from step to step while the batch does not change (each step appends one column to every
row); when a request joins or leaves, each remaining row's unpadded keys and values are cut out and the cache is
built again. Why not transformers' own continuous batching (``ContinuousBatchingManager``): it runs its own thread
(the gate hooks and the worker's sockets belong to this one) and it takes one seed for all requests, where each of
ours has its own ``torch.Generator``.

Per request: its own sampling parameters, logits processors and generator (the same processors ``generate()``
builds from the checkpoint's generation config and the request's temperature and top-p, applied to that row alone),
stop ids, cancel (a ``CancelGeneration`` removes it before the next step: cancels, deadlines and vanished clients
all arrive so), streaming, TTFT and TPOT from its own tokens, and its share of each step's expert uses and hits (the
step's counts divided by the rows it served). Stall is the wait a request saw: every request of a step is charged
the whole wait of that step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from protocol.dispatch import Dispatcher
from protocol.ids import RequestId
from protocol.messages import (
    CancelGeneration,
    ConfigureInference,
    GenerationFailed,
    GenerationFinished,
    Ping,
    StartGeneration,
)
from workers.bootstrap import IDLE_POLL_S, send
from workers.offloaded_experts import LayerStats, LoadTimedOut

if TYPE_CHECKING:
    from collections.abc import Callable

    from workers.inference import InferenceWorker, TokenStreamer

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer: keys and values ``[1, heads, length, head_dim]`` of one sequence, unpadded."""


DEFAULT_TOP_K = 50
"""The top-k ``generate()`` samples with when the checkpoint's generation config leaves it unset (transformers'
default generation parameters)."""


def logits_processors(generation_config: GenerationConfig, temperature: float, top_p: float) -> LogitsProcessorList:
    """The processors ``generate()`` applies for these settings and the checkpoint's generation config, in its order
    (repetition penalty; then, when sampling, temperature, top-k, top-p, min-p)."""
    cfg = generation_config
    top_k = DEFAULT_TOP_K if cfg.top_k is None else cfg.top_k
    processors = LogitsProcessorList()
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if temperature > 0:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
        if cfg.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=cfg.min_p))
    return processors


@dataclass
class Sequence:
    """One request in the batch."""

    request_id: RequestId
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: set[int]
    processors: LogitsProcessorList
    generator: torch.Generator | None
    """Sampling: the request's own generator, seeded with its seed; None: greedy."""
    streamer: TokenStreamer
    received_ns: int
    generated: list[int] = field(default_factory=list)
    kv: KV | None = None
    prefill_cache: DynamicCache | None = None
    """While its prompt is prefilled chunk by chunk: its own cache."""
    """Its keys and values while it is not in the batched cache (after its prefill, or cut out at a rebuild)."""
    length: int = 0
    """Tokens in its cache."""
    cancelled: bool = False
    uses: float = 0.0
    hits: float = 0.0
    stall_ns: int = 0

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits ``[V]``, as ``generate()`` picks it."""
        scores = logits.to(dtype=torch.float32).unsqueeze(0)  # [1, V]
        if self.processors:
            ids = torch.tensor([self.prompt_ids + self.generated], dtype=torch.long, device=logits.device)
            scores = self.processors(ids, scores)  # type: ignore[arg-type]  # a LongTensor by dtype
        if self.generator is None:
            return int(torch.argmax(scores, dim=-1)[0])
        probs = F.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])

    @property
    def finish_reason(self) -> str | None:
        if self.cancelled:
            return "cancelled"
        if self.generated and self.generated[-1] in self.stop_ids:
            return "stop"
        if len(self.generated) >= self.max_new_tokens:
            return "length"
        return None


class StepLoop:
    """The inference worker's serve loop with ``--max-batch`` > 1 (see the module docstring)."""

    def __init__(self, worker: InferenceWorker, max_batch: int, prefill_chunk: int,
                 on_configure: Callable[[ConfigureInference], None]) -> None:
        self.worker = worker
        self.max_batch = max_batch
        self.waiting: list[tuple[StartGeneration, int]] = []
        """Requests received, not yet prefilled (with when they arrived)."""
        self.running: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.cache_rows: list[RequestId] = []
        """The requests of the rows of ``cache``, in order."""
        self.mask: torch.Tensor | None = None
        """``[rows, cache length]``: 0 on each row's left padding."""
        self.cancelled_waiting: set[RequestId] = set()
        self.prefilling: Sequence | None = None
        """The request whose prompt is being prefilled, ``prefill_chunk`` tokens a step."""
        self.prefill_chunk_tokens = prefill_chunk
        self.dispatch = Dispatcher("inference", {
            StartGeneration: self.on_start_generation, CancelGeneration: self.on_cancel_generation,
            Ping: worker.sockets.answer_ping, ConfigureInference: on_configure})

    # ------------------------------------------------------------ the loop
    def serve(self) -> None:
        inbox = self.worker.sockets.inbox
        while True:
            busy = bool(self.running or self.waiting)
            msg = inbox.poll(0 if busy else IDLE_POLL_S)
            while msg is not None:
                self.dispatch(msg)
                msg = inbox.poll(0)
            self.run_step()

    def run_step(self) -> None:
        """Prefill the next chunk of one admitted request (admitting a waiting one if none is being prefilled), then
        decode one token for every running one."""
        if self.prefilling is None and self.waiting and len(self.running) < self.max_batch:
            start, received_ns = self.waiting.pop(0)
            self.admit(start, received_ns)
        if self.prefilling is not None:
            self.prefill_chunk(self.prefilling)
        self.end_finished()
        if self.running:
            self.decode()
            self.end_finished()

    def on_start_generation(self, msg: StartGeneration) -> None:
        self.waiting.append((msg, time.perf_counter_ns()))

    def on_cancel_generation(self, msg: CancelGeneration) -> None:
        """The request stops before the next step (one not prefilled yet ends with no tokens)."""
        for seq in [*self.running, *([self.prefilling] if self.prefilling is not None else [])]:
            if seq.request_id == msg.request_id:
                seq.cancelled = True
        if any(start.request_id == msg.request_id for start, _ in self.waiting):
            self.cancelled_waiting.add(msg.request_id)

    # ------------------------------------------------------------ one request in, one out
    def new_sequence(self, msg: StartGeneration, received_ns: int) -> Sequence:
        """Validate the request and set up its sampling (raises ``BadRequest``)."""
        worker = self.worker
        ids = worker.prompt_ids(msg)
        params = msg.params
        generation_config = worker.model.generation_config
        stop_ids = worker.stop_ids(msg, generation_config.eos_token_id)
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
            generator = torch.Generator(device=worker.device).manual_seed(seed)
        streamer = worker.streamer(msg.request_id)
        streamer.prompt_seen = True
        return Sequence(msg.request_id, ids, params.max_new_tokens, stop_ids,
                        logits_processors(generation_config, params.temperature, params.top_p), generator, streamer,
                        received_ns)

    def admit(self, msg: StartGeneration, received_ns: int) -> None:
        """Start prefilling the request (alone: a request that fails here fails alone)."""
        from workers.inference import BadRequest

        try:
            seq = self.new_sequence(msg, received_ns)
        except BadRequest as exc:
            self.cancelled_waiting.discard(msg.request_id)
            send(self.worker.send_to_coordinator,
                 GenerationFailed(request_id=msg.request_id, code=exc.code, message=str(exc)))
            return
        if seq.request_id in self.cancelled_waiting:
            self.cancelled_waiting.discard(seq.request_id)
            seq.cancelled = True
            self.report(self.finished(seq, "cancelled"))
            return
        if not self.running:  # a new batch (nothing running or prefilling): its routing is keyed by its first request
            self.worker.backend.begin_request(seq.request_id)
        seq.prefill_cache = DynamicCache(config=self.worker.model.config)
        self.prefilling = seq

    def prefill_chunk(self, seq: Sequence) -> None:
        """The next ``prefill_chunk`` tokens of its prompt, in a forward pass of its own on its own cache; after
        the last, its first token, and it joins the batch."""
        if seq.cancelled:
            self.prefilling = None
            self.report(self.finished(seq, "cancelled"))
            return
        done = seq.length
        chunk = seq.prompt_ids[done:done + self.prefill_chunk_tokens]
        device = self.worker.device
        input_ids = torch.tensor([chunk], dtype=torch.long, device=device)
        attention_mask = torch.ones((1, done + len(chunk)), dtype=torch.long, device=device)
        logits = self.forward([seq], input_ids=input_ids, attention_mask=attention_mask, cache=seq.prefill_cache)
        if logits is None:
            return
        seq.length = done + len(chunk)
        if seq.length < len(seq.prompt_ids):
            return
        assert seq.prefill_cache is not None
        seq.kv = [(keys, values) for keys, values, *_ in seq.prefill_cache]
        seq.prefill_cache = None
        self.prefilling = None
        self.running.append(seq)
        self.take_token(seq, logits[0, -1])

    def decode(self) -> None:
        rows = self.running
        if [seq.request_id for seq in rows] != self.cache_rows:
            self.rebuild()
        assert self.cache is not None and self.mask is not None
        device = self.worker.device
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=self.mask.dtype, device=device)], dim=1)
        input_ids = torch.tensor([[seq.generated[-1]] for seq in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[seq.length] for seq in rows], dtype=torch.long, device=device)
        logits = self.forward(rows, input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                              cache=self.cache)
        if logits is None:
            return
        for i, seq in enumerate(rows):
            seq.length += 1
            self.take_token(seq, logits[i, -1])

    def rebuild(self) -> None:
        """Cut each row still running out of the batched cache and build the cache of the new batch."""
        if self.cache is not None:
            assert self.mask is not None
            width = self.mask.shape[1]
            by_id = {seq.request_id: seq for seq in self.running}
            layers = [(keys, values) for keys, values, *_ in self.cache]
            for row, request_id in enumerate(self.cache_rows):
                seq = by_id.get(request_id)
                if seq is not None and seq.kv is None:
                    pad = width - seq.length
                    seq.kv = [(k[row:row + 1, :, pad:], v[row:row + 1, :, pad:]) for k, v in layers]
        longest = max(seq.length for seq in self.running)
        data = []
        for layer in range(len(self.running[0].kv or ())):
            keys, values = [], []
            for seq in self.running:
                assert seq.kv is not None
                k, v = seq.kv[layer]
                keys.append(F.pad(k, (0, 0, longest - seq.length, 0)))
                values.append(F.pad(v, (0, 0, longest - seq.length, 0)))
            data.append((torch.cat(keys), torch.cat(values)))
        self.cache = DynamicCache(data, config=self.worker.model.config)
        self.mask = torch.zeros((len(self.running), longest), dtype=torch.long, device=self.worker.device)
        for row, seq in enumerate(self.running):
            self.mask[row, longest - seq.length:] = 1
            seq.kv = None
        self.cache_rows = [seq.request_id for seq in self.running]

    def forward(self, rows: list[Sequence], **inputs: Any) -> torch.Tensor | None:
        """One forward pass for ``rows``: their logits ``[rows, T, V]``, or None when it failed (every row in it
        failed and was reported)."""
        backend = self.worker.backend
        backend.request_ids = [seq.request_id for seq in rows]
        base_stall_ns = max(seq.stall_ns for seq in rows)  # the load deadline is each request's own waiting
        backend.stats = LayerStats(stall_ns=base_stall_ns)
        try:
            with torch.inference_mode():
                logits: torch.Tensor = self.worker.model(**inputs, use_cache=True).logits
        except Exception as exc:  # the rows fail; the worker and the other requests go on
            self.fail(rows, exc)
            return None
        stats = backend.stats
        for seq in rows:
            seq.uses += stats.uses / len(rows)
            seq.hits += stats.hits / len(rows)
            seq.stall_ns += stats.stall_ns - base_stall_ns
        return logits

    def take_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        token = seq.choose(logits)
        seq.generated.append(token)
        seq.streamer.put(torch.tensor([token]))

    def end_finished(self) -> None:
        for seq in list(self.running):
            reason = seq.finish_reason
            if reason is not None:
                self.running.remove(seq)
                self.report(self.finished(seq, reason))
        if not self.running:
            self.cache, self.cache_rows, self.mask = None, [], None

    def fail(self, rows: list[Sequence], exc: Exception) -> None:
        """Report each of ``rows`` failed; a failed decode takes the batched cache with it."""
        worker = self.worker
        worker.backend.table.clear_pins()
        if isinstance(exc, LoadTimedOut):
            log.error("requests %s: %s", [seq.request_id for seq in rows], exc)
            code, message = "load_timeout", str(exc)
        else:
            log.exception("requests %s failed", [seq.request_id for seq in rows], exc_info=exc)
            code, message = "internal", f"{type(exc).__name__}: {exc}"
        rows = list(rows)  # a decode's rows are ``self.running`` itself, emptied here
        for seq in rows:
            if seq is self.prefilling:
                self.prefilling = None
            else:
                self.running.remove(seq)
            send(worker.send_to_coordinator, GenerationFailed(request_id=seq.request_id, code=code, message=message))
        if any(seq.request_id in self.cache_rows for seq in rows):  # a decode: every row of the cache was in it
            self.cache, self.cache_rows, self.mask = None, [], None

    def finished(self, seq: Sequence, reason: str) -> GenerationFinished:
        worker = self.worker
        new_ids = seq.generated
        first = seq.streamer.first_ns or time.perf_counter_ns()
        last = seq.streamer.last_ns or first
        return GenerationFinished(
            request_id=seq.request_id,
            token_ids=new_ids,
            text=worker.tokenizer.decode(new_ids) if worker.tokenizer is not None else None,
            prompt_tokens=len(seq.prompt_ids),
            ttft_ms=(first - seq.received_ns) / 1e6,
            tpot_ms=(last - first) / 1e6 / max(len(new_ids) - 1, 1),
            stall_ms=seq.stall_ns / 1e6,
            expert_uses=round(seq.uses),
            expert_hits=round(seq.hits),
            finish_reason=reason,
        )

    def report(self, result: GenerationFinished) -> None:
        """Its pins are clear (between forward passes the backend holds none) before the result goes out."""
        self.worker.backend.table.clear_pins()
        send(self.worker.send_to_coordinator, result)
