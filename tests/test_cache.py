"""The coordinator's cache directory over a real slot table: LRU, pins, loading slots, waiting, ondemand, counters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from coordinator.cache import CacheDirectory
from coordinator.policies import LruPolicy, OnDemandPolicy, make_policy
from protocol.ids import ExpertId, LoadId
from protocol.messages import PRIORITY_PRECISE, LoadExpert
from shm.layout import ExpertLayout
from shm.segment import SHM_DIR, Segment, leftover_segments, segment_name
from shm.slot_table import FREE, LOADING, RESIDENT, SlotTable


def layout(n_slots: int) -> ExpertLayout:
    return ExpertLayout(moe_layers=(0, 1), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                        storage_dtype="bfloat16", compute_dtype="float32", n_chunks=3, n_slots=n_slots)


class Rig:
    def __init__(self, n_slots: int, policy: str) -> None:
        self.layout = layout(n_slots)
        self.run_id = f"test_{uuid.uuid4().hex[:12]}"
        lay = self.layout
        self.segment = Segment.create(segment_name(self.run_id, "table"),
                                      SlotTable.nbytes_for(lay.n_slots, lay.n_experts))
        self.table = SlotTable(self.segment, lay.n_slots, lay.n_experts, lay.n_chunks, init=True)
        self.cache = CacheDirectory(self.table, lay, make_policy(policy))
        self.issued: list[LoadExpert] = []

    # -------------------------------------------------------- what the inference worker and the loader do
    def gate(self, *experts: int, pin: bool = True) -> list[LoadExpert]:
        ids = [ExpertId(e) for e in experts]
        if pin:
            self.table.pin(ids)
        loads = self.cache.on_gate(ids)
        self.check_loads(loads)
        return loads

    def unpin(self, *experts: int) -> None:
        for e in experts:
            self.table.unpin(ExpertId(e))

    def loaded(self, load: LoadExpert) -> list[LoadExpert]:
        """The loader copied every chunk and published readiness; the coordinator gets ExpertLoaded."""
        assert self.table.publish_ready(load.slot, load.seq, self.layout.n_chunks)
        loads = self.cache.on_loaded(load.load_id, load.seq)
        self.check_loads(loads)
        return loads

    def use(self, *experts: int) -> None:
        """A whole layer step: the gate chooses, every missing expert is loaded, everything is computed."""
        pending = self.gate(*experts)
        while pending:
            pending = [*pending[1:], *self.loaded(pending[0])]
        self.unpin(*experts)
        for e in experts:
            assert int(self.table.slot_state[self.table.expert_slot[e]]) == RESIDENT

    def check_loads(self, loads: list[LoadExpert]) -> None:
        for load in loads:
            assert load.load_id not in {old.load_id for old in self.issued}, "load id reused"
            self.issued.append(load)
            # the command carries exactly what the table says
            assert load.seq == int(self.table.slot_seq[load.slot])
            assert int(self.table.slot_expert[load.slot]) == load.expert
            assert int(self.table.expert_slot[load.expert]) == load.slot
            assert int(self.table.slot_state[load.slot]) == LOADING
            assert int(self.table.slot_ready[load.slot]) == 0
            assert load.priority == PRIORITY_PRECISE and load.first_chunk == 0

    # -------------------------------------------------------- queries
    def resident(self) -> set[int]:
        return {int(e) for e in self.cache.resident_experts()}

    def slot_of(self, expert: int) -> int | None:
        slot = self.cache.slot_of(ExpertId(expert))
        return None if slot is None else int(slot)

    def close(self) -> None:
        self.table.close()
        self.segment.unlink()
        assert not (SHM_DIR / self.segment.name).exists()
        assert leftover_segments(self.run_id) == []


@pytest.fixture
def make_rig() -> Iterator:
    rigs: list[Rig] = []

    def make(n_slots: int = 3, policy: str = "lru") -> Rig:
        rig = Rig(n_slots, policy)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def experts_of(loads: list[LoadExpert]) -> list[int]:
    return [int(load.expert) for load in loads]


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
    assert rig.cache.on_gate([ExpertId(2), ExpertId(2)]) == []
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
    assert rig.cache.on_loaded(LoadId(999), 1) == []  # unknown load: no count
    assert rig.cache.on_loaded(a.load_id, a.seq) == []  # a duplicate report: no count
    assert rig.cache.counters.experts_loaded == 1
    rig.loaded(b)
    assert rig.cache.counters.experts_loaded == 2
    assert rig.cache.counters.bytes_loaded == 2 * rig.layout.expert_nbytes
    assert rig.cache.counters.loads_issued == 2


def test_loaded_report_with_a_stale_seq_is_not_counted(make_rig) -> None:
    rig = make_rig()
    (load,) = rig.gate(3)
    assert rig.cache.on_loaded(load.load_id, load.seq - 1) == []
    assert rig.cache.counters.experts_loaded == 0
    assert int(rig.table.slot_state[load.slot]) == LOADING


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
    rig.use(4)  # layer 1, expert 0
    rig.use(0, 1)  # layer 0
    rig.use(5)  # layer 1: evicts the oldest, from layer 1
    assert rig.resident() == {0, 1, 5}


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
    assert int(rig.table.slot_state[loading.slot]) == LOADING
    assert rig.slot_of(0) is None  # the LRU resident expert went instead
    assert rig.loaded(loading) == []  # the untouched load completes
    assert 6 in rig.resident()


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
    assert rig.cache.on_released() == []

    rig.unpin(1)
    loads = rig.cache.on_released()
    rig.check_loads(loads)
    assert experts_of(loads) == [3]  # one slot: the first waiting expert
    assert int(loads[0].slot) == b.slot
    assert rig.cache.waiting == [4]
    assert rig.table.waiting_for_slot is True

    rig.unpin(0, 2)
    loads = rig.cache.on_released()
    rig.check_loads(loads)
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
    loads = rig.gate(1, 4)
    assert experts_of(loads) == [4]
    # 0 and 3 released; 1 chosen, 2 pinned, 7 loading: kept
    assert rig.resident() == {1, 2}
    assert rig.slot_of(0) is None and rig.slot_of(3) is None
    assert rig.slot_of(7) == int(loading.slot)
    assert int(rig.table.slot_state[loading.slot]) == LOADING
    free = [s for s in range(rig.layout.n_slots) if int(rig.table.slot_state[s]) == FREE]
    assert len(free) == 2  # six slots, four taken: 1, 2, 7 and the new 4
    assert rig.cache.counters.evictions == 2


def test_lru_keeps_unchosen_experts(make_rig) -> None:
    rig = make_rig(n_slots=6, policy="lru")
    rig.use(0, 1)
    rig.use(2, 3)
    rig.gate(1, 4)
    assert rig.resident() == {0, 1, 2, 3}
    assert rig.cache.counters.evictions == 0


def test_forget_pins(make_rig) -> None:
    rig = make_rig(n_slots=3)
    rig.gate(0, 1)
    rig.cache.forget_pins()
    assert not rig.table.is_pinned(ExpertId(0)) and not rig.table.is_pinned(ExpertId(1))


# ---------------------------------------------------------------- policies
def test_lru_policy_ranks_by_last_use() -> None:
    policy = LruPolicy()
    e = [ExpertId(i) for i in range(4)]
    policy.record_use([e[0], e[1]])
    policy.record_load(e[2])
    policy.record_use([e[0]])
    policy.record_load(e[0])  # a load does not refresh a known expert
    assert policy.choose_victim([e[0], e[1], e[2]]) == e[1]
    assert policy.choose_victim([e[0], e[2]]) == e[2]
    assert policy.choose_victim([e[3], e[0]]) == e[3]  # never seen: oldest


def test_make_policy() -> None:
    assert isinstance(make_policy("lru"), LruPolicy) and make_policy("lru").keeps_experts
    assert isinstance(make_policy("ondemand"), OnDemandPolicy) and not make_policy("ondemand").keeps_experts
    with pytest.raises(ValueError):
        make_policy("fifo")
