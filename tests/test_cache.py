"""The coordinator's cache directory over a real slot table.

LRU, LFU, pins, loading slots, waiting for a slot, ondemand, counters; and, for the prefetching policy (promoe):
speculative loads, protection of predicted experts, early preemption and reordering at a gate, preemption of
speculation by precise loads that find no slot, wasted bytes and prediction scoring.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from coordinator.cache import FREE, LOADING, RESIDENT, CacheDirectory
from coordinator.policies import LfuPolicy, LruPolicy, OnDemandPolicy, PromoePolicy, make_policy
from coordinator.policies.ranking import Ranking
from protocol.ids import ExpertId, LoadId, RequestId, SlotId
from protocol.messages import PRIORITY_PRECISE, PRIORITY_SPECULATIVE, LoadExpert, Message, Preempt, Reorder
from shm.layout import ExpertLayout
from shm.segment import SHM_DIR, Segment, leftover_segments, segment_name
from shm.slot_table import SlotTable

E = 8
"""Experts per MoE layer: expert ``l * E + e`` is expert ``e`` of MoE layer ``l``."""
N_CHUNKS = 3


def layout(n_slots: int) -> ExpertLayout:
    return ExpertLayout(moe_layers=(0, 1, 2, 3), experts_per_layer=E, top_k=2, hidden_size=8, intermediate_size=4,
                        storage_dtype="bfloat16", compute_dtype="float32", n_chunks=N_CHUNKS, n_slots=n_slots)


class Rig:
    """A cache directory over a slot table in a real shared-memory segment, driven as the workers would."""

    def __init__(self, n_slots: int, policy: str, early_preemption: bool = True) -> None:
        self.layout = lay = layout(n_slots)
        self.run_id = f"test_{uuid.uuid4().hex[:12]}"
        self.segment = Segment.create(segment_name(self.run_id, "table"),
                                      SlotTable.nbytes_for(lay.n_slots, lay.n_experts))
        try:
            self.table = SlotTable(self.segment, lay.n_slots, lay.n_experts, lay.n_chunks, init=True)
        except BaseException:
            self.segment.unlink()
            raise
        self.cache = CacheDirectory(self.table, lay, make_policy(policy, lay), early_preemption)
        self.issued: dict[int, LoadExpert] = {}
        self.chunk_nbytes = lay.expert_nbytes // lay.n_chunks

    # -------------------------------------------------------- what the inference worker, predictor and loader do
    def gate(self, *experts: int, at: tuple[int, int] = (0, 0), pin: bool = True,
             ready: list[int] | None = None) -> list[Message]:
        """The gate of MoE layer ``at[1]`` at step ``at[0]`` chose ``experts`` (pinned by the inference worker)."""
        ids = [ExpertId(e) for e in experts]
        if pin:
            self.table.pin(ids)
        seen = None if ready is None else [ExpertId(e) for e in ready]
        assert self.cache.on_gate(at[0], at[1], ids, seen) is None
        assert self.cache.position == at
        return self.drain()

    def predict(self, step: int, layer: int, *experts: int, probability: float = 0.99) -> list[Message]:
        """A confident prediction (so that a busy link does not throttle it; see the throttle's own tests)."""
        ids = [ExpertId(e) for e in experts]
        assert self.cache.on_predicted(step, layer, ids, [probability] * len(ids)) is None
        commands = self.drain(PRIORITY_SPECULATIVE)
        assert all(isinstance(c, LoadExpert) for c in commands), "a prediction only issues speculative loads"
        return commands

    def ready(self, load: LoadExpert, chunks: int) -> None:
        """The loader copied ``chunks`` chunks of ``load`` and published them."""
        assert self.table.publish_ready(load.slot, load.seq, chunks)

    def loaded(self, load: LoadExpert) -> list[Message]:
        """The loader copied every chunk and published readiness; the coordinator gets ExpertLoaded."""
        self.ready(load, N_CHUNKS)
        assert self.cache.on_loaded(load.load_id, load.seq) is None
        return self.drain()

    def preempted(self, loads: list[LoadExpert], chunks_done: list[int]) -> list[Message]:
        """The loader dropped ``loads`` (LoadsPreempted)."""
        assert self.cache.on_preempted([load.load_id for load in loads], chunks_done) is None
        return self.drain()

    def released(self) -> list[Message]:
        assert self.cache.on_released() is None
        return self.drain()

    def unpin(self, *experts: int) -> None:
        for e in experts:
            self.table.unpin(ExpertId(e))

    def use(self, *experts: int, at: tuple[int, int] = (0, 0)) -> None:
        """A whole layer step: the gate chooses, every missing expert is loaded, everything is computed."""
        pending = loads_in(self.gate(*experts, at=at))
        while pending:
            pending = [*pending[1:], *loads_in(self.loaded(pending[0]))]
        self.unpin(*experts)
        for e in experts:
            assert self.cache.slot_state(SlotId(int(self.table.expert_slot[e]))) == RESIDENT

    def drain(self, priority: int = PRIORITY_PRECISE) -> list[Message]:
        """The commands for the loader; each is checked against the slot table and the loads issued so far."""
        commands = self.cache.drain()
        assert self.cache.drain() == [], "drain empties the outbox"
        for command in commands:
            if isinstance(command, LoadExpert):
                assert command.load_id not in self.issued, "load id reused"
                self.issued[command.load_id] = command
                # the command carries exactly what the table says
                assert command.seq == int(self.table.slot_seq[command.slot])
                assert int(self.table.slot_expert[command.slot]) == command.expert
                assert int(self.table.expert_slot[command.expert]) == command.slot
                assert self.cache.slot_state(command.slot) == LOADING
                assert self.table.chunks_ready(command.slot) == 0
                assert command.priority == priority and command.first_chunk == 0
            else:
                assert isinstance(command, (Preempt, Reorder)), command
                assert self.cache.policy.prefetches, "only a prefetching policy preempts or reorders"
                assert command.load_ids, "no empty Preempt or Reorder"
                assert len(set(command.load_ids)) == len(command.load_ids)
                assert all(i in self.issued for i in command.load_ids), "unknown load"
        return commands

    # -------------------------------------------------------- queries
    def resident(self) -> set[int]:
        return {int(e) for e in self.cache.resident_experts()}

    def slot_of(self, expert: int) -> int | None:
        slot = self.cache.slot_of(ExpertId(expert))
        return None if slot is None else int(slot)

    def state_of_slot(self, slot: int) -> int:
        return self.cache.slot_state(SlotId(slot))

    def close(self) -> None:
        try:
            self.table.close()
        finally:
            self.segment.unlink()
        assert not (SHM_DIR / self.segment.name).exists()
        assert leftover_segments(self.run_id) == []


@pytest.fixture
def make_rig() -> Iterator:
    rigs: list[Rig] = []

    def make(n_slots: int = 3, policy: str = "lru", early_preemption: bool = True) -> Rig:
        rig = Rig(n_slots, policy, early_preemption)
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in rigs:
            rig.close()


def loads_in(commands: list[Message]) -> list[LoadExpert]:
    return [c for c in commands if isinstance(c, LoadExpert)]


def experts_of(commands: list[Message]) -> list[int]:
    assert all(isinstance(c, LoadExpert) for c in commands), commands
    return [int(c.expert) for c in loads_in(commands)]


def by_expert(commands: list[Message]) -> dict[int, LoadExpert]:
    return {int(load.expert): load for load in loads_in(commands)}


def ids(*loads: LoadExpert) -> list[LoadId]:
    return [load.load_id for load in loads]


# ---------------------------------------------------------------- loads
def test_missing_experts_are_loaded_into_free_slots(make_rig) -> None:
    rig = make_rig()
    loads = rig.gate(5, 1)
    assert experts_of(loads) == [5, 1]
    assert len({load.slot for load in loads}) == 2
    assert len({load.load_id for load in loads}) == 2
    assert rig.cache.counters.loads_issued == 2
    assert rig.resident() == set()  # loading, not resident before ExpertLoaded
    for load in loads:
        assert rig.loaded(load) == []
    assert rig.resident() == {1, 5}
    assert rig.cache.counters.evictions == 0


def test_no_second_load_for_a_loading_or_resident_expert(make_rig) -> None:
    rig = make_rig()
    (first,) = rig.gate(2)
    assert rig.gate(2) == []  # still loading
    assert rig.gate(2, 2) == []
    rig.loaded(first)
    assert rig.gate(2) == []  # resident
    assert rig.cache.counters.loads_issued == 1
    assert len(rig.issued) == 1


def test_counters_follow_on_loaded(make_rig) -> None:
    rig = make_rig()
    a, b = rig.gate(0, 1)
    assert (rig.cache.counters.experts_loaded, rig.cache.counters.bytes_loaded) == (0, 0)
    rig.loaded(a)
    assert rig.cache.counters.experts_loaded == 1
    assert rig.cache.counters.bytes_loaded == rig.layout.expert_nbytes  # storage dtype: what crossed the link
    rig.cache.on_loaded(LoadId(999), 1)  # unknown load: no count
    rig.cache.on_loaded(a.load_id, a.seq)  # a duplicate report: no count
    assert rig.drain() == []
    assert rig.cache.counters.experts_loaded == 1
    rig.loaded(b)
    assert rig.cache.counters.experts_loaded == 2
    assert rig.cache.counters.bytes_loaded == 2 * rig.layout.expert_nbytes
    assert rig.cache.counters.loads_issued == 2
    assert rig.cache.counters.wasted_bytes == 0


def test_loaded_report_with_a_stale_seq_is_not_counted(make_rig) -> None:
    rig = make_rig()
    (load,) = rig.gate(3)
    rig.cache.on_loaded(load.load_id, load.seq - 1)
    assert rig.drain() == []
    assert rig.cache.counters.experts_loaded == 0
    assert rig.state_of_slot(load.slot) == LOADING


def test_load_commands_carry_a_new_seq_per_assignment(make_rig) -> None:
    rig = make_rig(n_slots=2)
    (a,) = rig.gate(0)
    rig.loaded(a)
    rig.unpin(0)
    (b,) = rig.gate(1)
    rig.loaded(b)
    rig.unpin(1)
    (c,) = rig.gate(2)  # evicts 0, from a's slot
    assert c.slot == a.slot
    assert c.seq > a.seq  # readers of expert 0 fail validation; the loader's stale chunks are refused
    assert not rig.table.publish_ready(a.slot, a.seq, N_CHUNKS)


# ---------------------------------------------------------------- LRU eviction
def test_lru_evicts_the_least_recently_used(make_rig) -> None:
    rig = make_rig(n_slots=3)
    rig.use(0, 1)
    rig.use(2)
    rig.use(0)  # 0 is now more recent than 1
    slot_of_1 = rig.slot_of(1)
    seq_before = int(rig.table.slot_seq[slot_of_1])
    (load,) = rig.gate(3)
    assert int(load.slot) == slot_of_1
    assert rig.slot_of(1) is None
    assert rig.resident() == {0, 2}
    assert load.seq > seq_before  # old readers of expert 1 fail validation
    assert rig.cache.counters.evictions == 1
    rig.loaded(load)
    rig.unpin(3)
    rig.use(4)  # next victim: 2 (used before 0 and 3)
    assert rig.resident() == {0, 3, 4}


def test_lru_is_global_over_layers(make_rig) -> None:
    rig = make_rig(n_slots=3)
    rig.use(E, at=(0, 1))  # layer 1, expert 0
    rig.use(0, 1, at=(1, 0))  # layer 0
    rig.use(E + 1, at=(1, 1))  # layer 1: evicts the oldest, from layer 1
    assert rig.resident() == {0, 1, E + 1}


def test_pinned_expert_is_never_evicted(make_rig) -> None:
    rig = make_rig(n_slots=3)
    rig.use(0, 1)
    rig.use(2)
    rig.table.pin([ExpertId(0)])  # the inference worker holds the least recently used one
    (load,) = rig.gate(3)
    assert rig.slot_of(0) is not None
    assert rig.resident() == {0, 2}  # 1 went instead
    rig.loaded(load)
    rig.unpin(3)
    rig.table.pin([ExpertId(2)])
    rig.gate(4)
    assert rig.slot_of(0) is not None and rig.slot_of(2) is not None
    assert rig.slot_of(3) is None


def test_loading_slot_is_never_evicted(make_rig) -> None:
    rig = make_rig(n_slots=3)
    (loading,) = rig.gate(6)  # the oldest use, never loaded
    rig.unpin(6)
    rig.use(0)
    rig.use(1)
    seq = int(rig.table.slot_seq[loading.slot])
    (load,) = rig.gate(2)
    assert load.slot != loading.slot
    assert int(rig.table.slot_seq[loading.slot]) == seq
    assert int(rig.table.slot_expert[loading.slot]) == 6
    assert rig.state_of_slot(loading.slot) == LOADING
    assert rig.slot_of(0) is None  # the LRU resident expert went instead
    assert rig.loaded(loading) == []  # the untouched load completes
    assert 6 in rig.resident()


# ---------------------------------------------------------------- LFU eviction
def test_lfu_evicts_the_least_frequently_chosen_ties_by_recency(make_rig) -> None:
    rig = make_rig(n_slots=3, policy="lfu")
    rig.use(0)
    rig.use(0)  # 0: two uses, but the least recently used
    rig.use(2)  # 2 and 1: one use each, 2 the older
    rig.use(1)
    slot_of_2 = rig.slot_of(2)
    (load,) = rig.gate(3)
    assert rig.slot_of(2) is None and int(load.slot) == slot_of_2
    assert rig.resident() == {0, 1}  # not 0 (LRU's choice), not 1 (the smaller id / the more recent)
    rig.loaded(load)
    rig.unpin(3)
    rig.use(4)  # 1 and 3 both used once: 1 is older
    assert rig.resident() == {0, 3, 4}


# ---------------------------------------------------------------- waiting for a slot
def test_missing_experts_wait_while_every_slot_is_pinned_or_loading(make_rig) -> None:
    rig = make_rig(n_slots=3)
    a, b, c = rig.gate(0, 1, 2)  # every slot loading and pinned
    assert rig.table.waiting_for_slot is False
    assert rig.gate(3, 4) == []
    assert rig.cache.waiting == [3, 4]
    assert rig.table.waiting_for_slot is True
    # the flag is in shared memory, where the inference worker reads it
    other = SlotTable(rig.segment, rig.layout.n_slots, rig.layout.n_experts, rig.layout.n_chunks, init=False)
    assert other.waiting_for_slot is True
    assert rig.gate(3) == []  # already waiting: not queued twice
    assert rig.cache.waiting == [3, 4]

    for load in (a, b, c):  # loaded but still pinned: nothing can be evicted yet
        assert rig.loaded(load) == []
    assert rig.table.waiting_for_slot is True
    assert rig.released() == []

    rig.unpin(1)
    loads = rig.released()
    assert experts_of(loads) == [3]  # one slot: the first waiting expert
    assert int(loads[0].slot) == b.slot
    assert rig.cache.waiting == [4]
    assert rig.table.waiting_for_slot is True

    rig.unpin(0, 2)
    loads = rig.released()
    assert experts_of(loads) == [4]
    assert rig.cache.waiting == []
    assert rig.table.waiting_for_slot is False
    assert other.waiting_for_slot is False
    other.close()


def test_waiting_expert_gets_the_slot_freed_by_a_load(make_rig) -> None:
    rig = make_rig(n_slots=2)
    a, _ = rig.gate(0, 1)
    rig.unpin(0, 1)  # computed... but still loading: not evictable
    assert rig.gate(2) == []
    assert rig.table.waiting_for_slot is True
    loads = rig.loaded(a)  # now resident and unpinned: evictable
    assert experts_of(loads) == [2]
    assert int(loads[0].slot) == a.slot
    assert rig.table.waiting_for_slot is False


# ---------------------------------------------------------------- ondemand
def test_ondemand_releases_every_unchosen_resident_unpinned_expert(make_rig) -> None:
    rig = make_rig(n_slots=6, policy="ondemand")
    *done, loading = rig.gate(0, 1, 2, 3, 7)  # one gate: nothing released yet
    for load in done:
        rig.loaded(load)  # 7 stays loading
    rig.unpin(0, 1, 3, 7)  # 2 stays pinned: in use by the inference worker
    assert rig.resident() == {0, 1, 2, 3}
    loads = rig.gate(1, 4, at=(1, 0))
    assert experts_of(loads) == [4]
    # 0 and 3 released; 1 chosen, 2 pinned, 7 loading: kept
    assert rig.resident() == {1, 2}
    assert rig.slot_of(0) is None and rig.slot_of(3) is None
    assert rig.slot_of(7) == int(loading.slot)
    assert rig.state_of_slot(loading.slot) == LOADING
    free = [s for s in range(rig.layout.n_slots) if rig.state_of_slot(s) == FREE]
    assert len(free) == 2  # six slots, four taken: 1, 2, 7 and the new 4
    assert rig.cache.counters.evictions == 2


def test_lru_keeps_unchosen_experts(make_rig) -> None:
    rig = make_rig(n_slots=6, policy="lru")
    rig.use(0, 1)
    rig.use(2, 3)
    rig.gate(1, 4)
    assert rig.resident() == {0, 1, 2, 3}
    assert rig.cache.counters.evictions == 0


def test_forget_request_drops_what_waits_and_leaves_the_pins_to_the_inference_worker(make_rig) -> None:
    """The inference worker is the pins' only writer. After a failed request (or its worker's death) the directory
    drops what waits and does not read the pins (a dead worker's stay set) until the next request begins, which is
    after the restarted worker cleared them at start."""
    rig = make_rig(n_slots=3, policy="promoe")
    spec = loads_in(rig.predict(0, 2, 2 * E))
    for load in loads_in(rig.gate(0, 1)):
        rig.loaded(load)  # resident, still pinned
    assert rig.gate(E, at=(0, 1)) == [Preempt(load_ids=[spec[0].load_id])]  # no slot: E waits
    assert rig.cache.waiting == [E] and rig.table.waiting_for_slot
    rig.table.pin([ExpertId(2 * E)])  # pinned too when the worker died
    rig.cache.end_request()
    rig.cache.forget_request()
    assert rig.table.is_pinned(ExpertId(0)) and rig.table.is_pinned(ExpertId(1)), "the coordinator wrote the pins"
    assert rig.cache.waiting == [] and not rig.table.waiting_for_slot
    assert rig.preempted(spec, [0]) == [], "a dead worker's pin made a wait and a load"
    rig.table.clear_pins()  # the restarted inference worker, before it reports ready
    rig.cache.begin_request(RequestId(2))
    assert experts_of(rig.gate(E, E + 1, at=(0, 1))) == [E, E + 1]


def test_waiting_flag_is_raised_before_the_pin_scan(make_rig) -> None:
    """Otherwise an unpin during the scan reads the flag as down, sends no release, and the wait is lost."""
    rig = make_rig(n_slots=2)
    for load in loads_in(rig.gate(0, 1)):
        rig.loaded(load)  # resident and pinned: the scan must look at their pins
    flag_during_scan = []
    original = rig.table.is_pinned

    def is_pinned(expert: ExpertId) -> bool:
        flag_during_scan.append(rig.table.waiting_for_slot)
        return original(expert)

    rig.table.is_pinned = is_pinned  # type: ignore[method-assign]
    rig.gate(2, at=(0, 1))
    assert flag_during_scan and all(flag_during_scan)


# ---------------------------------------------------------------- predictions (promoe)
@pytest.mark.parametrize("policy", ["ondemand", "lru", "lfu"])
def test_policies_that_do_not_prefetch_ignore_predictions(make_rig, policy: str) -> None:
    rig = make_rig(n_slots=4, policy=policy)
    rig.cache.begin_request(RequestId(1))
    rig.use(0, at=(0, 0))
    assert rig.predict(0, 1, E, E + 1) == []
    assert rig.slot_of(E) is None and rig.slot_of(E + 1) is None
    assert not rig.cache.is_protected(ExpertId(E))
    assert experts_of(rig.gate(E + 2, at=(0, 1))) == [E + 2]
    counters = rig.cache.counters
    assert (counters.predicted, counters.predicted_chosen, counters.predicted_ready, counters.chosen) == (0, 0, 0, 0)
    assert counters.loads_issued == 2


def test_prediction_for_a_position_already_reached_is_ignored(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    assert rig.cache.position == (-1, -1)
    rig.use(2 * E, at=(0, 2))
    assert rig.predict(0, 2, 2 * E + 1) == []  # the gate of (0, 2) has reported: too late
    assert rig.predict(0, 1, E) == []  # a layer already past
    assert rig.slot_of(2 * E + 1) is None and rig.slot_of(E) is None
    assert not rig.cache.is_protected(ExpertId(2 * E + 1))
    assert rig.cache.counters.loads_issued == 1
    (spec,) = rig.predict(0, 3, 3 * E)  # the next layer: in time
    assert int(spec.expert) == 3 * E and spec.priority == PRIORITY_SPECULATIVE
    assert rig.cache.is_protected(ExpertId(3 * E))
    assert rig.predict(0, 3, 3 * E) == []  # already loading: not loaded twice
    assert rig.cache.counters.loads_issued == 2


def test_begin_request_resets_position_predictions_and_protection(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(3 * E, at=(2, 3))
    rig.use(3 * E + 1, at=(3, 3))
    assert rig.predict(0, 0, 0) == []  # behind the position of this request
    rig.predict(4, 3, 3 * E, 3 * E + 1)  # both resident: protected, nothing to load
    assert rig.cache.is_protected(ExpertId(3 * E)) and rig.cache.is_protected(ExpertId(3 * E + 1))
    rig.cache.begin_request(RequestId(2))
    assert rig.cache.position == (-1, -1) and rig.cache.request_id == 2
    assert not rig.cache.is_protected(ExpertId(3 * E))
    assert not rig.cache.is_protected(ExpertId(3 * E + 1))
    assert experts_of(rig.predict(0, 0, 0)) == [0]  # a new request starts before (0, 0)
    rig.gate(0, at=(0, 0))
    predicted = rig.cache.counters.predicted
    rig.gate(3 * E, at=(4, 3))  # the old request's prediction for (4, 3) is gone: not scored
    assert rig.cache.counters.predicted == predicted == 1


def test_speculative_loads_use_free_and_unprotected_slots_only(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, 1, at=(0, 0))
    rig.cache._last_chosen.clear()  # as if those gates were more than a token ago (see the test below)
    spec2 = by_expert(rig.predict(0, 2, 2 * E, 2 * E + 1))  # the two free slots
    for load in spec2.values():
        rig.loaded(load)
    slot_of = {e: rig.slot_of(e) for e in (0, 1, 2 * E, 2 * E + 1)}
    # 0 and 1 are unprotected (LRU: 0 first); 16 and 17 are predicted for (0, 2) and the LRU ones: never taken
    commands = rig.predict(0, 3, 3 * E, 3 * E + 1, 3 * E + 2)
    assert experts_of(commands) == [3 * E, 3 * E + 1]
    assert [int(c.slot) for c in loads_in(commands)] == [slot_of[0], slot_of[1]]
    assert rig.resident() == {2 * E, 2 * E + 1}
    assert rig.slot_of(3 * E + 2) is None
    assert rig.cache.waiting == []  # a speculative load never waits
    assert rig.table.waiting_for_slot is False
    assert rig.cache.counters.evictions == 2
    assert rig.cache.counters.wasted_bytes == 0  # 0 and 1 were loaded for gates that chose them


def test_precise_load_evicts_a_predicted_expert_only_as_a_last_resort(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, 1, at=(0, 0))
    rig.cache._last_chosen.clear()  # as if those gates were more than a token ago (see the test below)
    for load in loads_in(rig.predict(0, 2, 2 * E, 2 * E + 1)):
        rig.loaded(load)
    spec3 = by_expert(rig.predict(0, 3, 3 * E, 3 * E + 1))  # evict 0 and 1
    for load in spec3.values():
        rig.loaded(load)
    # every slot holds a predicted expert, 16 and 17 (for (0, 2)) the least recently used
    assert rig.resident() == {2 * E, 2 * E + 1, 3 * E, 3 * E + 1}

    # nothing else to evict: the farthest predictions (for (0, 3)) go, not the LRU ones
    loads = rig.gate(E, E + 1, at=(0, 1))
    assert experts_of(loads) == [E, E + 1]
    assert {int(load.slot) for load in loads} == {int(spec3[3 * E].slot), int(spec3[3 * E + 1].slot)}
    assert rig.resident() == {2 * E, 2 * E + 1}
    assert rig.cache.counters.wasted_bytes == 2 * rig.layout.expert_nbytes  # prefetched, never chosen
    for load in loads:
        rig.loaded(load)
    rig.unpin(E, E + 1)

    # (0, 2): 17 is still protected (its target is the current position); 8 and 9 are unprotected, and a precise
    # load takes one of them, never 17
    slots_of_8_9 = {rig.slot_of(E), rig.slot_of(E + 1)}
    (load,) = rig.gate(2 * E, 2 * E + 2, at=(0, 2))
    assert int(load.expert) == 2 * E + 2 and int(load.slot) in slots_of_8_9
    assert rig.cache.is_protected(ExpertId(2 * E + 1)) and rig.slot_of(2 * E + 1) is not None
    rig.loaded(load)
    rig.unpin(2 * E, 2 * E + 2)

    # (0, 3): the target of 17 has passed: it is unprotected, ranked by the policy like any resident expert
    rig.gate(3 * E + 2, at=(0, 3))
    assert not rig.cache.is_protected(ExpertId(2 * E + 1))


def test_predicted_expert_is_kept_from_speculation_but_not_after_its_gate(make_rig) -> None:
    rig = make_rig(n_slots=3, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    (pinned,) = rig.gate(0, at=(0, 0))  # stays pinned throughout
    rig.loaded(pinned)
    (spec,) = rig.predict(0, 1, E)
    rig.loaded(spec)
    (load,) = rig.gate(E, E + 1, at=(0, 1))  # 8 chosen (was predicted), 9 loaded precisely
    rig.loaded(load)
    rig.unpin(E, E + 1)
    rig.cache._last_chosen.clear()  # as if those gates were more than a token ago (see the test further down)
    # at (0, 1) 8 is still protected: a speculative load takes 9, although 8 is the least recently used
    assert rig.cache.is_protected(ExpertId(E)) and not rig.cache.is_protected(ExpertId(E + 1))
    slot_of_9 = rig.slot_of(E + 1)
    (spec2,) = rig.predict(0, 2, 2 * E)
    assert int(spec2.slot) == slot_of_9
    # nothing unprotected is left (0 pinned, 16 loading): the next speculative load is refused
    assert rig.predict(0, 2, 2 * E + 1) == []
    assert rig.slot_of(E) is not None
    rig.loaded(spec2)
    # once (0, 2) has reported, 8's target has passed: a speculative load may take it
    rig.use(2 * E, at=(0, 2))
    rig.cache._last_chosen.clear()  # as if those gates were more than a token ago (see the test below)
    assert not rig.cache.is_protected(ExpertId(E))
    slot_of_8 = rig.slot_of(E)
    (spec3,) = rig.predict(0, 3, 3 * E)
    assert int(spec3.slot) == slot_of_8
    assert rig.slot_of(E) is None


def test_protection_lasts_until_the_farthest_prediction_of_an_expert(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    (a,) = rig.predict(0, 2, 2 * E)  # 16: for (0, 2), then also for (1, 2)
    rig.loaded(a)
    (b,) = rig.predict(1, 2, 2 * E, 2 * E + 1)  # 17: for (1, 2), then also for (0, 2)
    assert int(b.expert) == 2 * E + 1
    rig.loaded(b)
    assert rig.predict(0, 2, 2 * E, 2 * E + 1) == []  # both resident
    rig.use(2 * E, at=(0, 2))
    for at, expert in (((0, 3), 3 * E), ((1, 0), 0)):  # fill the other slots, pinned
        (load,) = rig.gate(expert, at=at)
        rig.loaded(load)
    # (0, 2) has passed, (1, 2) has not: 16 and 17 are kept from speculation
    assert rig.cache.is_protected(ExpertId(2 * E)) and rig.cache.is_protected(ExpertId(2 * E + 1))
    assert rig.predict(1, 1, E) == []
    assert rig.resident() == {0, 2 * E, 2 * E + 1, 3 * E}


# ---------------------------------------------------------------- early preemption and reordering
def test_gate_preempts_exactly_the_unchosen_speculation_of_its_layer_and_reorders_the_chosen(make_rig) -> None:
    rig = make_rig(n_slots=10, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, 1, at=(0, 0))
    layer2 = [2 * E + e for e in (0, 1, 2, 3, 4, 6)]  # 16..20 and 22
    spec2 = by_expert(rig.predict(0, 2, *layer2))
    spec3 = by_expert(rig.predict(0, 3, 3 * E, 3 * E + 1))
    assert sorted(spec2) == layer2 and sorted(spec3) == [3 * E, 3 * E + 1]
    assert all(rig.state_of_slot(s) != FREE for s in range(10))
    # chunks landed so far: 16 one, 17 none, 18 two, 19 two (not chosen); 22 complete
    rig.ready(spec2[2 * E], 1)
    rig.ready(spec2[2 * E + 2], 2)
    rig.ready(spec2[2 * E + 3], 2)
    rig.loaded(spec2[2 * E + 6])
    slot_of_0 = rig.slot_of(0)

    # the gate of (0, 2) chooses 16, 17, 18 (in flight), 22 (resident) and 21 (never predicted)
    commands = rig.gate(2 * E, 2 * E + 1, 2 * E + 2, 2 * E + 6, 2 * E + 5, at=(0, 2))
    assert len(commands) == 3, commands
    preempt, reorder, load = commands
    # exactly the speculation of layer 2 it did not choose: not layer 3's, not the chosen ones
    assert isinstance(preempt, Preempt)
    assert sorted(preempt.load_ids) == sorted(ids(spec2[2 * E + 3], spec2[2 * E + 4]))
    # the chosen ones still in flight, most chunks landed first
    assert reorder == Reorder(load_ids=ids(spec2[2 * E + 2], spec2[2 * E], spec2[2 * E + 1]))
    # then the chosen expert that had no load at all, precisely, in the LRU unprotected slot
    assert isinstance(load, LoadExpert) and int(load.expert) == 2 * E + 5 and int(load.slot) == slot_of_0
    # the preempted slots stay the loader's until it answers
    for e in (2 * E + 3, 2 * E + 4):
        assert rig.state_of_slot(spec2[e].slot) == LOADING and rig.slot_of(e) == int(spec2[e].slot)
    assert rig.cache.counters.preempted == 0

    assert rig.preempted([spec2[2 * E + 3], spec2[2 * E + 4]], [2, 0]) == []
    for e in (2 * E + 3, 2 * E + 4):
        assert rig.state_of_slot(spec2[e].slot) == FREE and rig.slot_of(e) is None
    assert rig.cache.counters.preempted == 2
    assert rig.cache.counters.wasted_bytes == 2 * rig.chunk_nbytes
    freed = {int(spec2[2 * E + 3].slot), int(spec2[2 * E + 4].slot)}

    # the gate of (0, 3): 24 chosen (in flight), 25 not, 26 new; the layer-2 loads are no longer speculative
    rig.unpin(*layer2, 2 * E + 5)
    commands = rig.gate(3 * E, 3 * E + 2, at=(0, 3))
    assert len(commands) == 3, commands
    assert commands[0] == Preempt(load_ids=ids(spec3[3 * E + 1]))
    assert commands[1] == Reorder(load_ids=ids(spec3[3 * E]))
    assert experts_of(commands[2:]) == [3 * E + 2] and int(commands[2].slot) in freed


def test_gate_without_speculation_in_flight_sends_no_preempt_or_reorder(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    (spec,) = rig.predict(0, 0, 0)
    rig.loaded(spec)  # landed before its gate: nothing to reorder
    assert experts_of(rig.gate(0, 1, at=(0, 0))) == [1]


def test_preempted_load_frees_its_slot_for_a_waiting_precise_load(make_rig) -> None:
    rig = make_rig(n_slots=3, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    for load in loads_in(rig.gate(0, 1, at=(0, 0))):
        rig.loaded(load)  # 0 and 1 stay pinned
    (spec,) = rig.predict(0, 1, E)
    rig.ready(spec, 2)
    # the gate of (0, 1) does not choose 8: preempted; 9 finds no slot and waits for the one 8 holds
    assert rig.gate(E + 1, at=(0, 1)) == [Preempt(load_ids=ids(spec))]
    assert rig.cache.waiting == [E + 1] and rig.table.waiting_for_slot is True
    assert rig.state_of_slot(spec.slot) == LOADING
    assert rig.released() == []  # nothing more to preempt: one is on its way

    commands = rig.preempted([spec], [2])
    assert experts_of(commands) == [E + 1]
    (load,) = commands
    assert load.slot == spec.slot and load.seq > spec.seq
    assert rig.slot_of(E) is None
    assert rig.cache.waiting == [] and rig.table.waiting_for_slot is False
    assert rig.cache.counters.preempted == 1
    assert rig.cache.counters.wasted_bytes == 2 * rig.chunk_nbytes  # the chunks copied, not the whole expert
    assert rig.cache.counters.evictions == 0

    assert rig.preempted([spec], [2]) == []  # a repeated report changes nothing
    assert rig.cache.counters.preempted == 1
    assert rig.cache.counters.wasted_bytes == 2 * rig.chunk_nbytes
    rig.loaded(load)
    assert rig.resident() == {0, 1, E + 1}


def test_precise_load_with_no_slot_preempts_speculation_farthest_first(make_rig) -> None:
    rig = make_rig(n_slots=5, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    for load in loads_in(rig.gate(0, 1, at=(0, 0))):
        rig.loaded(load)  # 0 and 1 stay pinned
    (near,) = rig.predict(0, 2, 2 * E)
    (far,) = rig.predict(1, 0, 2)
    (mid,) = rig.predict(0, 3, 3 * E)
    # two precise loads, every slot pinned or held by speculation: the two farthest predictions go, in one message
    assert rig.gate(E, E + 1, at=(0, 1)) == [Preempt(load_ids=ids(far, mid))]
    assert rig.cache.waiting == [E, E + 1] and rig.table.waiting_for_slot is True
    assert rig.cache.counters.evictions == 0 and rig.resident() == {0, 1}

    commands = rig.preempted([mid, far], [0, 1])
    assert experts_of(commands) == [E, E + 1]
    assert {int(c.slot) for c in loads_in(commands)} == {int(mid.slot), int(far.slot)}
    assert rig.cache.waiting == [] and rig.table.waiting_for_slot is False
    assert rig.cache.counters.wasted_bytes == rig.chunk_nbytes
    assert rig.state_of_slot(near.slot) == LOADING and rig.slot_of(2 * E) == int(near.slot)  # kept
    assert rig.cache.counters.preempted == 2


def test_pending_preemptions_count_toward_the_slots_a_precise_load_needs(make_rig) -> None:
    """A Preempt already sent will free a slot (the loader drops the load, or finishes it and it becomes
    evictable): while it is on its way, later events must not preempt more speculation for the same waiting
    expert."""
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    a, _ = loads_in(rig.gate(0, 1, at=(0, 0)))  # 0 and 1 still loading, pinned
    (near,) = rig.predict(0, 2, 2 * E)
    (far,) = rig.predict(0, 3, 3 * E)
    assert rig.gate(E, at=(0, 1)) == [Preempt(load_ids=ids(far))]  # one waiting, one preempted
    assert rig.cache.waiting == [E]
    # ExpertLoaded for 0 arrives before LoadsPreempted: 0 is still pinned, so 8 still waits, but the slot of
    # the preempted load is already on its way; 16 (for the next layer) must not be preempted too
    assert rig.loaded(a) == [], "a second Preempt for a single waiting expert"
    assert rig.state_of_slot(near.slot) == LOADING


def test_chosen_expert_whose_speculative_load_is_being_preempted_is_still_loaded(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    for load in loads_in(rig.gate(0, 1, at=(0, 0))):
        rig.loaded(load)  # 0 and 1 stay pinned
    (near,) = rig.predict(0, 2, 2 * E)
    (far,) = rig.predict(0, 3, 3 * E)
    assert rig.gate(E, at=(0, 1)) == [Preempt(load_ids=ids(far))]  # 8 waits; 24's load is dropped
    assert rig.gate(2 * E, at=(0, 2)) == [Reorder(load_ids=ids(near))]
    # the gate of (0, 3) chooses 24 before the loader has answered the Preempt
    issued = loads_in(rig.gate(3 * E, at=(0, 3)))
    issued += loads_in(rig.preempted([far], [1]))
    # 24 is pinned: the inference worker waits for it, so it must be loaded or wait for a slot
    assert E in experts_of(issued)
    assert 3 * E in experts_of(issued) or 3 * E in rig.cache.waiting, (
        "expert 24, chosen by the gate, has no slot, no load in flight and is not waiting")


# ---------------------------------------------------------------- wasted bytes and prediction scoring
def test_wasted_bytes_count_speculation_evicted_before_any_gate_chose_it(make_rig) -> None:
    rig = make_rig(n_slots=3, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, at=(0, 0))
    for load in loads_in(rig.predict(0, 1, E, E + 1)):
        rig.loaded(load)
    rig.use(E, at=(0, 1))  # 8 chosen; 9 never
    # 9 (never chosen) is expected last, then 8 (its layer's next gate comes after 0's); both go
    loads = rig.gate(2 * E, 2 * E + 1, at=(0, 2))
    assert experts_of(loads) == [2 * E, 2 * E + 1]
    assert rig.resident() == {0}
    assert rig.cache.counters.wasted_bytes == rig.layout.expert_nbytes  # 9 only: 8 was prefetched, and chosen
    assert rig.cache.counters.evictions == 2


def test_prediction_scoring(make_rig) -> None:
    rig = make_rig(n_slots=9, policy="promoe")  # no eviction: every expert below stays where it is
    rig.cache.begin_request(RequestId(1))
    counters = rig.cache.counters
    rig.use(0, 1, at=(0, 0))  # no prediction for (0, 0): only chosen counts
    assert (counters.predicted, counters.predicted_chosen, counters.predicted_ready, counters.chosen) == (0, 0, 0, 2)

    spec = by_expert(rig.predict(0, 1, E, E + 1, E + 2, E + 4))
    rig.loaded(spec[E])  # ready, will be chosen
    rig.ready(spec[E + 1], N_CHUNKS - 1)  # will be chosen, one chunk short: not ready
    rig.loaded(spec[E + 2])  # ready, not chosen
    # 12: in flight, nothing landed, not chosen
    commands = rig.gate(E, E + 1, E + 5, at=(0, 1))
    assert (counters.predicted, counters.predicted_chosen, counters.predicted_ready, counters.chosen) == (4, 2, 2, 5)
    assert commands[:2] == [Preempt(load_ids=ids(spec[E + 4])), Reorder(load_ids=ids(spec[E + 1]))]
    assert experts_of(commands[2:]) == [E + 5]

    # a prediction whose gate never reports (skipped here) is dropped, not scored
    rig.predict(0, 2, 2 * E)
    rig.gate(3 * E, at=(0, 3))
    assert (counters.predicted, counters.predicted_chosen, counters.predicted_ready, counters.chosen) == (4, 2, 2, 6)

    # predicted, chosen and already resident
    assert rig.predict(1, 0, 0) == []
    assert rig.cache.counters.evictions == 0
    rig.gate(0, 2, at=(1, 0))
    assert (counters.predicted, counters.predicted_chosen, counters.predicted_ready, counters.chosen) == (5, 3, 3, 8)


# ---------------------------------------------------------------- policies
def first(policy, *allowed: ExpertId) -> ExpertId | None:
    """The policy's victim among ``allowed`` (resident experts only are ranked)."""
    return policy.victim(lambda e: e in allowed)


def test_lru_policy_ranks_by_last_use() -> None:
    policy = LruPolicy()
    e = [ExpertId(i) for i in range(4)]
    policy.record_use([e[0], e[1]])
    policy.record_load(e[1])
    policy.record_load(e[2])
    policy.record_use([e[0]])
    policy.record_load(e[0])  # a load does not refresh a known expert
    assert first(policy, e[0], e[1], e[2]) == e[1]
    assert first(policy, e[0], e[2]) == e[2]
    assert first(policy, e[3], e[0]) == e[0]  # 3 is not resident: never a victim
    assert first(policy) is None
    policy.record_evict(e[1])
    assert first(policy, e[0], e[1], e[2]) == e[2]
    policy.record_use([e[2]])  # a use re-ranks a resident expert
    assert first(policy, e[0], e[2]) == e[0]


def test_lfu_and_promoe_policies_rank() -> None:
    e = [ExpertId(i) for i in range(3)]
    lfu = LfuPolicy()
    lfu.record_use([e[0]])
    lfu.record_use([e[0]])
    lfu.record_use([e[1]])
    for expert in e:
        lfu.record_load(expert)  # a load is not a use
    assert first(lfu, e[0], e[1], e[2]) == e[2]
    lfu.record_use([e[2]])  # 1 and 2 used once each: 1 is older
    assert first(lfu, e[0], e[1], e[2]) == e[1]
    assert first(lfu, e[0], e[2]) == e[2]



def resident_promoe(*experts: int) -> PromoePolicy:
    policy = PromoePolicy(layout(16))
    for expert in experts:
        policy.record_load(ExpertId(expert))
    return policy


def test_promoe_evicts_the_expert_whose_next_gate_is_farthest() -> None:
    """Same reuse statistics: the expert of a layer whose gate comes later goes first."""
    policy = resident_promoe(0, E, 3 * E)
    for layer in range(3):  # now at (0, 2): layer 3's gate is next, layer 0's is far
        policy.record_use([ExpertId(layer * E + 1)], (0, layer))
    assert first(policy, ExpertId(0), ExpertId(E), ExpertId(3 * E)) == ExpertId(E)
    assert first(policy, ExpertId(0), ExpertId(3 * E)) == ExpertId(0)


def test_promoe_keeps_what_the_predictor_expects_and_drops_a_confident_miss() -> None:
    policy = resident_promoe(E, E + 1)
    policy.record_use([ExpertId(0)], (0, 0))
    policy.record_prediction((0, 1), [ExpertId(E)], [0.95])
    assert first(policy, ExpertId(E), ExpertId(E + 1)) == ExpertId(E + 1)
    policy.record_prediction((0, 1), [ExpertId(E + 1)], [0.95])  # the predictor changed its mind
    assert first(policy, ExpertId(E), ExpertId(E + 1)) == ExpertId(E)


def test_promoe_ranks_by_the_outlook_for_the_next_gate_of_a_layer_and_forgets_it_once_passed() -> None:
    """Same history: the outlook (a probability for every expert of a layer at its next gate) decides; once that gate
    has passed the outlook is about the past and no longer counts."""
    policy = resident_promoe(E, E + 1)
    policy.record_use([ExpertId(0)], (0, 0))
    policy.record_outlook((0, 1), np.array([0.9, 0.05, *[0.01] * (E - 2)]))
    assert first(policy, ExpertId(E), ExpertId(E + 1)) == ExpertId(E + 1)
    policy.record_outlook((0, 1), np.array([0.05, 0.9, *[0.01] * (E - 2)]))  # a newer outlook replaces it
    assert first(policy, ExpertId(E), ExpertId(E + 1)) == ExpertId(E)
    policy.record_prediction((0, 1), [ExpertId(E)], [0.95])  # a top-k prediction is the nearer word
    assert first(policy, ExpertId(E), ExpertId(E + 1)) == ExpertId(E + 1)
    policy.record_use([ExpertId(E + 2)], (0, 1))  # the gate chose neither: both now wait for token 1's gate
    policy.record_outlook((1, 1), np.array([0.02, 0.8, *[0.01] * (E - 2)]))
    assert first(policy, ExpertId(E), ExpertId(E + 1)) == ExpertId(E)
    policy.record_use([ExpertId(0)], (0, 0))  # a new request: the outlook for its steps is void
    policy.record_use([ExpertId(E + 2)], (0, 1))
    assert float(policy._eta[E]) == float(policy._eta[E + 1])


def test_promoe_admits_a_guess_only_if_it_is_expected_sooner_than_its_victim() -> None:
    policy = resident_promoe(E)
    policy.record_use([ExpertId(0)], (0, 0))
    policy.record_prediction((0, 1), [ExpertId(E)], [0.99])  # the resident one is about to be used
    assert policy.victim(lambda e: True, incoming=(ExpertId(2 * E), (0, 2))) is None
    policy.record_prediction((0, 1), [ExpertId(E)], [0.01])  # ... or very likely not
    policy.record_prediction((0, 2), [ExpertId(2 * E)], [0.9])
    assert policy.victim(lambda e: True, incoming=(ExpertId(2 * E), (0, 2))) == ExpertId(E)


def test_promoe_admits_an_uncertain_guess_only_while_the_link_is_quiet() -> None:
    policy = resident_promoe()
    policy.record_prediction((0, 1), [ExpertId(E), ExpertId(E + 1)], [0.9, 0.3])
    assert policy.admits(ExpertId(E + 1), (0, 1), loads_in_flight=0)
    assert not policy.admits(ExpertId(E + 1), (0, 1), loads_in_flight=2)  # 2 / (2 + 1) > 0.3
    assert policy.admits(ExpertId(E), (0, 1), loads_in_flight=8)  # 8 / 9 < 0.9


def test_promoe_speculates_only_onto_a_nearly_idle_link_while_the_host_computes_misses() -> None:
    """Host compute takes misses off the link: a guess then needs fewer than top_k / 3 loads in flight (0 here:
    top-2), for one token's gates after the host's last miss; then the usual rule again."""
    policy = resident_promoe()
    policy.record_use([ExpertId(0)], (0, 0))
    policy.record_prediction((0, 3), [ExpertId(3 * E)], [0.9])
    assert policy.admits(ExpertId(3 * E), (0, 3), loads_in_flight=1)
    policy.record_use([ExpertId(E), ExpertId(E + 1)], (0, 1), host=[ExpertId(E + 1)])  # the host took a miss
    assert not policy.admits(ExpertId(3 * E), (0, 3), loads_in_flight=1)
    assert policy.admits(ExpertId(3 * E), (0, 3), loads_in_flight=0), "an idle link still takes a guess"
    for position in ((0, 2), (0, 3), (1, 0), (1, 1)):  # one token of gates without the host
        policy.record_use([ExpertId(position[1] * E)], position)
    policy.record_prediction((1, 3), [ExpertId(3 * E + 1)], [0.9])
    assert not policy.admits(ExpertId(3 * E + 1), (1, 3), loads_in_flight=1)
    policy.record_use([ExpertId(2 * E)], (1, 2))
    assert policy.admits(ExpertId(3 * E + 1), (1, 3), loads_in_flight=1)


def test_busy_link_refuses_an_uncertain_speculative_load(make_rig) -> None:
    rig = make_rig(n_slots=9, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.gate(0, 1, at=(0, 0))  # two precise loads in flight
    assert rig.cache.on_predicted(0, 2, [ExpertId(2 * E), ExpertId(2 * E + 1)], [0.95, 0.2]) is None
    assert experts_of(rig.cache.drain()) == [2 * E]


def test_reuse_model_learns_that_recent_experts_return() -> None:
    """Expert 0 of every layer is chosen at every token, the others in turn: 0 is learnt to return, a stale one not."""
    from coordinator.policies.reuse import ReuseModel

    model = ReuseModel(n_experts=2 * E, experts_per_layer=E, top_k=2)
    for token in range(200):
        for layer in range(2):
            model.observe(layer, [layer * E, layer * E + 1 + token % (E - 2)])  # E - 1 is never chosen
        model.next_token()
    fresh, stale = model.probability(np.array([0, E - 1]), np.array([model.token, model.token]))
    assert fresh > 0.8 and stale < 0.15


def test_ranking_skips_what_may_not_go_and_keeps_it() -> None:
    ranking = Ranking()
    for i, key in enumerate([5, 1, 3, 2]):
        ranking.set(ExpertId(i), key)
    assert ranking.first(lambda e: e not in (1, 3)) == 2  # 1 (key 1) and 3 (key 2) may not go now
    assert ranking.first(lambda e: True) == 1  # ... but are still ranked
    ranking.set(ExpertId(1), 9)  # re-keyed
    ranking.discard(ExpertId(3))
    assert ranking.first(lambda e: True) == 2
    assert [ranking.first(lambda e, seen=seen: e not in seen) for seen in ((2,), (2, 0), (2, 0, 1))] == [0, 1, None]
    for i in range(1000):  # stale entries are compacted, not kept forever
        ranking.set(ExpertId(0), 100 + i)
    assert len(ranking._heap) <= 4 * len(ranking) + 64


def test_make_policy() -> None:
    made = {name: make_policy(name, layout(4)) for name in ("ondemand", "lru", "lfu", "promoe")}
    for name, kind in [("ondemand", OnDemandPolicy), ("lru", LruPolicy), ("lfu", LfuPolicy), ("promoe", PromoePolicy)]:
        assert isinstance(made[name], kind) and made[name].keeps_experts == (name != "ondemand")
    assert [name for name, policy in made.items() if policy.prefetches] == ["promoe"]
    with pytest.raises(ValueError):
        make_policy("fifo", layout(4))


def test_without_early_preemption_a_gate_neither_preempts_nor_reorders(make_rig) -> None:
    """The ablation switch: speculation runs to completion; only missing chosen experts are loaded."""
    rig = make_rig(n_slots=10, policy="promoe", early_preemption=False)
    rig.cache.begin_request(RequestId(1))
    rig.use(0, 1, at=(0, 0))
    spec = by_expert(rig.predict(0, 2, 2 * E, 2 * E + 1, 2 * E + 2))
    assert sorted(spec) == [2 * E, 2 * E + 1, 2 * E + 2]
    commands = rig.gate(2 * E, 2 * E + 5, at=(0, 2))
    assert not any(isinstance(c, (Preempt, Reorder)) for c in commands), commands
    assert experts_of(commands) == [2 * E + 5]


def test_speculation_never_evicts_an_expert_chosen_within_the_last_token(make_rig) -> None:
    """The next token's likely hits outrank a guess; a token later, speculation may take them."""
    rig = make_rig(n_slots=2, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, 1, at=(0, 0))
    assert rig.predict(0, 2, 2 * E) == []  # 0 and 1 were chosen at (0, 0): within one token of (0, 0)
    assert rig.resident() == {0, 1}
    assert rig.gate(0, at=(1, 0)) == []  # a hit, one token later; 0 is pinned and recent again, 1 is not
    assert experts_of(rig.predict(1, 2, 2 * E)) == [2 * E]
    assert rig.slot_of(1) is None and rig.slot_of(0) is not None


def test_fetch_rate_is_judged_on_what_the_worker_saw_at_its_gate(make_rig) -> None:
    """The worker's ``ready_experts`` decide FetchRate, not what the slot table says when the coordinator looks."""
    rig = make_rig(n_slots=9, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, 1, at=(0, 0))
    for load in loads_in(rig.predict(0, 1, E, E + 1)):
        rig.loaded(load)  # both landed before the coordinator handles the gate ...
    rig.gate(E, E + 1, at=(0, 1), ready=[E, E + 3])  # ... but the worker saw only 8 (and 11, not predicted)
    counters = rig.cache.request_counters
    assert (counters.predicted, counters.predicted_chosen, counters.predicted_ready) == (2, 2, 1)


def test_promoe_evicts_a_wrong_guess_before_an_older_real_use(make_rig) -> None:
    rig = make_rig(n_slots=3, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, at=(0, 0))
    for load in loads_in(rig.predict(0, 1, E, E + 1)):
        rig.loaded(load)  # prefetches count as uses: 8 and 9 are newer than 0
    rig.use(E, at=(0, 1))  # the gate chose 8, not 9
    assert experts_of(rig.gate(2 * E, at=(0, 2))) == [2 * E]
    assert rig.slot_of(E + 1) is None, "the wrong guess goes first"
    assert rig.resident() == {0, E}


def test_lru_keeps_plain_recency_for_its_own_loads(make_rig) -> None:
    """The contrast: without prediction the oldest use goes first."""
    rig = make_rig(n_slots=3, policy="lru")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, at=(0, 0))
    rig.use(E, E + 1, at=(0, 1))
    assert experts_of(rig.gate(2 * E, at=(0, 2))) == [2 * E]
    assert rig.slot_of(0) is None


def test_request_counters_charge_loads_to_the_request_that_issued_them(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    precise = loads_in(rig.gate(0, at=(0, 0)))
    (spec,) = loads_in(rig.predict(0, 2, 2 * E))
    rig.cache.begin_request(RequestId(2))  # request 1's loads are still in flight
    rig.loaded(precise[0])
    rig.preempted([spec], [2])
    totals, second = rig.cache.counters, rig.cache.request_counters
    assert (totals.experts_loaded, totals.wasted_bytes, totals.loads_issued) == (1, 2 * rig.chunk_nbytes, 2)
    assert (second.experts_loaded, second.wasted_bytes, second.loads_issued, second.preempted) == (0, 0, 0, 0)
    rig.unpin(0)
    for load in loads_in(rig.gate(1, at=(0, 0))):
        rig.loaded(load)
    assert (second.experts_loaded, second.loads_issued) == (1, 1)
    assert (totals.experts_loaded, totals.loads_issued) == (2, 3)


def test_end_request_preempts_its_speculation_and_nothing_else(make_rig) -> None:
    rig = make_rig(n_slots=6, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, at=(0, 0))
    spec = loads_in(rig.predict(0, 2, 2 * E, 2 * E + 1))
    precise = loads_in(rig.gate(E, at=(0, 1)))
    assert experts_of(precise) == [E]
    rig.cache.end_request()
    assert rig.drain() == [Preempt(load_ids=ids(*spec))]
    assert not rig.cache.is_protected(ExpertId(2 * E))
    rig.cache.end_request()
    assert rig.drain() == [], "a pending preemption is not asked for twice"


def test_reissue_after_a_loader_restart(make_rig) -> None:
    """The loader's queue died with it: loads in flight are sent again (precise first, from the first chunk not
    landed); loads it had been asked to preempt count as preempted, their landed chunks wasted."""
    rig = make_rig(n_slots=6, policy="promoe")
    rig.cache.begin_request(RequestId(1))
    rig.use(0, at=(0, 0))
    spec = by_expert(rig.predict(0, 2, 2 * E, 2 * E + 1))
    rig.ready(spec[2 * E], 2)
    (precise,) = loads_in(rig.gate(E, at=(0, 1)))
    rig.ready(precise, 1)
    rig.cache.end_request()
    assert rig.drain() == [Preempt(load_ids=ids(spec[2 * E], spec[2 * E + 1]))]  # lost with the loader
    (later,) = loads_in(rig.predict(0, 3, 3 * E))
    rig.cache.reissue_loads()
    commands = rig.cache.drain()
    assert commands == [
        LoadExpert(load_id=precise.load_id, expert=precise.expert, slot=precise.slot, seq=precise.seq,
                   priority=PRIORITY_PRECISE, first_chunk=1),
        LoadExpert(load_id=later.load_id, expert=later.expert, slot=later.slot, seq=later.seq,
                   priority=PRIORITY_SPECULATIVE, first_chunk=0),
    ]
    assert rig.slot_of(2 * E) is None and rig.slot_of(2 * E + 1) is None
    assert rig.cache.counters.preempted == 2
    assert rig.cache.counters.wasted_bytes == 2 * rig.chunk_nbytes
    rig.loaded(precise)
    assert rig.slot_of(E) is not None and rig.resident() == {0, E}


# ---------------------------------------------------------------- reconfigure and reset
def test_reconfigure_switches_policy_and_slots_in_use_and_starts_empty(make_rig) -> None:
    rig = make_rig(n_slots=4, policy="lru")
    rig.use(0, 1, 2)
    assert rig.cache.idle
    counters = rig.cache.counters.loads_issued
    rig.cache.reconfigure(make_policy("lfu", layout(4)), n_slots=2, early_preemption=False)
    assert rig.cache.policy.name == "lfu" and rig.cache.n_slots == 2 and not rig.cache.early_preemption
    assert rig.resident() == set()
    assert all(rig.state_of_slot(s) == FREE for s in range(4))
    assert rig.cache.counters.loads_issued == counters  # counters are kept
    rig.use(3, 4)
    rig.use(5)  # a third expert in two slots: one of the first two goes
    assert len(rig.resident()) == 2 and 5 in rig.resident()
    assert {rig.slot_of(e) for e in rig.resident()} <= {0, 1}  # never a slot beyond those in use
    with pytest.raises(ValueError):
        rig.cache.reconfigure(make_policy("lru", layout(4)), n_slots=5, early_preemption=True)


def test_reconfigure_refuses_while_loads_are_in_flight(make_rig) -> None:
    rig = make_rig(n_slots=3)
    (load,) = rig.gate(0)
    assert not rig.cache.idle
    with pytest.raises(RuntimeError):
        rig.cache.reconfigure(make_policy("lru", layout(4)), n_slots=3, early_preemption=True)
    rig.loaded(load)
    assert rig.cache.idle


def test_reset_forgets_every_slot_and_load(make_rig) -> None:
    rig = make_rig(n_slots=3)
    rig.use(0, 1)
    (loading,) = rig.gate(2)
    rig.cache.reset()  # a new inference worker: its slots hold nothing
    assert rig.resident() == set() and rig.cache.idle
    assert all(rig.state_of_slot(s) == FREE for s in range(3))
    assert rig.cache.on_loaded(loading.load_id, loading.seq) is None  # the old load's report is ignored
    assert experts_of(rig.gate(0, at=(1, 0))) == [0]  # loaded again
    assert rig.cache.policy.victim(lambda e: True) is None  # the policy was told: nothing of before is ranked
