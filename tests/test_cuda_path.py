"""The device-independent parts of the CUDA data path, tested on the CPU: the slot export message, the loader with
an asynchronous copy engine, and read fences in the experts backend. Nothing here needs a GPU.

The engine and fence below stand in for CUDA's only in *when* things complete (the test decides), which is exactly
what the loader and the backend must get right: readiness is published only for completed copies, and a slot is
released only after the computation that reads it has finished.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.codec import ProtocolError, decode, encode
from protocol.ids import ExpertId, SlotId
from protocol.messages import ExpertLoaded, SlotsExported
from shm.cache_slots import ReadFence, SlotArray
from shm.layout import ExpertLayout
from tests.test_loader import LAYOUT, SENTINEL
from tests.test_loader import Rig as LoaderRig
from tests.test_offloaded_experts import Rig as BackendRig
from tests.test_offloaded_experts import chosen, eager, routing
from tests.test_offloaded_experts import model as model
from workers.copy_engine import CopyTicket, CpuCopyEngine
from workers.gpu_slots import check_export, slots_over_storage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the export message
def exported(**overrides: Any) -> SlotsExported:
    fields: dict[str, Any] = dict(
        device=0, handle=bytes(range(64)), storage_nbytes=LAYOUT.n_slots * LAYOUT.slot_nbytes,
        storage_offset_nbytes=2 << 20, ref_counter_handle=b"/torch_1234_567_0", ref_counter_offset=3,
        event_handle=bytes(range(100, 164)), event_sync_required=True, n_slots=LAYOUT.n_slots,
        slot_numel=LAYOUT.expert_numel, dtype=LAYOUT.compute_dtype)
    fields.update(overrides)
    return SlotsExported(**fields)


def test_slots_exported_round_trips_every_byte() -> None:
    msg = exported(handle=bytes([0, 255, 10, 13]) * 16)  # NUL, 0xff, newline: raw bytes, not text
    wire = encode(msg)
    assert b"\x80\x04\x95" not in wire[:3], "no pickle"
    back = decode(wire)
    assert back == msg
    assert isinstance(back, SlotsExported) and isinstance(back.handle, bytes) and len(back.handle) == 64


@pytest.mark.parametrize(("field", "value"), [("handle", "text"), ("event_sync_required", 1),
                                              ("ref_counter_offset", b"3"), ("storage_nbytes", 1.5)])
def test_slots_exported_fields_are_type_checked(field: str, value: Any) -> None:
    import msgpack

    body = msgpack.unpackb(encode(exported()), raw=False)
    body[field] = value
    with pytest.raises(ProtocolError) as info:
        decode(msgpack.packb(body, use_bin_type=True))
    assert info.value.code == "bad_field"


@pytest.mark.parametrize("overrides", [{"n_slots": LAYOUT.n_slots + 1}, {"slot_numel": 7}, {"dtype": "bfloat16"},
                                       {"storage_nbytes": LAYOUT.n_slots * LAYOUT.slot_nbytes - 1}])
def test_an_export_that_does_not_fit_the_layout_is_refused(overrides: dict) -> None:
    check_export(exported(), LAYOUT)
    with pytest.raises(ValueError):
        check_export(exported(**overrides), LAYOUT)


def test_slots_over_a_storage_share_its_memory() -> None:
    storage = torch.zeros(LAYOUT.n_slots * LAYOUT.expert_numel, dtype=torch.float32).untyped_storage()
    slots = slots_over_storage(storage, exported())
    assert tuple(slots.shape) == (LAYOUT.n_slots, LAYOUT.expert_numel)
    assert slots.data_ptr() == storage.data_ptr()
    slots[2, 5] = 42.0
    flat = torch.empty(0).set_(storage)
    assert float(flat[2 * LAYOUT.expert_numel + 5]) == 42.0


def test_cuda_modules_import_without_touching_cuda() -> None:
    """Importing the CUDA path (and starting the CPU path) must work on a CPU-only torch build."""
    code = ("import workers.gpu_slots, workers.copy_engine, workers.loader, workers.inference; import torch; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_clear_error() -> None:
    from launch import resolve_device

    assert resolve_device(None) == "cpu"
    with pytest.raises(SystemExit, match="no CUDA device"):
        resolve_device("cuda")


# ---------------------------------------------------------------- the loader with an asynchronous engine
class DeferredEngine(CpuCopyEngine):
    """Like the CUDA engine: ``submit`` only queues; a copy happens (and completes) when the test says so, or when
    the loader waits for the oldest one."""

    def __init__(self, *args: Any, max_in_flight: int = 2) -> None:
        super().__init__(*args)
        self.max_in_flight = max_in_flight
        self.queued: deque[CopyTicket] = deque()
        self.finished: list[CopyTicket] = []
        self.peak_in_flight = 0

    def submit(self, ticket: CopyTicket) -> None:
        lo, hi = self.store.layout.chunk_bounds(ticket.chunk)
        ticket.nbytes = (hi - lo) * self.itemsize
        self.queued.append(ticket)
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight())

    def finish_oldest(self) -> None:
        ticket = self.queued.popleft()
        self.copy_chunk(ticket.expert, ticket.slot, ticket.chunk)
        self.finished.append(ticket)

    def completed(self, wait: bool = False) -> list[CopyTicket]:
        if wait and not self.finished and self.queued:
            self.finish_oldest()
        done, self.finished = self.finished, []
        return done

    def in_flight(self) -> int:
        return len(self.queued) + len(self.finished)


@pytest.fixture
def async_rig(tmp_path: Path) -> Iterator[LoaderRig]:
    rig = LoaderRig(tmp_path)
    rig.engine = rig.loader.engine = DeferredEngine(rig.store, rig.slots, None)
    try:
        yield rig
    finally:
        rig.close()


@pytest.mark.timeout(30)
def test_readiness_is_published_only_for_completed_copies(async_rig: LoaderRig) -> None:
    rig, engine = async_rig, async_rig.engine
    assert isinstance(engine, DeferredEngine)
    rig.load(1, slot=2, expert=5)
    rig.deliver()
    assert rig.loader.step() and rig.loader.step()  # two chunks submitted, none completed
    assert engine.in_flight() == 2 and rig.table.chunks_ready(SlotId(2)) == 0
    assert torch.all(rig.slots.slots[2] == SENTINEL)
    engine.finish_oldest()
    assert rig.loader.step()  # the engine is full: this step publishes chunk 0 and submits nothing
    assert rig.table.chunks_ready(SlotId(2)) == 1
    assert engine.peak_in_flight == 2, "never more than max_in_flight chunks on the stream"
    rig.deliver()
    assert rig.events(ExpertLoaded) == []
    rig.run_until_idle()
    (loaded,) = rig.events(ExpertLoaded)
    assert (loaded.load_id, loaded.seq) == (1, rig.table.slot_seq[2])
    assert rig.table.chunks_ready(SlotId(2)) == LAYOUT.n_chunks
    rig.assert_slot_holds(2, 5)


@pytest.mark.timeout(30)
def test_a_copy_that_completes_after_its_slot_was_reassigned_publishes_nothing(async_rig: LoaderRig) -> None:
    rig, engine = async_rig, async_rig.engine
    assert isinstance(engine, DeferredEngine)
    rig.load(1, slot=0, expert=4)
    rig.deliver()
    assert rig.loader.step()  # chunk 0 in flight
    new_seq = rig.assign(0, 6)  # the coordinator reassigns the slot while the copy is on the stream
    engine.finish_oldest()
    rig.run_until_idle()
    assert rig.table.chunks_ready(SlotId(0)) == 0, "a stale copy must not mark the new owner's chunks ready"
    assert rig.events(ExpertLoaded) == []
    view = rig.table.lookup(ExpertId(6))
    assert view is not None and view.seq == new_seq and not rig.table.is_ready(view)


@pytest.mark.timeout(30)
def test_preempt_with_a_chunk_in_flight_reports_it_as_handed_out(async_rig: LoaderRig) -> None:
    """A chunk already on the stream cannot be recalled: it is counted as done, and it does complete."""
    from protocol.ids import LoadId
    from protocol.messages import LoadsPreempted, Preempt
    from workers.bootstrap import send

    rig, engine = async_rig, async_rig.engine
    assert isinstance(engine, DeferredEngine)
    rig.load(1, slot=1, expert=3)
    rig.deliver()
    assert rig.loader.step()
    send(rig.to_loader, Preempt(load_ids=[LoadId(1)]))
    rig.deliver()
    (preempted,) = rig.events(LoadsPreempted)
    assert preempted.chunks_done == [1]
    rig.run_until_idle()  # the in-flight chunk completes and is published; nothing else is copied
    assert rig.table.chunks_ready(SlotId(1)) == 1
    assert torch.equal(rig.slot_chunk(1, 0), rig.store_chunk(3, 0))
    assert torch.all(rig.slot_chunk(1, 1) == SENTINEL)
    assert rig.events(ExpertLoaded) == []


# ---------------------------------------------------------------- read fences in the experts backend
class SlowFence(ReadFence):
    """A computation still reading its slot until ``wait``; ``on_wait`` runs while it still reads (what another
    process could do meanwhile). Every poll checks that the expert it reads is still pinned."""

    def __init__(self, owner: FencedSlots, expert: int) -> None:
        self.owner = owner
        self.expert = expert
        self.finished = False

    def done(self) -> bool:
        self.owner.check_pinned(self.expert)
        return self.finished

    def wait(self) -> None:
        self.owner.check_pinned(self.expert)
        if self.owner.on_wait is not None:
            action, self.owner.on_wait = self.owner.on_wait, None
            action()
        self.finished = True


class FencedSlots(SlotArray):
    def __init__(self, inner: SlotArray, table: Any) -> None:
        self.slots = inner.slots
        self.layout = inner.layout
        self.table = table
        self.fences: list[SlowFence] = []
        self.on_wait: Any = None
        self.last_computed = -1
        self.unpinned_while_reading: list[int] = []

    def read_fence(self) -> ReadFence:
        fence = SlowFence(self, self.last_computed)
        self.fences.append(fence)
        return fence

    def check_pinned(self, expert: int) -> None:
        if not self.table.expert_pin[expert]:
            self.unpinned_while_reading.append(expert)


@pytest.fixture
def fenced_rig(model: Any) -> Iterator[tuple[BackendRig, FencedSlots]]:
    rig = BackendRig(model)
    fenced = FencedSlots(rig.slots, rig.table)
    rig.backend.slots = fenced
    original = rig.backend._compute

    def compute(module: Any, local: int, slot: SlotId, *rest: Any) -> Any:
        fenced.last_computed = rig.layout.expert_id(rig.backend._moe_layer_of[id(module)], local)
        return original(module, local, slot, *rest)

    rig.backend._compute = compute  # type: ignore[method-assign]
    try:
        yield rig, fenced
    finally:
        rig.close()


@pytest.mark.timeout(60)
def test_an_expert_stays_pinned_until_its_read_fence_is_done(fenced_rig: tuple[BackendRig, FencedSlots]) -> None:
    rig, fenced = fenced_rig
    rig.place_all()
    hidden, index, weights = routing(6, seed=31)
    out = rig.forward(0, hidden, index, weights)
    assert torch.equal(out, eager(rig.modules[0], hidden, index, weights))
    assert len(fenced.fences) == len(chosen(index)) and all(f.finished for f in fenced.fences)
    assert fenced.unpinned_while_reading == [], "an expert was unpinned while its computation still read the slot"
    assert int(rig.table.expert_pin.sum()) == 0


@pytest.mark.timeout(60)
def test_a_slot_reassigned_while_a_kernel_reads_it_is_computed_again(
        fenced_rig: tuple[BackendRig, FencedSlots]) -> None:
    """The sequence number must be checked after the fence: a slot stolen (and refilled with another expert's bytes)
    while the computation is still in flight must not be accepted."""
    rig, fenced = fenced_rig
    rig.place_all()
    hidden, index, weights = routing(6, seed=32)
    victim = chosen(index)[0]
    impostor = N_EXPERTS_OTHER_LAYER + victim

    def steal_and_restore() -> None:  # the coordinator reassigns the slot, a copy lands, then the expert returns
        slot = int(rig.table.expert_slot[victim])
        rig.table.assign(SlotId(slot), ExpertId(impostor))
        rig.place(victim, slot=slot)

    fenced.on_wait = steal_and_restore
    out = rig.forward(0, hidden, index, weights)
    assert rig.backend.stats.retries == 1
    assert torch.equal(out, eager(rig.modules[0], hidden, index, weights))


N_EXPERTS_OTHER_LAYER = 8  # experts per layer in the backend rig: the same local index in MoE layer 1


def test_read_fence_and_slot_views_are_device_neutral() -> None:
    """The CPU slots' fence is done at once; the views are the same rows the CUDA slots expose."""
    layout = dataclasses.replace(LAYOUT)
    arr = SlotArray()
    arr.slots = torch.arange(layout.n_slots * layout.expert_numel, dtype=torch.float32).view(layout.n_slots, -1)
    arr.layout = layout
    fence = arr.read_fence()
    assert fence.done()
    lay: ExpertLayout = layout
    assert arr.gate_up(SlotId(1)).shape == (2 * lay.intermediate_size, lay.hidden_size)
    assert arr.down(SlotId(1)).shape == (lay.hidden_size, lay.intermediate_size)
    assert float(arr.down(SlotId(1))[0, 0]) == lay.expert_numel + 2 * lay.intermediate_size * lay.hidden_size


# ---------------------------------------------------------------- start-up: the loader waits for the export
@pytest.mark.timeout(30)
def test_loader_waits_for_the_export_and_keeps_what_came_before(tmp_path: Path) -> None:
    import zmq

    from protocol.messages import Ping
    from workers.bootstrap import Inbox, push_socket, send
    from workers.loader import wait_for_slots

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path / 'loader.sock'}"
    inbox = Inbox(ctx, endpoint)
    to_loader = push_socket(ctx, endpoint)
    try:
        with pytest.raises(TimeoutError, match="SlotsExported"):
            wait_for_slots(inbox, 0.3, [])
        send(to_loader, Ping(nonce=7, sent_ns=1))
        send(to_loader, exported())
        send(to_loader, Ping(nonce=8, sent_ns=2))
        early: list = []
        assert wait_for_slots(inbox, 5.0, early) == exported()
        assert early == [Ping(nonce=7, sent_ns=1)], "a message that came before the export is kept, in order"
        assert inbox.poll(1.0) == Ping(nonce=8, sent_ns=2), "what comes after stays in the inbox"
    finally:
        to_loader.close(linger=0)
        inbox.close()
        ctx.term()
