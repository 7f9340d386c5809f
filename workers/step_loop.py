"""Continuous batching in the inference worker (``--max-batch N`` > 1): a step loop instead of one ``generate()`` per
request.

Every iteration of the loop takes what the inbox holds (new requests, cancels, pings), admits waiting requests while
the batch has room, prefills the next chunks of the admitted prompts together in one forward pass (batched prefill:
``--prefill-chunk`` tokens for all its rows together, each row's past left-padded and its chunk right-padded, the
padding hidden by the attention mask and routed to no expert; ``workers/batch_cache.py``), then decodes one token
for every running request in another forward pass: a ``DynamicCache`` of the running sequences, each left-padded to
the longest, with an attention mask that hides the padding and each row's own positions. transformers computes the
attention (no attention is written here); the experts backend sees the union of the pass's routing, so one gate
report, one pin set and one load serve every row routed to an expert, in a prefill as in a decode step.

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
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

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
from workers.batch_cache import assemble, cut, prefill_inputs
from workers.bootstrap import IDLE_POLL_S, send
from workers.kv_memory import KvBudget
from workers.offloaded_experts import LayerStats
from workers.routing_live import PassRow
from workers.sequence import Sequence, logits_processors

if TYPE_CHECKING:
    from collections.abc import Callable

    from workers.inference import InferenceWorker

log = logging.getLogger(__name__)


class StepLoop:
    """The inference worker's serve loop with ``--max-batch`` > 1 (see the module docstring)."""

    def __init__(self, worker: InferenceWorker, max_batch: int, prefill_chunk: int,
                 on_configure: Callable[[ConfigureInference], None],
                 kv_budget: Callable[[], KvBudget] | None = None) -> None:
        self.worker = worker
        self.max_batch = max_batch
        self.kv_budget = kv_budget
        """Measures what the batch's keys and values may take, once, when the first request needs it (None:
        ``max_batch`` alone decides)."""
        self.kv: KvBudget | None = None
        self.next_up: Sequence | None = None
        """The first waiting request, validated, held back until the batch's memory has room for it."""
        self.waiting: list[tuple[StartGeneration, int]] = []
        """Requests received, not yet admitted (with when they arrived)."""
        self.running: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.cache_rows: list[RequestId] = []
        """The requests of the rows of ``cache``, in order."""
        self.mask: torch.Tensor | None = None
        """``[rows, cache length]``: 0 on each row's left padding."""
        self.cancelled_waiting: set[RequestId] = set()
        self.prefilling: list[Sequence] = []
        """Admitted requests whose prompts are being prefilled, in the order they were admitted."""
        self.prefill_chunk_tokens = prefill_chunk
        """Prompt tokens prefilled per iteration, all rows of the prefill pass together."""
        self.dispatch = Dispatcher("inference", {
            StartGeneration: self.on_start_generation, CancelGeneration: self.on_cancel_generation,
            Ping: worker.sockets.answer_ping, ConfigureInference: on_configure})

    # ------------------------------------------------------------ the loop
    def serve(self) -> None:
        inbox = self.worker.sockets.inbox
        while True:
            busy = bool(self.running or self.prefilling or self.waiting or self.next_up)
            msg = inbox.poll(0 if busy else IDLE_POLL_S)
            while msg is not None:
                self.dispatch(msg)
                msg = inbox.poll(0)
            self.run_step()

    def run_step(self) -> None:
        """Admit waiting requests while the batch has room, prefill the next chunks of the admitted ones in one
        forward pass, then decode one token for every running one in another."""
        while len(self.running) + len(self.prefilling) < self.max_batch:
            seq = self.next_up or self.next_waiting()
            if seq is None:
                break
            if not self.fits(seq):
                self.next_up = seq  # the batch's memory is full: it goes first once a request leaves
                break
            self.next_up = None
            self.admit(seq)
        if self.prefilling:
            self.prefill()
        self.end_finished()
        if self.running:
            self.decode()
            self.end_finished()

    def on_start_generation(self, msg: StartGeneration) -> None:
        self.waiting.append((msg, time.perf_counter_ns()))

    def on_cancel_generation(self, msg: CancelGeneration) -> None:
        """The request stops before the next step (one not prefilled yet ends with no tokens)."""
        for seq in [*self.running, *self.prefilling, *([self.next_up] if self.next_up else [])]:
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

    def next_waiting(self) -> Sequence | None:
        """The first waiting request that is valid and not cancelled, as a sequence (None: none is left). A request
        refused here fails alone; one cancelled while it waited ends with no tokens."""
        from workers.inference import BadRequest

        while self.waiting:
            msg, received_ns = self.waiting.pop(0)
            try:
                seq = self.new_sequence(msg, received_ns)
            except BadRequest as exc:
                self.cancelled_waiting.discard(msg.request_id)
                send(self.worker.send_to_coordinator,
                     GenerationFailed(request_id=msg.request_id, code=exc.code, message=str(exc)))
                continue
            if seq.request_id in self.cancelled_waiting:
                self.cancelled_waiting.discard(seq.request_id)
                seq.cancelled = True
            return seq
        return None

    def fits(self, seq: Sequence) -> bool:
        """Whether the batch's keys and values fit in memory with ``seq`` (``workers.kv_memory``); a cancelled one
        takes no room."""
        if self.kv_budget is None or seq.cancelled:
            return True
        if self.kv is None:
            self.kv = self.kv_budget()
            log.info("step loop: up to %d requests together while their keys and values fit in %.2f GB (%d bytes "
                     "per token: %d requests of 2048 tokens)", self.max_batch, self.kv.budget_bytes / 1e9,
                     self.kv.bytes_per_token, self.kv.rows_of(2048))
        rows = [*self.running, *self.prefilling, seq]
        return self.kv.admits([len(r.prompt_ids) + r.max_new_tokens for r in rows])

    def admit(self, seq: Sequence) -> None:
        """Queue ``seq`` for prefill (a cancelled one ends here, with no tokens)."""
        if seq.cancelled:
            self.report(self.finished(seq, "cancelled"))
            return
        if not self.running and not self.prefilling:  # a new batch: its routing is keyed by its first request
            self.worker.backend.begin_request(seq.request_id)
        self.prefilling.append(seq)

    def prefill(self) -> None:
        """The next chunks of the admitted prompts in one forward pass: the rows in the order they were admitted,
        each taking as much of its prompt as is left of the ``prefill_chunk`` tokens budget (so a long prompt takes
        the whole budget, and the pass holds the batch's decoding up by at most that many tokens). Each row's
        past is left-padded and its chunk right-padded (``workers.batch_cache``); the padding goes to no expert. A
        row whose prompt is done gets its first token and joins the batch."""
        for seq in [seq for seq in self.prefilling if seq.cancelled]:
            self.prefilling.remove(seq)
            self.report(self.finished(seq, "cancelled"))
        budget = self.prefill_chunk_tokens
        taken: list[tuple[Sequence, list[int]]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            chunk = seq.prompt_ids[seq.length:seq.length + budget]
            taken.append((seq, chunk))
            budget -= len(chunk)
        if not taken:
            return
        rows = [seq for seq, _ in taken]
        inputs = prefill_inputs([seq.kv for seq in rows], [seq.length for seq in rows], [c for _, c in taken],
                                self.worker.model.config, self.worker.device)
        logits = self.forward(rows, inputs.real_tokens, [chunk for _, chunk in taken], input_ids=inputs.input_ids,
                              attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                              cache=inputs.cache, logits_to_keep=inputs.last_positions)
        if logits is None:
            return
        for row, (seq, chunk) in enumerate(taken):
            seq.kv = cut(inputs.cache, row, inputs.past_width - seq.length, inputs.past_width + len(chunk))
            seq.length += len(chunk)
            if seq.length == len(seq.prompt_ids):
                self.prefilling.remove(seq)
                self.running.append(seq)
                self.take_token(seq, logits[row, -1])

    def decode(self) -> None:
        rows = self.running
        if [seq.request_id for seq in rows] != self.cache_rows:
            self.rebuild()
        assert self.cache is not None and self.mask is not None
        device = self.worker.device
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=self.mask.dtype, device=device)], dim=1)
        input_ids = torch.tensor([[seq.generated[-1]] for seq in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[seq.length] for seq in rows], dtype=torch.long, device=device)
        logits = self.forward(rows, None, [[seq.generated[-1]] for seq in rows], input_ids=input_ids,
                              attention_mask=self.mask, position_ids=positions,
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
            for row, request_id in enumerate(self.cache_rows):
                seq = by_id.get(request_id)
                if seq is not None and seq.kv is None:
                    seq.kv = cut(self.cache, row, width - seq.length, width)
        self.cache, self.mask = assemble([seq.kv for seq in self.running], [seq.length for seq in self.running],
                                         self.worker.model.config, self.worker.device)
        for seq in self.running:
            seq.kv = None
        self.cache_rows = [seq.request_id for seq in self.running]

    def forward(self, rows: list[Sequence], real_tokens: torch.Tensor | None, row_ids: list[list[int]],
                **inputs: Any) -> torch.Tensor | None:
        """One forward pass for ``rows`` (``real_tokens``: which of its tokens are not padding, None: all are;
        ``row_ids``: each row's real tokens, each row's chunk first in its padded row): their logits ``[rows, T, V]``,
        or None when it failed (every row in it failed and was reported)."""
        backend = self.worker.backend
        backend.request_ids = [seq.request_id for seq in rows]
        backend.real_tokens = real_tokens
        recorder, feed = self.worker.recorder, self.worker.feed
        if recorder is not None or feed is not None:  # which of the pass's tokens are whose (host arithmetic only)
            width = inputs["input_ids"].shape[1]  # [rows, width]
            tokens = [list(range(i * width, i * width + len(ids))) for i, ids in enumerate(row_ids)]
            if recorder is not None:
                recorder.begin_pass([(seq.request_id, torch.tensor(t)) for seq, t in zip(rows, tokens, strict=True)])
            if feed is not None:
                feed.begin_pass(RequestId(backend.request_id), [
                    PassRow(seq.request_id, seq.length, ids, t)
                    for seq, ids, t in zip(rows, row_ids, tokens, strict=True)])
        base_stall_ns = max(seq.stall_ns for seq in rows)  # the load deadline is each request's own waiting
        backend.stats = LayerStats(stall_ns=base_stall_ns)
        try:
            with torch.inference_mode():
                logits: torch.Tensor = self.worker.model(**inputs, use_cache=True).logits
        except Exception as exc:  # the rows fail; the worker and the other requests go on
            self.fail(rows, exc)
            return None
        finally:
            backend.real_tokens = None
            if feed is not None:
                feed.end_pass()
        stats = backend.stats
        for seq in rows:
            seq.uses += stats.uses / len(rows)
            seq.hits += stats.hits / len(rows)
            seq.host_experts += stats.host_experts / len(rows)
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
        from workers.inference import failure

        worker = self.worker
        worker.backend.table.clear_pins()
        code, message = failure(exc, f"requests {[seq.request_id for seq in rows]}")
        rows = list(rows)  # a decode's rows are ``self.running`` itself, emptied here
        for seq in rows:
            if seq in self.prefilling:  # by identity (``Sequence`` has no equality of its own)
                self.prefilling.remove(seq)
            else:
                self.running.remove(seq)
            send(worker.send_to_coordinator, GenerationFailed(request_id=seq.request_id, code=code, message=message))
            if worker.recorder is not None:
                worker.recorder.drop(seq.request_id)
        if any(seq.request_id in self.cache_rows for seq in rows):  # a decode: every row of the cache was in it
            self.cache, self.cache_rows, self.mask = None, [], None

    def finished(self, seq: Sequence, reason: str) -> GenerationFinished:
        if self.worker.recorder is not None:
            self.worker.recorder.end_sequence(seq.request_id, seq.prompt_ids, seq.generated)
        return self.worker.finished(seq.request_id, len(seq.prompt_ids), seq.generated, seq.received_ns, seq.streamer,
                                    reason, seq.stall_ns, round(seq.uses), round(seq.hits), round(seq.host_experts))

    def report(self, result: GenerationFinished) -> None:
        """Its pins are clear (between forward passes the backend holds none) before the result goes out."""
        self.worker.backend.table.clear_pins()
        send(self.worker.send_to_coordinator, result)
