"""The cache directory: which expert is in which slot, which loads are in flight, what waits for a slot.

The coordinator is its only owner. It writes assignments into the shared slot table (so the inference worker reads
readiness without asking) and turns gate reports and predictions into loader commands. What only the coordinator
reads (slot states, the free slots, the policy's ranking) lives here in the process, so that a gate costs O(k) and
finding a victim O(log n): no scan over all slots on the critical path.

Rules:
- an expert is never evicted while its slot is being loaded or while the inference worker has it pinned (chosen by
  the current gate and not yet computed). The pins are the worker's alone (the coordinator only reads them), and
  they are read only while a request may hold them: from ``forget_request`` (a failed request, or a dead worker's,
  whose pins stay until its successor clears them at start) to the next ``begin_request`` they are not;
- an expert predicted for a layer in the window (not yet reached) is evicted only by a precise load that finds
  nothing else, never by a speculative one;
- a speculative load never evicts an expert that a gate chose within the last token's worth of layers: with a
  cache near the working set those are the next token's hits, worth more than a guess;
- early preemption: when the gate of a layer reports, the speculative loads of that layer's experts it did not
  choose (and of layers already past) are preempted, and the chosen ones still in flight are made precise and put
  first, those with most chunks already landed first;
- a precise load that finds no slot preempts in-flight speculative loads (farthest target first) to free theirs.

Every event method only updates the directory and appends loader commands to ``outbox``; the coordinator sends
them, in order, with ``drain``.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from coordinator.cache_counters import CacheCounters, CacheLedger
from coordinator.policies import CachePolicy
from protocol.ids import ExpertId, LoadId, RequestId, SlotId
from protocol.messages import PRIORITY_PRECISE, PRIORITY_SPECULATIVE, LoadExpert, Message, Preempt, Reorder
from shm.layout import ExpertLayout
from shm.slot_table import SlotTable

log = logging.getLogger(__name__)

FREE = 0
"""Slot holds nothing."""
LOADING = 1
"""Slot is assigned; chunks are queued or being copied."""
RESIDENT = 2
"""Every chunk landed (the loader's ``ExpertLoaded`` has arrived)."""

Position = tuple[int, int]
"""(step, MoE layer): steps count tokens of a request (0 = prefill)."""


@dataclass
class InFlightLoad:
    load_id: LoadId
    expert: ExpertId
    slot: SlotId
    seq: int
    request_id: RequestId | None
    target: Position | None = None
    """For a speculative load, the position it was predicted for; None once precise."""


class CacheDirectory:
    def __init__(self, table: SlotTable, layout: ExpertLayout, policy: CachePolicy,
                 early_preemption: bool = True) -> None:
        self.table = table
        self.layout = layout
        self.ledger = CacheLedger()
        self.position: Position = (-1, -1)
        self._next_load_id = 1
        self._pins_held = True
        """Whether ``expert_pin`` may hold a running request's pins (see ``forget_request``)."""
        self.outbox: list[Message] = []
        self.reconfigure(policy, layout.n_slots, early_preemption)

    def drain(self) -> list[Message]:
        """The loader commands produced since the last call, in the order they must be sent."""
        out, self.outbox = self.outbox, []
        return out

    # ------------------------------------------------------------ configuration
    @property
    def idle(self) -> bool:
        """No load in flight or being preempted and nothing waiting: the cache may be reconfigured."""
        return not self._in_flight and not self._waiting

    def reconfigure(self, policy: CachePolicy, n_slots: int, early_preemption: bool) -> None:
        """Start over with ``policy`` on slots ``0 .. n_slots-1`` (at most the slots allocated): every expert is
        evicted. Only while ``idle``; counters are kept."""
        if not 1 <= n_slots <= self.layout.n_slots:
            raise ValueError(f"cache of {n_slots} slots outside 1 .. {self.layout.n_slots} (the slots allocated)")
        if getattr(self, "_in_flight", None) or getattr(self, "_waiting", None):
            raise RuntimeError("the cache can only be reconfigured while idle")
        self.policy = policy
        self.n_slots = n_slots
        """Slots in use: ``0 .. n_slots-1``."""
        self.early_preemption = early_preemption
        self._clear()

    def reset(self) -> None:
        """Forget every slot's content and every load in flight (a new inference worker allocated new slots, so what
        they held is gone); counters stay."""
        for expert in self._resident:
            self.policy.record_evict(expert)
        self._clear()

    def _clear(self) -> None:
        for slot in range(self.layout.n_slots):
            if self.table.slot_expert[slot] >= 0:
                self.table.release(SlotId(slot))
        self._slot_expert: list[int] = [-1] * self.layout.n_slots
        self._slot_state: list[int] = [FREE] * self.layout.n_slots
        self._slot_of: dict[ExpertId, SlotId] = {}
        self._free: list[SlotId] = [SlotId(s) for s in range(self.n_slots)]  # a heap: lowest slot first
        self._in_flight: dict[LoadId, InFlightLoad] = {}
        self._loading: dict[ExpertId, LoadId] = {}
        self._waiting: deque[ExpertId] = deque()
        self._unused_since_load: dict[ExpertId, RequestId | None] = {}
        """Speculatively loaded experts no gate has chosen since, and the request that loaded each."""
        self._protected: dict[ExpertId, Position] = {}
        self._predictions: dict[Position, set[ExpertId]] = {}
        self._preempting: set[LoadId] = set()
        self._last_chosen: dict[ExpertId, Position] = {}
        self._resident: set[ExpertId] = set()
        self.evicted_recently: deque[ExpertId] = deque(maxlen=self.n_slots)
        """The last evictions, oldest first (for ``DescribeCache``: one append per eviction, nothing more)."""
        self._host: set[ExpertId] = set()
        """The current gate's experts computed on the host: pinned by the worker, but never to be loaded for it."""
        self.table.waiting_for_slot = self._waiting_flag = False

    # ------------------------------------------------------------ queries
    @property
    def request_id(self) -> RequestId | None:
        """The running request (or the last one), whose share the ledger counts."""
        return self.ledger.request_id

    @property
    def counters(self) -> CacheCounters:
        """Totals since start."""
        return self.ledger.totals

    @property
    def request_counters(self) -> CacheCounters:
        """The current request's share."""
        return self.ledger.request

    def slot_of(self, expert: ExpertId) -> SlotId | None:
        return self._slot_of.get(expert)

    def slot_state(self, slot: SlotId) -> int:
        """``FREE``, ``LOADING`` or ``RESIDENT``."""
        return self._slot_state[slot]

    def resident_experts(self) -> list[ExpertId]:
        return sorted(self._resident)

    def loads_in_flight(self) -> list[InFlightLoad]:
        """Loads issued and not landed, those being preempted left out."""
        return [load for load in self._in_flight.values() if load.load_id not in self._preempting]

    def predicted_ahead(self) -> set[ExpertId]:
        """Experts of the predictions held for positions not yet reached."""
        return {e for target, experts in self._predictions.items() if target > self.position for e in experts}

    @property
    def waiting(self) -> list[ExpertId]:
        return list(self._waiting)

    def is_protected(self, expert: ExpertId) -> bool:
        target = self._protected.get(expert)
        return target is not None and target >= self.position

    def begin_request(self, request_id: RequestId) -> None:
        self.ledger.begin_request(request_id)
        self._pins_held = True
        self.position = (-1, -1)
        self._last_chosen.clear()
        self._protected.clear()
        self._predictions.clear()
        self._host.clear()

    # ------------------------------------------------------------ events
    def on_predicted(self, step: int, layer: int, experts: list[ExpertId],
                     probabilities: list[float] | None = None) -> None:
        """The predictor expects ``experts`` at (step, layer) (each with its probability, if given): load what is
        missing, speculatively, as far as the policy finds it worth what it would evict."""
        target = (step, layer)
        if not self.policy.prefetches or target <= self.position:
            return  # too late to help
        self._predictions[target] = set(experts)
        self.policy.record_prediction(target, experts, probabilities)
        for expert in experts:
            if self._protected.get(expert, (-1, -1)) < target:
                self._protected[expert] = target
        for expert in experts:
            if expert in self._loading:  # already on its way: it now serves the farther prediction too
                load = self._in_flight[self._loading[expert]]
                if load.target is not None and load.target < target:
                    load.target = target
            if expert in self._slot_of or expert in self._waiting:
                continue
            if not self.policy.admits(expert, target, len(self._in_flight)):
                continue  # the link is too busy for a guess this uncertain
            slot = self._take_slot(PRIORITY_SPECULATIVE, (expert, target))
            if slot is None:
                continue  # not worth a slot now; a less likely one behind it is not either, but is cheap to ask
            self._start_load(expert, slot, PRIORITY_SPECULATIVE, target)

    def on_outlook(self, step: int, layer: int, probabilities: np.ndarray) -> None:
        """The predictor's probability for every expert of ``layer`` at its gate of ``step``: ranks what is resident
        (loads nothing)."""
        if (step, layer) > self.position:
            self.policy.record_outlook((step, layer), probabilities)

    def on_gate(self, step: int, layer: int, experts: list[ExpertId], ready: list[ExpertId] | None = None,
                host: Collection[ExpertId] = ()) -> None:
        """The gate chose ``experts`` (now pinned by the inference worker): preempt, reorder, load what is missing.

        ``ready``: the layer's experts the worker saw fully landed when its gate decided (exact FetchRate); without
        it, readiness is read from the slot table now. ``host``: missing experts computed on the host (pinned by the
        worker like every chosen expert, until it has their output): each counts as a use but is not loaded for this
        gate, now or when a load of it is preempted (a load of it in flight goes on).
        """
        self.position = position = (step, layer)
        self._host = set(host)
        for expert in experts:
            self._last_chosen[expert] = position
            self._unused_since_load.pop(expert, None)
        chosen = set(experts)
        self._count_hits(chosen, ready)
        self.policy.record_use(experts, position, self._host)
        if self.policy.prefetches:
            self._score_prediction(chosen, ready)
            if self.early_preemption:
                self._preempt_speculation(chosen)
        if not self.policy.keeps_experts:
            for expert in sorted(self._resident - chosen):
                if not self.is_pinned(expert):
                    self._evict(self._slot_of[expert])
        for expert in experts:
            if expert not in self._slot_of and expert not in self._waiting and expert not in host:
                self._waiting.append(expert)
        self._assign_waiting()

    def on_loaded(self, load_id: LoadId, seq: int) -> None:
        load = self._in_flight.pop(load_id, None)
        self._preempting.discard(load_id)
        if load is None:
            log.warning("ExpertLoaded for unknown load %d", load_id)
            return
        del self._loading[load.expert]
        if self.table.is_current(load.slot, seq):
            self._slot_state[load.slot] = RESIDENT
            self._resident.add(load.expert)
            self.ledger.charge(load.request_id, experts_loaded=1, bytes_loaded=self.layout.expert_nbytes)
            self.policy.record_load(load.expert)
        self._assign_waiting()

    def on_preempted(self, load_ids: list[LoadId], chunks_done: list[int]) -> None:
        """The loader dropped these loads: their slots are free again; what they had copied was wasted."""
        chunk_nbytes = self.layout.expert_nbytes // self.layout.n_chunks
        for load_id, done in zip(load_ids, chunks_done, strict=True):
            self._preempting.discard(load_id)
            load = self._in_flight.pop(load_id, None)
            if load is None:
                continue
            del self._loading[load.expert]
            self._unused_since_load.pop(load.expert, None)
            self.ledger.charge(load.request_id, wasted_bytes=done * chunk_nbytes, preempted=1)
            self._free_slot(load.slot)
            if self.is_pinned(load.expert) and load.expert not in self._waiting and load.expert not in self._host:
                self._waiting.append(load.expert)  # the gate chose it while its preemption was under way (and did
                # not send it to the host: a host expert's pin is the worker's wait for its output, not a load)
        self._assign_waiting()

    def on_released(self) -> None:
        """The inference worker unpinned experts: slots may have become evictable."""
        self._assign_waiting()

    def end_request(self) -> None:
        """The request finished: speculation for its later tokens is useless now; drop it from the loader queue."""
        self._preempt([load for load in self._in_flight.values()
                       if load.target is not None and load.load_id not in self._preempting])
        self._protected.clear()
        self._predictions.clear()

    def reissue_loads(self) -> None:
        """The loader was restarted and its queue is lost: loads it was asked to preempt count as preempted (what
        landed is wasted); every other load is sent again, precise ones first, from its first chunk not landed."""
        preempting = [load for load in self._in_flight.values() if load.load_id in self._preempting]
        for load in sorted(self._in_flight.values(), key=lambda load: load.target is not None):
            if load.load_id not in self._preempting:
                priority = PRIORITY_PRECISE if load.target is None else PRIORITY_SPECULATIVE
                self.outbox.append(LoadExpert(load_id=load.load_id, expert=load.expert, slot=load.slot, seq=load.seq,
                                              priority=priority, first_chunk=self.table.chunks_ready(load.slot)))
        if preempting:  # after the re-issue: freeing their slots may start loads or preempt re-issued ones
            self.on_preempted([load.load_id for load in preempting],
                              [self.table.chunks_ready(load.slot) for load in preempting])

    def forget_request(self) -> None:
        """After a failed request nothing is in use or waited for any more. The pins are not written here (the
        inference worker is their only writer): a live worker cleared them before reporting the failure; a dead
        one's stay until its successor clears them at start, before it reports ready. Until the next
        ``begin_request`` (which follows that report) they are not read."""
        self._pins_held = False
        self._waiting.clear()
        self._host.clear()
        self.table.waiting_for_slot = self._waiting_flag = False

    def is_pinned(self, expert: ExpertId) -> bool:
        """Pinned by the inference worker for the running request (never, between ``forget_request`` and the next
        ``begin_request``)."""
        return self._pins_held and self.table.is_pinned(expert)

    # ------------------------------------------------------------ internals
    def _count_hits(self, chosen: set[ExpertId], ready: list[ExpertId] | None) -> None:
        """Uses and hits of one gate, as the inference worker counts them (the cache view's live hit rate)."""
        if ready is None:
            hits = sum(self.table.is_ready(self.table.lookup(e)) for e in chosen)
        else:
            hits = len(chosen.intersection(ready))
        self.ledger.charge(self.request_id, expert_uses=len(chosen), expert_hits=hits)

    def _score_prediction(self, chosen: set[ExpertId], ready: list[ExpertId] | None) -> None:
        predicted = self._predictions.pop(self.position, None)
        for position in [p for p in self._predictions if p < self.position]:
            del self._predictions[position]
        if not predicted:
            self.ledger.charge(self.request_id, chosen=len(chosen))
            return
        if ready is None:
            n_ready = sum(self.table.is_ready(self.table.lookup(e)) for e in predicted)
        else:
            n_ready = len(predicted.intersection(ready))
        self.ledger.charge(self.request_id, chosen=len(chosen), predicted=len(predicted),
                           predicted_chosen=len(predicted & chosen), predicted_ready=n_ready)
        for expert in predicted - chosen:  # a wrong guess goes to the back of the line
            if expert in self._unused_since_load:
                self.policy.record_unused_prefetch(expert)

    def _preempt_speculation(self, chosen: set[ExpertId]) -> None:
        confirmed: list[InFlightLoad] = []
        dropped: list[InFlightLoad] = []
        for load in self._in_flight.values():
            if load.target is None or load.load_id in self._preempting:
                continue
            if load.expert in chosen:
                load.target = None
                confirmed.append(load)
            elif load.target <= self.position:
                dropped.append(load)  # the gate of its layer has spoken, or its layer is past
        self._preempt(dropped)
        if confirmed:
            confirmed.sort(key=lambda load: -self.table.chunks_ready(load.slot))
            self.outbox.append(Reorder(load_ids=[load.load_id for load in confirmed]))

    def _preempt(self, loads: list[InFlightLoad]) -> None:
        """Ask the loader to drop these loads; their slots stay LOADING until it answers ``LoadsPreempted``."""
        if not loads:
            return
        for load in loads:
            self._preempting.add(load.load_id)
            self._protected.pop(load.expert, None)
        self.outbox.append(Preempt(load_ids=[load.load_id for load in loads]))

    def _assign_waiting(self) -> None:
        if not self._waiting:
            if self._waiting_flag:
                self.table.waiting_for_slot = self._waiting_flag = False
            return
        # Raised before the pin scan: the inference worker unpins, then reads the flag, so a release that happens
        # during the scan is reported. (Without a fence the two stores and loads may still cross: the coordinator
        # also retries on a timer while anything waits; see ``Coordinator.retry_waiting``.)
        self.table.waiting_for_slot = self._waiting_flag = True
        while self._waiting:
            slot = self._take_slot(PRIORITY_PRECISE)
            if slot is None:
                break
            expert = self._waiting.popleft()
            self._start_load(expert, slot, PRIORITY_PRECISE, None)
        self.table.waiting_for_slot = self._waiting_flag = bool(self._waiting)
        missing = len(self._waiting) - len(self._preempting)  # a pending preemption frees a slot either way
        if missing > 0 and self.early_preemption:  # free slots held by speculation, farthest prediction first
            speculative = sorted((load for load in self._in_flight.values()
                                  if load.target is not None and load.load_id not in self._preempting),
                                 key=lambda load: load.target or (0, 0), reverse=True)
            self._preempt(speculative[:missing])

    def _take_slot(self, priority: int, incoming: tuple[ExpertId, Position] | None = None) -> SlotId | None:
        """A free slot, or one freed by evicting the policy's victim; for a speculative load (``incoming``: the
        expert and the position it is predicted for), only a victim the policy values below the guess."""
        if self._free:
            return heapq.heappop(self._free)
        is_pinned = self.is_pinned
        if priority == PRIORITY_SPECULATIVE:
            victim = self.policy.victim(lambda e: not is_pinned(e) and not self.is_protected(e)
                                        and not self._recently_chosen(e), incoming)
        else:
            victim = self.policy.victim(lambda e: not is_pinned(e) and not self.is_protected(e))
            if victim is None:  # the current layer beats a prediction: the farthest one goes
                protected = [e for e in self._protected if e in self._resident and not is_pinned(e)]
                if protected:
                    victim = max(protected, key=lambda e: self._protected[e])
        if victim is None:
            return None
        slot = self._slot_of[victim]
        self._evict(slot)
        heapq.heappop(self._free)  # the slot _evict just freed
        return slot

    def _recently_chosen(self, expert: ExpertId) -> bool:
        """Chosen by a gate less than one token (all MoE layers) ago."""
        used = self._last_chosen.get(expert)
        step, layer = self.position
        return used is not None and used > (step - 1, layer)

    def _evict(self, slot: SlotId) -> None:
        expert = ExpertId(self._slot_expert[slot])
        assert self._slot_state[slot] == RESIDENT, f"slot {slot} is not resident"
        if expert in self._unused_since_load:
            self.ledger.charge(self._unused_since_load.pop(expert), wasted_bytes=self.layout.expert_nbytes)
        self._resident.discard(expert)
        self.evicted_recently.append(expert)
        self.policy.record_evict(expert)
        self._free_slot(slot)
        self.ledger.charge(self.request_id, evictions=1)

    def _free_slot(self, slot: SlotId) -> None:
        expert = ExpertId(self._slot_expert[slot])
        if self._slot_of.get(expert) == slot:
            del self._slot_of[expert]
        self._slot_expert[slot] = -1
        self._slot_state[slot] = FREE
        self.table.release(slot)
        heapq.heappush(self._free, slot)

    def _start_load(self, expert: ExpertId, slot: SlotId, priority: int, target: Position | None) -> None:
        seq = self.table.assign(slot, expert)
        self._slot_expert[slot] = expert
        self._slot_state[slot] = LOADING
        self._slot_of[expert] = slot
        load_id = LoadId(self._next_load_id)
        self._next_load_id += 1
        self._in_flight[load_id] = InFlightLoad(load_id, expert, slot, seq, self.request_id, target)
        self._loading[expert] = load_id
        self.ledger.charge(self.request_id, loads_issued=1)
        if priority == PRIORITY_SPECULATIVE:
            self._unused_since_load[expert] = self.request_id
        self.outbox.append(LoadExpert(load_id=load_id, expert=expert, slot=slot, seq=seq, priority=priority))
