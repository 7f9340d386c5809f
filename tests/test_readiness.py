"""Readiness is published for the load that owns the slot, never for the slot's next owner.

The loader (one process) publishes a chunk count while the coordinator (another process) may reassign the slot at
any moment. These tests force every interleaving deterministically, with no timing: the loader's view of the slot
table is wrapped so that the coordinator's reassignment runs just before the loader's ``at``-th access to shared
memory, for every ``at`` until the loader's step makes no more accesses. Whatever the interleaving, the slot's next
owner must see no ready chunk, and a restarted loader must be re-issued the new load from its first chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.ids import ExpertId, LoadId, SlotId
from protocol.messages import ExpertLoaded, LoadExpert, LoadsPreempted, Preempt
from shm.segment import Segment
from shm.slot_table import SlotTable
from tests.test_cuda_path import DeferredEngine
from tests.test_loader import LAYOUT
from tests.test_loader import Rig as LoaderRig
from tests.test_shm import Segments
from tests.test_shm import segments as segments
from workers.bootstrap import send

OLD, NEW = ExpertId(4), ExpertId(6)
SLOT = SlotId(0)


class Schedule:
    """Runs ``hook`` once, just before the ``at``-th access (read or write) to any array of a wrapped table."""

    def __init__(self, at: int, hook: Callable[[], None]) -> None:
        self.at = at
        self.hook = hook
        self.accesses = 0
        self.fired = False
        self.armed = False

    def tick(self) -> None:
        if not self.armed:
            return
        if self.accesses == self.at and not self.fired:
            self.fired = True
            self.hook()
        self.accesses += 1


class Interleaved:
    """One array of the slot table as another process sees it: every element access first lets the schedule run."""

    def __init__(self, array: np.ndarray, schedule: Schedule) -> None:
        self._array = array
        self._schedule = schedule

    def __getitem__(self, key: Any) -> Any:
        self._schedule.tick()
        return self._array[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._schedule.tick()
        self._array[key] = value

    def __len__(self) -> int:
        return len(self._array)


def interleaved_view(segment: Segment, schedule: Schedule) -> SlotTable:
    """A second view of the slot table in ``segment`` (as the loader process has one), its arrays wrapped. Drop it
    without ``close``: the segment belongs to the first view."""
    table = SlotTable(segment, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=False)
    for field, value in list(vars(table).items()):
        if isinstance(value, np.ndarray):
            setattr(table, field, Interleaved(value, schedule))
    return table


def assert_new_owner_sees_nothing(table: SlotTable, new_seq: int) -> None:
    view = table.lookup(NEW)
    assert view is not None and view.seq == new_seq
    assert view.chunks_ready == 0, "the new owner was shown chunks that the previous load copied"
    assert not table.is_ready(view)
    assert table.chunks_ready(SLOT) == 0, "a restarted loader would be re-issued the new load from a later chunk"
    assert NEW not in table.ready_experts(ExpertId(4), LAYOUT.experts_per_layer)


def test_publish_never_lands_in_the_next_owner_whatever_the_interleaving(segments: Segments) -> None:
    coordinator = segments.table()
    explored = 0
    for at in itertools.count():
        old_seq = coordinator.assign(SLOT, OLD)
        new_seq: list[int] = []
        schedule = Schedule(at, lambda seqs=new_seq: seqs.append(coordinator.assign(SLOT, NEW)))
        loader = interleaved_view(coordinator.segment, schedule)
        schedule.armed = True
        loader.publish_ready(SLOT, old_seq, LAYOUT.n_chunks)
        schedule.armed = False
        del loader
        if not schedule.fired:  # the reassignment came after the whole publish: the old load's chunks are ready
            assert coordinator.chunks_ready(SLOT) == LAYOUT.n_chunks
            assert coordinator.is_ready(coordinator.lookup(OLD))
            break
        explored += 1
        assert_new_owner_sees_nothing(coordinator, new_seq[0])
    assert explored >= 2, "the publish should touch shared memory at least twice (a check and a store)"
    coordinator.close()


def run_preempted_load_racing_reassignment(root: Path, at: int) -> bool:
    """A load with a chunk on the stream is preempted; when its copy completes, the loader publishes it while the
    coordinator (having read ``LoadsPreempted``) reassigns the slot, just before the loader's ``at``-th access to
    the table. Then the new owner's load is issued from the chunk the slot table says landed, as after a loader
    restart. Returns whether the reassignment fell inside the publishing step."""
    root.mkdir()
    rig = LoaderRig(root)
    engine = DeferredEngine(rig.store, rig.slots, None)
    rig.engine = rig.loader.engine = engine
    new_seq: list[int] = []
    schedule = Schedule(at, lambda: new_seq.append(rig.assign(SLOT, NEW)))
    rig.loader.table = interleaved_view(rig.table.segment, schedule)
    try:
        rig.load(1, slot=SLOT, expert=OLD)
        rig.deliver()
        assert rig.loader.step() and rig.loader.step()  # chunks 0 and 1 on the stream
        send(rig.to_loader, Preempt(load_ids=[LoadId(1)]))
        rig.deliver()
        assert rig.events(LoadsPreempted)[0].chunks_done == [2]
        engine.finish_oldest()
        schedule.armed = True
        rig.loader.publish_completed(wait=False)  # chunk 0 landed: publish it
        schedule.armed = False
        if not schedule.fired:
            return False
        assert_new_owner_sees_nothing(rig.table, new_seq[0])
        engine.finish_oldest()
        rig.run_until_idle()  # chunk 1 lands too, after the reassignment: still nothing for the new owner
        assert_new_owner_sees_nothing(rig.table, new_seq[0])
        send(rig.to_loader, LoadExpert(load_id=LoadId(2), expert=NEW, slot=SLOT, seq=new_seq[0], priority=0,
                                       first_chunk=rig.table.chunks_ready(SLOT)))
        rig.deliver()
        rig.run_until_idle()
        assert [m.load_id for m in rig.events(ExpertLoaded)] == [2]
        assert rig.table.is_ready(rig.table.lookup(NEW))
        rig.assert_slot_holds(SLOT, NEW)
        return True
    finally:
        rig.loader.table = rig.table
        rig.close()


@pytest.mark.timeout(60)
def test_preempted_load_in_flight_never_publishes_into_the_next_owner(tmp_path: Path) -> None:
    explored = 0
    for at in itertools.count():
        if not run_preempted_load_racing_reassignment(tmp_path / f"at{at}", at):
            break
        explored += 1
    assert explored >= 2, "the publish should touch shared memory at least twice (a check and a store)"
