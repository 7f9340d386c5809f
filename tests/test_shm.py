"""Shared memory: segments across real processes, the slot table, the layout, the host store and the cache slots."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection

import psutil
import pytest
import torch

from protocol.ids import ExpertId, SlotId
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.layout import ExpertLayout
from shm.segment import SHM_DIR, Segment, leftover_segments, segment_name, unlink_leftovers
from shm.slot_table import SlotTable
from workers.loader import CpuCopyEngine

LAYOUT = ExpertLayout(moe_layers=(0, 1), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                      storage_dtype="float32", compute_dtype="float32", n_chunks=3, n_slots=4)


class Segments:
    """Segments of one test, named ``promoe_test_<uuid>_<what>``; all unlinked at teardown."""

    def __init__(self) -> None:
        self.run_id = f"test_{uuid.uuid4().hex[:12]}"
        self.created: list[Segment] = []

    def name(self, what: str) -> str:
        return segment_name(self.run_id, what)

    def create(self, what: str, nbytes: int) -> Segment:
        segment = Segment.create(self.name(what), nbytes)
        self.created.append(segment)
        return segment

    def table(self, layout: ExpertLayout = LAYOUT) -> SlotTable:
        segment = self.create("table", SlotTable.nbytes_for(layout.n_slots, layout.n_experts))
        return SlotTable(segment, layout.n_slots, layout.n_experts, layout.n_chunks, init=True)


@pytest.fixture
def segments() -> Iterator[Segments]:
    segs = Segments()
    try:
        yield segs
    finally:
        for segment in segs.created:
            segment.close()
            if os.path.exists(SHM_DIR / segment.name):
                segment.unlink()
    assert leftover_segments(segs.run_id) == [], "a test segment was left in /dev/shm"


def _tracker_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_tracker_exit(pid: int, timeout_s: float = 10.0) -> None:
    """A process's resource tracker cleans up (unlinks what is still registered) when it exits."""
    deadline = time.monotonic() + timeout_s
    while not _tracker_gone(pid):
        assert time.monotonic() < deadline, f"resource tracker {pid} did not exit"
        time.sleep(0.01)


# ---------------------------------------------------------------- across two real processes
def _child(store_name: str, table_name: str, layout: ExpertLayout, slot: int, seq: int, expert: int,
           guarded: bool, conn: Connection) -> None:
    """Runs in a spawned process: attach as a worker does, write, report, exit."""
    # A spawned child inherits its parent's resource tracker; a runtime worker (a subprocess) has its own, and
    # that tracker is what unlinks at exit whatever the process left registered. Give this child its own.
    resource_tracker._resource_tracker._fd = None  # type: ignore[attr-defined]
    if not guarded:  # the control: attach without the guard of Segment.attach
        os.environ["PYTHONWARNINGS"] = "ignore"  # its tracker will warn about the "leak" it cleans up: expected
        plain = shared_memory.SharedMemory(name=store_name, create=False)
        plain.buf[0] = 1
        plain.close()
        conn.send({"tracker_pid": resource_tracker._resource_tracker._pid})  # type: ignore[attr-defined]
        return
    store_seg = Segment.attach(store_name)
    table_seg = Segment.attach(table_name)
    report: dict = {"tracker_pid": resource_tracker._resource_tracker._pid}  # type: ignore[attr-defined]
    try:
        store_seg.unlink()
        report["unlink"] = "allowed"
    except RuntimeError:
        report["unlink"] = "refused"
    store = HostExpertStore(store_seg, layout)
    table = SlotTable(table_seg, layout.n_slots, layout.n_experts, layout.n_chunks, init=False)
    i, h = layout.intermediate_size, layout.hidden_size
    store.write_matrix(ExpertId(expert), "gate", torch.full((i, h), 1.5))
    store.write_matrix(ExpertId(expert), "up", torch.full((i, h), -2.0))
    store.write_matrix(ExpertId(expert), "down", torch.arange(h * i, dtype=torch.float32).view(h, i))
    report["published"] = table.publish_ready(SlotId(slot), seq, layout.n_chunks)
    report["stale_published"] = table.publish_ready(SlotId(slot), seq - 1, 1)
    table.pin([ExpertId(expert)])
    store.close()
    table.close()
    conn.send(report)


def _run_child(*args: object) -> dict:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(*args, send))
    process.start()
    try:
        assert receive.poll(60), "child did not report"
        report = receive.recv()
    finally:
        process.join(60)
    assert process.exitcode == 0
    _wait_tracker_exit(report["tracker_pid"])
    return report


@pytest.mark.timeout(120)
def test_child_process_writes_are_seen_and_segments_outlive_it(segments: Segments) -> None:
    store_seg = segments.create("store", HostExpertStore.nbytes_for(LAYOUT))
    table = segments.table()
    store = HostExpertStore(store_seg, LAYOUT)
    store.experts.fill_(0)
    slot, expert = SlotId(2), ExpertId(5)
    seq = table.assign(slot, expert)
    assert table.assign(slot, expert) == seq + 1  # the child must see the second sequence number
    seq += 1

    report = _run_child(store_seg.name, table.segment.name, LAYOUT, slot, seq, expert, True)

    # the segments survived the child and its resource tracker
    assert (SHM_DIR / store_seg.name).exists()
    assert (SHM_DIR / table.segment.name).exists()
    assert report["unlink"] == "refused"
    # the parent sees what the child wrote
    assert report["published"] is True and report["stale_published"] is False
    assert table.chunks_ready(SlotId(slot)) == LAYOUT.n_chunks
    assert table.is_ready(table.lookup(expert))
    assert table.is_pinned(expert)
    i, h = LAYOUT.intermediate_size, LAYOUT.hidden_size
    expected = torch.cat([torch.full((i * h,), 1.5), torch.full((i * h,), -2.0),
                          torch.arange(h * i, dtype=torch.float32)])
    assert torch.equal(store.expert(expert), expected)
    others = [e for e in range(LAYOUT.n_experts) if e != expert]
    assert torch.count_nonzero(store.experts[others]) == 0
    store.close()
    table.close()


@pytest.mark.timeout(120)
def test_control_attach_without_the_guard_is_unlinked_by_the_childs_tracker(segments: Segments) -> None:
    """Proves the test above can fail: a plain attach leaves the segment registered, and the child's exit unlinks it."""
    name = segments.name("control")
    plain = shared_memory.SharedMemory(name=name, create=True, size=64)
    resource_tracker.unregister(plain._name, "shared_memory")  # type: ignore[attr-defined]  # ours is not tracked
    try:
        _run_child(name, "unused", LAYOUT, 0, 1, 0, False)
        assert not (SHM_DIR / name).exists()
    finally:
        plain.close()
        if (SHM_DIR / name).exists():
            os.unlink(SHM_DIR / name)


# ---------------------------------------------------------------- segments in one process
def test_attached_segment_refuses_unlink(segments: Segments) -> None:
    owner = segments.create("owned", 64)
    attached = Segment.attach(owner.name)
    # attaching in the creating process unregistered the creator's entry with this process's tracker: put it back
    resource_tracker.register("/" + owner.name, "shared_memory")
    assert attached.owner is False and owner.owner is True
    attached.buf[3] = 99
    assert owner.buf[3] == 99
    with pytest.raises(RuntimeError):
        attached.unlink()
    attached.close()
    assert (SHM_DIR / owner.name).exists()
    owner.unlink()
    assert not (SHM_DIR / owner.name).exists()


def test_create_requires_the_prefix() -> None:
    with pytest.raises(ValueError):
        Segment.create(f"test_{uuid.uuid4().hex}", 64)


def test_leftovers_are_found_and_removed_by_run_id(segments: Segments) -> None:
    other = Segments()
    # leftovers of a dead owner are plain files in /dev/shm
    mine = [segments.name(w) for w in ("store", "slots", "table")]
    theirs = other.name("store")
    for name in [*mine, theirs]:
        (SHM_DIR / name).write_bytes(b"\0" * 16)
    try:
        assert leftover_segments(segments.run_id) == sorted(mine)
        assert leftover_segments(other.run_id) == [theirs]
        everything = leftover_segments()
        assert set(mine) | {theirs} <= set(everything)
        assert all(n.startswith("promoe_") for n in everything)

        assert sorted(unlink_leftovers(segments.run_id)) == sorted(mine)
        assert leftover_segments(segments.run_id) == []
        assert (SHM_DIR / theirs).exists()
        assert unlink_leftovers(segments.run_id) == []
    finally:
        for name in [*mine, theirs]:
            if (SHM_DIR / name).exists():
                os.unlink(SHM_DIR / name)
    assert leftover_segments(other.run_id) == []


# ---------------------------------------------------------------- slot table
def test_assign_bumps_seq_and_maps_the_expert(segments: Segments) -> None:
    table = segments.table()
    assert table.lookup(ExpertId(3)) is None
    assert int(table.slot_expert[1]) == -1
    seq1 = table.assign(SlotId(1), ExpertId(3))
    assert seq1 == 1
    assert int(table.expert_slot[3]) == 1 and int(table.slot_expert[1]) == 3
    view = table.lookup(ExpertId(3))
    assert view is not None and view.slot == 1 and view.seq == seq1 and view.chunks_ready == 0
    assert table.lookup(ExpertId(4)) is None  # unknown expert

    seq2 = table.assign(SlotId(1), ExpertId(4))  # reassign: the old expert loses its slot
    assert seq2 == seq1 + 1
    assert table.lookup(ExpertId(3)) is None
    assert int(table.expert_slot[3]) == -1
    view4 = table.lookup(ExpertId(4))
    assert view4 is not None and view4.seq == seq2
    table.close()


def test_readiness_needs_every_chunk(segments: Segments) -> None:
    table = segments.table()
    seq = table.assign(SlotId(0), ExpertId(6))
    assert not table.is_ready(None)
    for ready in range(LAYOUT.n_chunks):
        assert table.publish_ready(SlotId(0), seq, ready)
        view = table.lookup(ExpertId(6))
        assert view is not None and view.chunks_ready == ready
        assert not table.is_ready(view)
    assert table.publish_ready(SlotId(0), seq, LAYOUT.n_chunks)
    assert table.is_ready(table.lookup(ExpertId(6)))
    table.close()


def test_ready_experts_lists_a_layers_fully_landed_experts(segments: Segments) -> None:
    table = segments.table()
    seq4 = table.assign(SlotId(0), ExpertId(4))
    seq5 = table.assign(SlotId(1), ExpertId(5))
    seq2 = table.assign(SlotId(2), ExpertId(2))  # layer 0: outside the range asked for
    table.assign(SlotId(3), ExpertId(7))  # loading, nothing landed
    for slot, seq in ((0, seq4), (2, seq2)):
        table.publish_ready(SlotId(slot), seq, LAYOUT.n_chunks)
    table.publish_ready(SlotId(1), seq5, LAYOUT.n_chunks - 1)
    assert table.ready_experts(ExpertId(4), 4) == [4]
    table.publish_ready(SlotId(1), seq5, LAYOUT.n_chunks)
    assert table.ready_experts(ExpertId(4), 4) == [4, 5]
    assert table.ready_experts(ExpertId(0), 4) == [2]
    table.release(SlotId(0))
    assert table.ready_experts(ExpertId(4), 4) == [5]
    table.close()


def test_still_valid_fails_after_reassign_or_release(segments: Segments) -> None:
    table = segments.table()
    seq = table.assign(SlotId(2), ExpertId(1))
    table.publish_ready(SlotId(2), seq, LAYOUT.n_chunks)
    view = table.lookup(ExpertId(1))
    assert view is not None and table.still_valid(view)
    table.assign(SlotId(2), ExpertId(1))  # a reload of the same expert is still a new sequence
    assert not table.still_valid(view)

    view = table.lookup(ExpertId(1))
    assert view is not None and table.still_valid(view)
    assert view.chunks_ready == 0  # the old load's readiness is not the new one's
    table.release(SlotId(2))
    assert not table.still_valid(view)
    assert table.lookup(ExpertId(1)) is None
    assert int(table.slot_expert[2]) == -1
    table.close()


def test_release_does_not_unmap_an_expert_that_moved(segments: Segments) -> None:
    table = segments.table()
    table.assign(SlotId(0), ExpertId(2))
    table.assign(SlotId(1), ExpertId(2))  # the expert now lives in slot 1
    table.release(SlotId(0))
    view = table.lookup(ExpertId(2))
    assert view is not None and view.slot == 1
    table.close()


def test_stale_publish_writes_nothing(segments: Segments) -> None:
    table = segments.table()
    old = table.assign(SlotId(3), ExpertId(0))
    new = table.assign(SlotId(3), ExpertId(7))
    assert not table.publish_ready(SlotId(3), old, LAYOUT.n_chunks)
    assert table.chunks_ready(SlotId(3)) == 0
    assert not table.is_current(SlotId(3), old) and table.is_current(SlotId(3), new)
    assert table.publish_ready(SlotId(3), new, 2)
    assert table.chunks_ready(SlotId(3)) == 2
    table.close()


def test_pins_and_waiting_flag(segments: Segments) -> None:
    table = segments.table()
    table.pin([ExpertId(1), ExpertId(5)])
    assert table.is_pinned(ExpertId(1)) and table.is_pinned(ExpertId(5)) and not table.is_pinned(ExpertId(2))
    table.unpin(ExpertId(1))
    assert not table.is_pinned(ExpertId(1)) and table.is_pinned(ExpertId(5))
    assert table.waiting_for_slot is False
    table.waiting_for_slot = True
    second = SlotTable(table.segment, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=False)
    assert second.waiting_for_slot is True and second.is_pinned(ExpertId(5))
    table.waiting_for_slot = False
    assert second.waiting_for_slot is False
    second.close()
    table.close()


def test_attach_with_mismatched_geometry_raises(segments: Segments) -> None:
    table = segments.table()
    seg = table.segment
    with pytest.raises(ValueError):
        SlotTable(seg, LAYOUT.n_slots - 1, LAYOUT.n_experts, LAYOUT.n_chunks, init=False)
    with pytest.raises(ValueError):
        SlotTable(seg, LAYOUT.n_slots, LAYOUT.n_experts - 1, LAYOUT.n_chunks, init=False)
    with pytest.raises(ValueError):  # larger than the segment
        SlotTable(seg, LAYOUT.n_slots, LAYOUT.n_experts + 1, LAYOUT.n_chunks, init=False)
    fresh = segments.create("fresh", SlotTable.nbytes_for(LAYOUT.n_slots, LAYOUT.n_experts))
    with pytest.raises(ValueError):  # never initialised: no magic
        SlotTable(fresh, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=False)
    same = SlotTable(seg, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=False)
    same.close()
    table.close()


# ---------------------------------------------------------------- layout
def _layout(**overrides: object) -> ExpertLayout:
    fields = {**LAYOUT.to_json(), **overrides}
    return ExpertLayout(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 7, 96])
@pytest.mark.parametrize(("hidden", "inter"), [(8, 4), (5, 3)])
def test_chunks_tile_the_expert(n_chunks: int, hidden: int, inter: int) -> None:
    layout = _layout(hidden_size=hidden, intermediate_size=inter, n_chunks=min(n_chunks, 3 * hidden * inter))
    covered = []
    position = 0
    for chunk in range(layout.n_chunks):
        lo, hi = layout.chunk_bounds(chunk)
        assert lo == position, f"gap or overlap before chunk {chunk}"
        assert hi > lo, f"chunk {chunk} is empty"
        covered.extend(range(lo, hi))
        position = hi
    assert position == layout.expert_numel
    assert covered == list(range(layout.expert_numel))
    with pytest.raises(IndexError):
        layout.chunk_bounds(layout.n_chunks)
    with pytest.raises(IndexError):
        layout.chunk_bounds(-1)


@pytest.mark.parametrize("n_slots", [0, 1, 9, 100], ids=["zero", "below-top-k", "above-experts", "far-above"])
def test_invalid_cache_size(n_slots: int) -> None:
    with pytest.raises(ValueError):
        _layout(n_slots=n_slots)


@pytest.mark.parametrize("n_slots", [2, 8])
def test_cache_size_bounds_are_inclusive(n_slots: int) -> None:
    assert _layout(n_slots=n_slots).n_slots == n_slots


@pytest.mark.parametrize("overrides", [{"n_chunks": 0}, {"n_chunks": 97}, {"storage_dtype": "int8"},
                                       {"compute_dtype": "float64"}])
def test_invalid_layout(overrides: dict) -> None:
    with pytest.raises(ValueError):
        _layout(**overrides)


def test_layout_sizes_and_ids() -> None:
    layout = _layout(storage_dtype="bfloat16")
    assert layout.n_experts == 8
    assert layout.expert_numel == 3 * 8 * 4
    assert layout.expert_nbytes == 3 * 8 * 4 * 2
    assert layout.slot_nbytes == 3 * 8 * 4 * 4
    assert layout.expert_id(1, 3) == 7
    assert layout.split(ExpertId(7)) == (1, 3)
    assert ExpertLayout.from_json(layout.to_json()) == layout


# ---------------------------------------------------------------- host store -> cache slots
@pytest.mark.parametrize(("storage", "compute"), [("float32", "float32"), ("bfloat16", "float32"),
                                                  ("bfloat16", "bfloat16"), ("float16", "float32")])
@pytest.mark.parametrize("n_chunks", [1, 3, 7])
def test_store_to_slots_copy(segments: Segments, storage: str, compute: str, n_chunks: int) -> None:
    layout = _layout(storage_dtype=storage, compute_dtype=compute, n_chunks=n_chunks)
    store = HostExpertStore(segments.create("store", HostExpertStore.nbytes_for(layout)), layout)
    slots = CacheSlots(segments.create("slots", CacheSlots.nbytes_for(layout)), layout)
    slots.slots.fill_(float("nan"))
    engine = CpuCopyEngine(store, slots, link_gbps=None)
    i, h = layout.intermediate_size, layout.hidden_size
    generator = torch.Generator().manual_seed(n_chunks)
    weights = {}
    for expert in range(layout.n_experts):
        gate, up, down = (torch.randn(i, h, generator=generator), torch.randn(i, h, generator=generator),
                          torch.randn(h, i, generator=generator))
        weights[expert] = (gate, up, down)
        for which, tensor in zip(("gate", "up", "down"), (gate, up, down), strict=True):
            store.write_matrix(ExpertId(expert), which, tensor)

    placement = {SlotId(0): ExpertId(6), SlotId(1): ExpertId(1), SlotId(3): ExpertId(3)}
    total = 0
    for slot, expert in placement.items():
        for chunk in range(layout.n_chunks):
            total += engine.copy_chunk(expert, slot, chunk)
    assert total == len(placement) * layout.expert_nbytes

    storage_dtype, compute_dtype = store.experts.dtype, slots.slots.dtype
    for slot, expert in placement.items():
        gate, up, down = weights[expert]

        def as_stored(t: torch.Tensor) -> torch.Tensor:
            return t.to(storage_dtype).to(compute_dtype)

        assert slots.gate_up(slot).shape == (2 * i, h)
        assert slots.down(slot).shape == (h, i)
        assert slots.gate_up(slot).dtype == compute_dtype
        assert torch.equal(slots.gate_up(slot), as_stored(torch.cat([gate, up])))
        assert torch.equal(slots.down(slot), as_stored(down))
        assert torch.equal(slots.slots[slot], store.expert(expert).to(compute_dtype))
    assert torch.isnan(slots.slots[2]).all(), "an unused slot was written"
    del gate, up, down
    store.close()
    slots.close()


def test_write_matrix_checks_the_shape(segments: Segments) -> None:
    store = HostExpertStore(segments.create("store", HostExpertStore.nbytes_for(LAYOUT)), LAYOUT)
    i, h = LAYOUT.intermediate_size, LAYOUT.hidden_size
    with pytest.raises(ValueError):
        store.write_matrix(ExpertId(0), "gate", torch.zeros(h, i))
    with pytest.raises(ValueError):
        store.write_matrix(ExpertId(0), "down", torch.zeros(i, h))
    store.write_matrix(ExpertId(0), "down", torch.ones(h, i))
    assert torch.equal(store.expert(ExpertId(0))[2 * i * h:], torch.ones(h * i))
    store.close()


def test_segments_too_small_are_refused(segments: Segments) -> None:
    small = segments.create("small", 64)
    with pytest.raises(ValueError):
        HostExpertStore(small, LAYOUT)
    with pytest.raises(ValueError):
        CacheSlots(small, LAYOUT)
    with pytest.raises(ValueError):
        SlotTable(small, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=True)


def test_seqlock_record_refuses_a_torn_or_foreign_read() -> None:
    """A reader gets the data only from a complete record with its key, never while it is being (re)written."""
    import numpy as np

    from shm import seqlock

    header = np.zeros(4, dtype=np.int64)
    data = [0]
    seen_while_writing: list[object] = []

    def write(value: int) -> None:
        data[0] = value
        seen_while_writing.append(seqlock.read(header, (7, 1), lambda: data[0]))

    seqlock.publish(header, (7, 1, 3), lambda: write(42))
    assert list(header) == [2, 7, 1, 3] and seen_while_writing == [None], "odd while written"
    assert seqlock.read(header, (7, 1), lambda: data[0]) == 42
    assert seqlock.read(header, (7, 2), lambda: data[0]) is None, "another step's record"

    def rewritten_during_copy() -> int:
        seqlock.publish(header, (7, 1, 3), lambda: None)  # the writer came back while this reader copied
        return data[0]

    assert seqlock.read(header, (7, 1), rewritten_during_copy) is None
