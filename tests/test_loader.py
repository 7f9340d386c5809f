"""The loader's chunk queue (priorities, Preempt, Reorder), then a real Loader driven by hand over real sockets."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from protocol.codec import MAX_MESSAGE_NBYTES, decode
from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, LoadId, SlotId
from protocol.messages import (
    PRIORITY_PRECISE,
    PRIORITY_SPECULATIVE,
    ExpertLoaded,
    LoadExpert,
    LoadsPreempted,
    Message,
    Ping,
    PingAnswered,
    Preempt,
    Reorder,
)
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.layout import ExpertLayout
from shm.segment import SHM_DIR, Segment, leftover_segments, segment_name
from shm.slot_table import SlotTable
from workers.bootstrap import Inbox, push_socket, send
from workers.chunk_queue import ChunkQueue, QueuedLoad
from workers.loader import CpuCopyEngine, Loader

P, S = PRIORITY_PRECISE, PRIORITY_SPECULATIVE


# ---------------------------------------------------------------- chunk queue
def load(load_id: int, priority: int = P, n_chunks: int = 3, first_chunk: int = 0) -> QueuedLoad:
    msg = LoadExpert(load_id=LoadId(load_id), expert=ExpertId(10 + load_id), slot=SlotId(load_id), seq=1,
                     priority=priority, first_chunk=first_chunk)
    return QueuedLoad.from_message(msg, n_chunks)


def drain(queue: ChunkQueue) -> list[tuple[int, int]]:
    out = []
    while (item := queue.pop_chunk()) is not None:
        out.append((int(item[0].load_id), item[1]))
    return out


def test_empty_queue() -> None:
    queue = ChunkQueue()
    assert queue.pop_chunk() is None
    assert len(queue) == 0
    assert queue.queued_load_ids() == []


def test_chunks_of_a_load_in_order_and_loads_fifo() -> None:
    queue = ChunkQueue()
    queue.push(load(1))
    queue.push(load(2))
    assert drain(queue) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_precise_before_speculative() -> None:
    queue = ChunkQueue()
    queue.push(load(1, S))
    queue.push(load(2, P))
    queue.push(load(3, S))
    assert queue.queued_load_ids() == [2, 1, 3]
    first = queue.pop_chunk()
    assert first is not None and first[0].load_id == 2
    queue.push(load(4, P))  # arrives while a speculative load waits: still served first
    assert drain(queue) == [(2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)]


def test_a_precise_load_interrupts_a_speculative_one_between_chunks() -> None:
    queue = ChunkQueue()
    queue.push(load(1, S))
    assert drain_n(queue, 1) == [(1, 0)]
    queue.push(load(2, P))
    assert drain(queue) == [(2, 0), (2, 1), (2, 2), (1, 1), (1, 2)]


def drain_n(queue: ChunkQueue, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        item = queue.pop_chunk()
        assert item is not None
        out.append((int(item[0].load_id), item[1]))
    return out


def test_len_counts_remaining_chunks() -> None:
    queue = ChunkQueue()
    queue.push(load(1))
    queue.push(load(2, S, n_chunks=5))
    queue.push(load(3, first_chunk=2))
    assert len(queue) == 3 + 5 + 1
    drain_n(queue, 2)
    assert len(queue) == 7
    queue.preempt([LoadId(2)])
    assert len(queue) == 2
    drain(queue)
    assert len(queue) == 0


def test_first_chunk_resumes() -> None:
    queue = ChunkQueue()
    queue.push(load(1, n_chunks=4, first_chunk=2))
    assert drain(queue) == [(1, 2), (1, 3)]


@pytest.mark.parametrize("first_chunk", [-1, 3, 10])
def test_invalid_first_chunk(first_chunk: int) -> None:
    with pytest.raises(ValueError):
        load(1, first_chunk=first_chunk)


@pytest.mark.parametrize("priority", [-1, 2, 7])
def test_invalid_priority(priority: int) -> None:
    with pytest.raises(ValueError):
        load(1, priority)


def test_duplicate_load_id_is_refused() -> None:
    queue = ChunkQueue()
    queue.push(load(1))
    with pytest.raises(ValueError):
        queue.push(load(1, S))
    assert drain(queue) == [(1, 0), (1, 1), (1, 2)]


def test_preempt_drops_exactly_the_given_loads() -> None:
    queue = ChunkQueue()
    for load_id, priority in ((1, P), (2, P), (3, S), (4, S)):
        queue.push(load(load_id, priority))
    assert drain_n(queue, 2) == [(1, 0), (1, 1)]
    dropped = queue.preempt([LoadId(1), LoadId(3), LoadId(99)])
    assert dropped == [(1, 2), (3, 0)]  # chunks already handed out; unknown loads are not reported
    assert queue.queued_load_ids() == [2, 4]
    assert len(queue) == 6
    assert queue.preempt([LoadId(1)]) == []  # already dropped
    assert drain(queue) == [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)]


def test_preempt_of_a_fully_handed_out_load_is_not_reported() -> None:
    queue = ChunkQueue()
    queue.push(load(1))
    queue.push(load(2))
    drain_n(queue, 3)  # every chunk of load 1 is out: it completes
    assert queue.preempt([LoadId(1), LoadId(2)]) == [(2, 0)]
    assert queue.pop_chunk() is None


def test_reorder_moves_loads_to_the_front_and_makes_them_precise() -> None:
    queue = ChunkQueue()
    for load_id, priority in ((1, P), (2, P), (3, P), (4, S), (5, S), (6, S)):
        queue.push(load(load_id, priority))
    queue.reorder([LoadId(6), LoadId(3), LoadId(99), LoadId(2)])
    # 6 (promoted from speculative), 3, 2 at the very front in the given order; unknown 99 ignored
    assert queue.queued_load_ids() == [6, 3, 2, 1, 4, 5]
    assert [c[0] for c in drain(queue)][::3] == [6, 3, 2, 1, 4, 5]


def test_reorder_of_a_started_load_keeps_its_progress() -> None:
    queue = ChunkQueue()
    queue.push(load(1))
    queue.push(load(2))
    drain_n(queue, 1)
    queue.reorder([LoadId(2), LoadId(1)])
    assert drain(queue) == [(2, 0), (2, 1), (2, 2), (1, 1), (1, 2)]


# ---------------------------------------------------------------- a real loader
LAYOUT = ExpertLayout(moe_layers=(0, 1), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                      storage_dtype="float32", compute_dtype="float32", n_chunks=3, n_slots=4)
SENTINEL = -7.0
TIMEOUT_S = 5.0


class Rig:
    """A Loader with real segments and sockets; the test plays the coordinator."""

    def __init__(self, root: Path, layout: ExpertLayout = LAYOUT, link_gbps: float | None = None) -> None:
        self.layout = layout
        self.run_id = f"test_{uuid.uuid4().hex[:12]}"
        self.segments: list[Segment] = []
        self.store = HostExpertStore(self._segment("store", HostExpertStore.nbytes_for(layout)), layout)
        self.slots = CacheSlots(self._segment("slots", CacheSlots.nbytes_for(layout)), layout)
        self.table = SlotTable(self._segment("table", SlotTable.nbytes_for(layout.n_slots, layout.n_experts)),
                               layout.n_slots, layout.n_experts, layout.n_chunks, init=True)
        for expert in range(layout.n_experts):  # distinct values per expert and per element
            self.store.experts[expert] = 1000 * (expert + 1) + torch.arange(layout.expert_numel)
        self.slots.slots.fill_(SENTINEL)
        cfg = RuntimeConfig(run_id=self.run_id, run_dir=str(root), checkpoint="", layout=layout, policy="lru",
                            device="cpu", bind="", link_gbps=link_gbps, lookahead=1, predictor_path=None,
                            load_timeout_s=1.0, supervisor_pid=os.getpid())
        self.ctx = zmq.Context()
        inbox_endpoint, coordinator_endpoint = cfg.endpoint("loader"), cfg.endpoint("coordinator")
        assert len(inbox_endpoint) < 100, "ipc path too long"
        self.coordinator = self.ctx.socket(zmq.PULL)
        self.coordinator.setsockopt(zmq.LINGER, 0)
        self.coordinator.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_NBYTES)
        self.coordinator.bind(coordinator_endpoint)
        self.inbox = Inbox(self.ctx, inbox_endpoint)
        self.to_loader = push_socket(self.ctx, inbox_endpoint)
        self.engine = CpuCopyEngine(self.store, self.slots, link_gbps)
        self.loader = Loader(cfg, self.table, self.engine, self.inbox, push_socket(self.ctx, coordinator_endpoint))
        self.received: list[Message] = []
        self._nonce = 0

    def _segment(self, what: str, nbytes: int) -> Segment:
        segment = Segment.create(segment_name(self.run_id, what), nbytes)
        self.segments.append(segment)
        return segment

    # -------------------------------------------------------- the coordinator's side
    def assign(self, slot: int, expert: int) -> int:
        return self.table.assign(SlotId(slot), ExpertId(expert))

    def load(self, load_id: int, slot: int, expert: int, priority: int = P, first_chunk: int = 0) -> LoadExpert:
        seq = self.assign(slot, expert)
        msg = LoadExpert(load_id=LoadId(load_id), expert=ExpertId(expert), slot=SlotId(slot), seq=seq,
                         priority=priority, first_chunk=first_chunk)
        send(self.to_loader, msg)
        return msg

    def deliver(self) -> None:
        """Let the loader read its inbox until it handled everything sent so far (a Ping marks the end)."""
        self._nonce += 1
        send(self.to_loader, Ping(nonce=self._nonce, sent_ns=0))
        deadline = time.monotonic() + TIMEOUT_S
        while not any(isinstance(m, PingAnswered) and m.nonce == self._nonce for m in self.received):
            assert time.monotonic() < deadline, "the loader did not answer"
            self.loader.drain_inbox(0.05)
            self.collect(0.01)

    def collect(self, timeout_s: float = 0.0) -> None:
        while self.coordinator.poll(int(timeout_s * 1000)):
            self.received.append(decode(self.coordinator.recv()))
            timeout_s = 0

    def events(self, kind: type[Message]) -> list:
        return [m for m in self.received if isinstance(m, kind)]

    def run_until_idle(self, max_steps: int = 100) -> int:
        steps = 0
        while self.loader.step():
            steps += 1
            assert steps < max_steps
        self.deliver()  # flushes the loader's sends behind a Ping answer
        return steps

    # -------------------------------------------------------- checks
    def slot_chunk(self, slot: int, chunk: int) -> torch.Tensor:
        return self.slots.chunk(SlotId(slot), chunk)

    def store_chunk(self, expert: int, chunk: int) -> torch.Tensor:
        return self.store.chunk(ExpertId(expert), chunk)

    def assert_slot_holds(self, slot: int, expert: int) -> None:
        wrong = {}
        for chunk in range(self.layout.n_chunks):
            held = self.slot_chunk(slot, chunk)
            if not torch.equal(held, self.store_chunk(expert, chunk).to(held.dtype)):
                wrong[chunk] = held[:2].tolist()
        assert wrong == {}, f"slot {slot} should hold expert {expert}; wrong chunks (first values): {wrong}"

    def close(self) -> None:
        self.inbox.close()
        self.to_loader.close(linger=0)
        self.loader.send_to_coordinator.close(linger=0)
        self.coordinator.close(linger=0)
        self.ctx.term()
        self.store.close()
        self.slots.close()
        self.table.close()
        for segment in self.segments:
            if (SHM_DIR / segment.name).exists():
                segment.unlink()
        assert leftover_segments(self.run_id) == []


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.timeout(30)
def test_load_fills_the_slot_and_reports(rig: Rig) -> None:
    msg = rig.load(1, slot=2, expert=5)
    rig.deliver()
    assert len(rig.loader.queue) == LAYOUT.n_chunks
    for chunk in range(LAYOUT.n_chunks):
        assert rig.loader.step()
        assert rig.table.chunks_ready(SlotId(2)) == chunk + 1  # readiness after each chunk, not only at the end
        assert torch.equal(rig.slot_chunk(2, chunk), rig.store_chunk(5, chunk))
        if chunk + 1 < LAYOUT.n_chunks:
            assert torch.all(rig.slot_chunk(2, chunk + 1) == SENTINEL)
    assert not rig.loader.step()
    rig.deliver()
    rig.assert_slot_holds(2, 5)
    assert rig.table.is_ready(rig.table.lookup(ExpertId(5)))
    (loaded,) = rig.events(ExpertLoaded)
    assert (loaded.load_id, loaded.seq) == (1, msg.seq)
    for other in (0, 1, 3):
        assert torch.all(rig.slots.slots[other] == SENTINEL)


@pytest.mark.timeout(30)
def test_resumed_load_copies_only_the_remaining_chunks(rig: Rig) -> None:
    rig.load(1, slot=0, expert=3, first_chunk=1)
    rig.deliver()
    assert rig.run_until_idle() == LAYOUT.n_chunks - 1
    assert torch.all(rig.slot_chunk(0, 0) == SENTINEL)
    for chunk in (1, 2):
        assert torch.equal(rig.slot_chunk(0, chunk), rig.store_chunk(3, chunk))
    (loaded,) = rig.events(ExpertLoaded)
    assert loaded.load_id == 1
    assert rig.table.chunks_ready(SlotId(0)) == LAYOUT.n_chunks


@pytest.mark.timeout(30)
def test_a_load_sent_twice_is_copied_once(rig: Rig) -> None:
    """After a restart the coordinator re-issues loads that may also still sit in the old socket's queue."""
    msg = rig.load(1, slot=0, expert=3)
    send(rig.to_loader, msg)
    rig.deliver()
    assert rig.run_until_idle() == LAYOUT.n_chunks
    assert len(rig.events(ExpertLoaded)) == 1
    rig.assert_slot_holds(0, 3)


@pytest.mark.timeout(30)
def test_a_reissued_load_whose_chunks_all_landed_is_only_reported(rig: Rig) -> None:
    seq = rig.assign(1, 6)
    assert rig.table.publish_ready(SlotId(1), seq, LAYOUT.n_chunks)  # the old loader copied it, then died
    send(rig.to_loader, LoadExpert(load_id=LoadId(4), expert=ExpertId(6), slot=SlotId(1), seq=seq,
                                   first_chunk=LAYOUT.n_chunks))
    rig.deliver()
    assert rig.run_until_idle() == 0
    assert torch.all(rig.slots.slots[1] == SENTINEL), "nothing was copied again"
    (loaded,) = rig.events(ExpertLoaded)
    assert (loaded.load_id, loaded.seq) == (4, seq)


@pytest.mark.timeout(30)
def test_loaded_order_follows_priority_and_reorder(rig: Rig) -> None:
    rig.load(1, slot=0, expert=0)
    rig.load(2, slot=1, expert=1, priority=S)
    rig.load(3, slot=2, expert=2)
    rig.load(4, slot=3, expert=7)
    send(rig.to_loader, Reorder(load_ids=[LoadId(4), LoadId(2), LoadId(3)]))
    rig.deliver()
    assert rig.loader.queue.queued_load_ids() == [4, 2, 3, 1]
    rig.run_until_idle()
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [4, 2, 3, 1]
    for slot, expert in ((0, 0), (1, 1), (2, 2), (3, 7)):
        rig.assert_slot_holds(slot, expert)
    assert rig.events(LoadsPreempted) == []


@pytest.mark.timeout(30)
def test_reorder_between_chunks(rig: Rig) -> None:
    rig.load(1, slot=0, expert=0)
    rig.load(2, slot=1, expert=1)
    rig.deliver()
    assert rig.loader.step()  # load 1, chunk 0
    send(rig.to_loader, Reorder(load_ids=[LoadId(2)]))
    rig.deliver()
    for _ in range(LAYOUT.n_chunks):
        assert rig.loader.step()
    rig.deliver()
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [2]
    assert rig.table.chunks_ready(SlotId(0)) == 1
    rig.run_until_idle()
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [2, 1]
    rig.assert_slot_holds(0, 0)
    rig.assert_slot_holds(1, 1)


@pytest.mark.timeout(30)
def test_preempt_between_chunks(rig: Rig) -> None:
    rig.load(1, slot=0, expert=4)
    rig.load(2, slot=1, expert=6, priority=S)
    rig.load(3, slot=2, expert=2)
    rig.deliver()
    assert rig.loader.step() and rig.loader.step()  # two chunks of load 1
    send(rig.to_loader, Preempt(load_ids=[LoadId(1), LoadId(2)]))
    rig.deliver()
    (preempted,) = rig.events(LoadsPreempted)
    assert preempted.load_ids == [1, 2]
    assert preempted.chunks_done == [2, 0]
    assert rig.loader.queue.queued_load_ids() == [3]

    assert rig.run_until_idle() == LAYOUT.n_chunks  # only load 3 is left
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [3]
    rig.assert_slot_holds(2, 2)
    # the preempted load stopped where it was: its chunks done are there, the rest was never copied
    assert rig.table.chunks_ready(SlotId(0)) == 2
    assert not rig.table.is_ready(rig.table.lookup(ExpertId(4)))
    for chunk in (0, 1):
        assert torch.equal(rig.slot_chunk(0, chunk), rig.store_chunk(4, chunk))
    assert torch.all(rig.slot_chunk(0, 2) == SENTINEL)
    assert rig.table.chunks_ready(SlotId(1)) == 0
    assert torch.all(rig.slots.slots[1] == SENTINEL)


@pytest.mark.timeout(30)
def test_preempt_of_a_finished_or_unknown_load_reports_nothing(rig: Rig) -> None:
    rig.load(1, slot=0, expert=1)
    rig.deliver()
    rig.run_until_idle()
    send(rig.to_loader, Preempt(load_ids=[LoadId(1), LoadId(42)]))
    rig.deliver()
    assert rig.events(LoadsPreempted) == []
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [1]
    rig.assert_slot_holds(0, 1)


@pytest.mark.timeout(30)
def test_preempted_load_can_be_resumed(rig: Rig) -> None:
    first = rig.load(1, slot=0, expert=4)
    rig.deliver()
    rig.loader.step()
    send(rig.to_loader, Preempt(load_ids=[LoadId(1)]))
    rig.deliver()
    (preempted,) = rig.events(LoadsPreempted)
    done = preempted.chunks_done[0]
    assert done == 1
    # the coordinator resumes it in the same slot, same sequence, from the first missing chunk
    send(rig.to_loader, LoadExpert(load_id=LoadId(2), expert=first.expert, slot=first.slot, seq=first.seq,
                                   first_chunk=done))
    rig.deliver()
    assert rig.run_until_idle() == LAYOUT.n_chunks - done
    rig.assert_slot_holds(0, 4)
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [2]


@pytest.mark.timeout(30)
def test_load_of_a_reassigned_slot_is_dropped(rig: Rig) -> None:
    old = rig.load(1, slot=0, expert=4)
    rig.deliver()
    assert rig.loader.step()
    assert rig.table.chunks_ready(SlotId(0)) == 1
    new_seq = rig.assign(0, 5)  # the coordinator gives the slot to another expert mid-way
    assert new_seq == old.seq + 1
    rig.run_until_idle()
    assert rig.events(ExpertLoaded) == []
    assert rig.table.chunks_ready(SlotId(0)) == 0  # the stale load never published readiness for the new owner
    assert rig.table.lookup(ExpertId(4)) is None
    view = rig.table.lookup(ExpertId(5))
    assert view is not None and view.seq == new_seq and not rig.table.is_ready(view)
    assert len(rig.loader.queue) == 0
    assert not rig.loader.step()


@pytest.mark.timeout(30)
def test_stale_chunks_of_a_reassigned_slot_never_overwrite_its_new_expert(rig: Rig) -> None:
    """A slot is reassigned while a speculative load into it still has chunks queued; the new load (precise) runs
    first and completes. The stale load's remaining chunks must not land in the slot, which now holds the new expert
    with every chunk published ready (readers trust it: its sequence is current)."""
    rig.load(1, slot=0, expert=4, priority=S)
    rig.deliver()
    assert rig.loader.step()  # stale load: chunk 0 done, chunks 1..2 still queued
    new = rig.load(2, slot=0, expert=5, priority=P)  # reassign (seq bump) then load the new expert
    rig.deliver()
    rig.run_until_idle()
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [2]
    view = rig.table.lookup(ExpertId(5))
    assert view is not None and view.seq == new.seq and rig.table.is_ready(view)
    rig.assert_slot_holds(0, 5)


@pytest.mark.timeout(30)
def test_bad_load_is_rejected_and_the_loader_goes_on(rig: Rig) -> None:
    seq = rig.assign(1, 2)
    send(rig.to_loader, LoadExpert(load_id=LoadId(1), expert=ExpertId(2), slot=SlotId(1), seq=seq, priority=5))
    rig.to_loader.send(b"\xc1 garbage")
    rig.load(2, slot=0, expert=3)
    rig.deliver()
    assert rig.loader.queue.queued_load_ids() == [2]
    rig.run_until_idle()
    assert [m.load_id for m in rig.events(ExpertLoaded)] == [2]


# ---------------------------------------------------------------- pacing
@pytest.mark.timeout(30)
def test_copy_is_paced_to_the_link(tmp_path: Path) -> None:
    nbytes = (LAYOUT.expert_numel // LAYOUT.n_chunks) * 4
    target_s = 0.02
    link_gbps = nbytes / (target_s * 1e9)  # GB/s such that one chunk takes 20 ms
    rig = Rig(tmp_path, link_gbps=link_gbps)
    try:
        for chunk in range(LAYOUT.n_chunks):
            lo, hi = LAYOUT.chunk_bounds(chunk)
            started = time.perf_counter()
            copied = rig.engine.copy_chunk(ExpertId(3), SlotId(1), chunk)
            elapsed = time.perf_counter() - started
            assert copied == (hi - lo) * 4
            assert elapsed >= 0.95 * copied / (link_gbps * 1e9), f"chunk {chunk} took only {elapsed * 1e3:.2f} ms"
            assert torch.equal(rig.slot_chunk(1, chunk), rig.store_chunk(3, chunk))
    finally:
        rig.close()
