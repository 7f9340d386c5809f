"""The cache directory: which expert is in which slot, which loads are in flight, what waits for a slot.

The coordinator is its only owner. It writes assignments into the shared slot table (so the inference worker reads
readiness without asking) and turns gate reports into ``LoadExpert`` commands for the loader. An expert is never
evicted while its slot is being loaded or while the inference worker has it pinned (chosen by the current gate and
not yet computed).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from coordinator.policies import CachePolicy
from protocol.ids import ExpertId, LoadId, RequestId, SlotId
from protocol.messages import PRIORITY_PRECISE, LoadExpert
from shm.layout import ExpertLayout
from shm.slot_table import FREE, LOADING, RESIDENT, SlotTable

log = logging.getLogger(__name__)


@dataclass
class InFlightLoad:
    load_id: LoadId
    expert: ExpertId
    slot: SlotId
    seq: int
    request_id: RequestId | None


@dataclass
class CacheCounters:
    """Totals since start; the coordinator snapshots them around each request."""

    loads_issued: int = 0
    experts_loaded: int = 0
    bytes_loaded: int = 0
    wasted_bytes: int = 0
    evictions: int = 0


class CacheDirectory:
    def __init__(self, table: SlotTable, layout: ExpertLayout, policy: CachePolicy) -> None:
        self.table = table
        self.layout = layout
        self.policy = policy
        self.counters = CacheCounters()
        self._next_load_id = 1
        self._in_flight: dict[LoadId, InFlightLoad] = {}
        self._loading: dict[ExpertId, LoadId] = {}
        self._waiting: deque[ExpertId] = deque()
        self._unused_since_load: set[ExpertId] = set()
        self.request_id: RequestId | None = None

    # ------------------------------------------------------------ queries
    def slot_of(self, expert: ExpertId) -> SlotId | None:
        slot = int(self.table.expert_slot[expert])
        return SlotId(slot) if slot >= 0 else None

    def resident_experts(self) -> list[ExpertId]:
        return [ExpertId(int(e)) for s, e in enumerate(self.table.slot_expert)
                if self.table.slot_state[s] == RESIDENT]

    @property
    def waiting(self) -> list[ExpertId]:
        return list(self._waiting)

    # ------------------------------------------------------------ events
    def on_gate(self, experts: list[ExpertId]) -> list[LoadExpert]:
        """The gate chose ``experts`` (now pinned by the inference worker): load whichever is missing."""
        self.policy.record_use(experts)
        self._unused_since_load.difference_update(experts)
        if not self.policy.keeps_experts:
            chosen = set(experts)
            for slot in range(self.layout.n_slots):
                expert = ExpertId(int(self.table.slot_expert[slot]))
                if (self.table.slot_state[slot] == RESIDENT and expert not in chosen
                        and not self.table.is_pinned(expert)):
                    self._evict(SlotId(slot))
        for expert in experts:
            if self.slot_of(expert) is None and expert not in self._waiting:
                self._waiting.append(expert)
        return self._assign_waiting()

    def on_loaded(self, load_id: LoadId, seq: int) -> list[LoadExpert]:
        load = self._in_flight.pop(load_id, None)
        if load is None:
            log.warning("ExpertLoaded for unknown load %d", load_id)
            return []
        del self._loading[load.expert]
        if self.table.mark_resident(load.slot, seq):
            self.counters.experts_loaded += 1
            self.counters.bytes_loaded += self.layout.expert_nbytes
            self.policy.record_load(load.expert)
        return self._assign_waiting()

    def on_released(self) -> list[LoadExpert]:
        """The inference worker unpinned experts: slots may have become evictable."""
        return self._assign_waiting()

    def forget_pins(self) -> None:
        """After a failed request nothing is in use any more."""
        self.table.expert_pin[:] = 0

    # ------------------------------------------------------------ internals
    def _assign_waiting(self) -> list[LoadExpert]:
        loads = []
        while self._waiting:
            slot = self._take_slot()
            if slot is None:
                break
            expert = self._waiting.popleft()
            loads.append(self._start_load(expert, slot))
        self.table.waiting_for_slot = bool(self._waiting)
        return loads

    def _take_slot(self) -> SlotId | None:
        candidates: dict[ExpertId, SlotId] = {}
        for slot in range(self.layout.n_slots):
            state = self.table.slot_state[slot]
            if state == FREE:
                return SlotId(slot)
            expert = ExpertId(int(self.table.slot_expert[slot]))
            if state == RESIDENT and not self.table.is_pinned(expert):
                candidates[expert] = SlotId(slot)
        if not candidates:
            return None
        victim = self.policy.choose_victim(list(candidates))
        slot = candidates[victim]
        self._evict(slot)
        return slot

    def _evict(self, slot: SlotId) -> None:
        expert = ExpertId(int(self.table.slot_expert[slot]))
        assert self.table.slot_state[slot] != LOADING, f"slot {slot} is being loaded"
        if expert in self._unused_since_load:
            self._unused_since_load.discard(expert)
            self.counters.wasted_bytes += self.layout.expert_nbytes
        self.table.release(slot)
        self.counters.evictions += 1

    def _start_load(self, expert: ExpertId, slot: SlotId) -> LoadExpert:
        seq = self.table.assign(slot, expert)
        load_id = LoadId(self._next_load_id)
        self._next_load_id += 1
        self._in_flight[load_id] = InFlightLoad(load_id, expert, slot, seq, self.request_id)
        self._loading[expert] = load_id
        self.counters.loads_issued += 1
        return LoadExpert(load_id=load_id, expert=expert, slot=slot, seq=seq, priority=PRIORITY_PRECISE)
