"""The coordinator process's own mechanisms, driven in this process over real sockets and a real slot table."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from coordinator.lifecycle import RunningRequest
from coordinator.requests import PendingRequest
from coordinator.server import Coordinator
from protocol.codec import decode, encode
from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, LoadId, RequestId
from protocol.messages import (
    CancelGeneration,
    Drained,
    DrainRequested,
    ErrorReported,
    ExpertLoaded,
    GateDecided,
    Generate,
    GenerationFailed,
    GenerationFinished,
    GetHealth,
    LoadExpert,
    WorkerDied,
    WorkerRestarted,
)
from shm.layout import ExpertLayout
from shm.segment import Segment, segment_name
from shm.slot_table import SlotTable

E = 8
LAYOUT = ExpertLayout(moe_layers=(0, 1), experts_per_layer=E, top_k=2, hidden_size=8, intermediate_size=4,
                      storage_dtype="bfloat16", compute_dtype="float32", n_chunks=1, n_slots=2)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[Coordinator, zmq.Socket]]:
    run_id = f"test_{uuid.uuid4().hex[:12]}"
    cfg = RuntimeConfig(run_id=run_id, run_dir=str(tmp_path), checkpoint="", layout=LAYOUT, policy="lru",
                        device="cpu", bind=f"ipc://{tmp_path}/client.sock", link_gbps=None, lookahead=2,
                        predictor_path=None, load_timeout_s=5.0, supervisor_pid=0)
    segment = Segment.create(segment_name(run_id, "table"), SlotTable.nbytes_for(LAYOUT.n_slots, LAYOUT.n_experts))
    table = SlotTable(segment, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=True)
    loader = zmq.Context.instance().socket(zmq.PULL)
    loader.bind(cfg.endpoint("loader"))
    coordinator = Coordinator(cfg, table)
    try:
        yield coordinator, loader
    finally:
        coordinator.close()
        loader.close(linger=0)
        table.close()
        segment.unlink()


def received_loads(loader: zmq.Socket, timeout_ms: int) -> list[LoadExpert]:
    loads = []
    while loader.poll(timeout_ms):
        msg = decode(loader.recv())
        assert isinstance(msg, LoadExpert)
        loads.append(msg)
        timeout_ms = 10
    return loads


def test_a_release_nobody_reported_is_found_by_the_retry_timer(coordinator: tuple[Coordinator, zmq.Socket]) -> None:
    """The worker unpinned without sending ExpertsReleased (its flag read crossed the coordinator's store): the
    waiting experts still get slots, found by the retry timer alone."""
    coord, loader = coordinator
    cache, table = coord.cache, coord.cache.table
    cache.begin_request(RequestId(1))
    first = [ExpertId(0), ExpertId(1)]
    table.pin(first)
    cache.on_gate(0, 0, first)
    for load in cache.drain():
        assert isinstance(load, LoadExpert)
        table.publish_ready(load.slot, load.seq, 1)
        cache.on_loaded(LoadId(load.load_id), load.seq)
    second = [ExpertId(E), ExpertId(E + 1)]
    table.pin(second)

    async def scenario() -> list[ExpertId]:
        cache.on_gate(0, 1, second)
        coord._send_to_loader()  # nothing to send: both slots are pinned; the timer is armed
        assert cache.waiting == second and table.waiting_for_slot
        assert received_loads(loader, 20) == []
        for expert in first:
            table.unpin(expert)  # ... and no ExpertsReleased follows
        deadline = asyncio.get_running_loop().time() + 2.0
        while cache.waiting and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)
        return cache.waiting

    assert asyncio.run(scenario()) == []
    assert sorted(load.expert for load in received_loads(loader, 500)) == second
    assert coord._retry is None, "the timer stops once nothing waits"


def run_request(coord: Coordinator, request_id: int, envelope: list[bytes]) -> None:
    """Make ``request_id`` the running request, as ``_start_next`` does, without a client round trip."""
    pending = PendingRequest(RequestId(request_id), envelope, Generate(prompt_ids=[1, 2, 3], max_new_tokens=4))
    coord.running = {pending.request_id: RunningRequest(pending, 0.0)}
    coord.cache.begin_request(RequestId(request_id))


def gate(request_id: int, experts: list[int]) -> GateDecided:
    return GateDecided(request_id=RequestId(request_id), step=0, layer=0, experts=[ExpertId(e) for e in experts],
                       ready_experts=[], sent_ns=0)


def test_gate_reports_of_a_dead_inference_worker_load_nothing(coordinator: tuple[Coordinator, zmq.Socket]) -> None:
    """Gate reports still queued from an inference worker that died arrive after ``WorkerDied``: they must not
    re-add loads (nor waiting experts) for the request that is gone, before or after the next request starts."""
    coord, loader = coordinator

    async def scenario() -> None:
        run_request(coord, 1, [b"gone-client"])
        coord.cache.table.pin([ExpertId(0), ExpertId(1)])
        coord.from_workers(gate(1, [0, 1]))
        loads = received_loads(loader, 500)
        assert sorted(load.expert for load in loads) == [0, 1]
        for load in loads:  # landed; still pinned when the worker dies
            coord.cache.table.publish_ready(load.slot, load.seq, 1)
            coord.cache.on_loaded(LoadId(load.load_id), load.seq)
        coord.from_workers(WorkerDied(role="inference", pid=1, exit_code=-9))
        assert not coord.running
        coord.from_workers(gate(1, [E, E + 1]))  # the dead worker's next layer, delivered late
        assert coord.cache.waiting == [] and received_loads(loader, 50) == []
        coord.cache.table.clear_pins()  # the restarted inference worker, before it reports ready
        run_request(coord, 2, [b"next-client"])  # the restarted worker's request
        coord.from_workers(gate(1, [E + 2, E + 3]))
        assert coord.cache.waiting == [] and received_loads(loader, 50) == []
        coord.from_workers(gate(2, [E + 4]))
        assert [load.expert for load in received_loads(loader, 500)] == [E + 4]

    asyncio.run(scenario())


def test_the_coordinator_only_reads_the_pins(coordinator: tuple[Coordinator, zmq.Socket]) -> None:
    """The inference worker is the pins' only writer: through gates, loads, a failed request, the worker's death
    and its restart the coordinator (its view of the pins read-only here) writes none of them."""
    coord, loader = coordinator
    coord.cache.table.expert_pin.flags.writeable = False
    worker = SlotTable(coord.cache.table.segment, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=False)

    async def scenario() -> None:
        for request_id, end in ((1, GenerationFailed(request_id=RequestId(1), code="internal", message="boom")),
                                (2, WorkerDied(role="inference", pid=1, exit_code=-9))):
            run_request(coord, request_id, [b"gone-client"])
            worker.pin([ExpertId(0), ExpertId(1)])
            coord.from_workers(gate(request_id, [0, 1]))
            for load in received_loads(loader, 500):
                worker.publish_ready(load.slot, load.seq, 1)
                coord.from_workers(ExpertLoaded(load_id=load.load_id, seq=load.seq))
            coord.from_workers(end)
            assert not coord.running
            assert worker.is_pinned(ExpertId(0)) and worker.is_pinned(ExpertId(1))
        coord.from_workers(WorkerRestarted(role="inference", pid=2))

    try:
        asyncio.run(scenario())
    finally:
        worker.close()  # its views (the segment stays mapped for the coordinator's table)


def test_at_the_drain_deadline_the_running_request_is_cancelled_and_ends_the_usual_way(
        coordinator: tuple[Coordinator, zmq.Socket]) -> None:
    """Past the drain deadline the running request is not forgotten: the worker is told to stop it, its client is
    answered ``shutting_down`` when the worker reports it stopped, and only then is the runtime drained."""
    coord, _loader = coordinator
    ctx = zmq.Context.instance()
    inference, supervisor = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    inference.bind(coord.cfg.endpoint("inference"))
    supervisor.bind(coord.cfg.endpoint("supervisor"))
    client = ctx.socket(zmq.DEALER)
    client.connect(coord.cfg.bind)

    def replies(timeout_ms: int) -> list[object]:
        out = []
        while client.poll(timeout_ms):
            out.append(decode(client.recv()))
            timeout_ms = 10
        return out

    async def scenario() -> None:
        client.send(encode(GetHealth()))
        envelope = (await coord.client_router.recv_multipart())[:1]  # the client's identity, as serve_clients sees it
        run_request(coord, 1, envelope)
        coord.queue.admit(envelope, Generate(prompt_ids=[1], max_new_tokens=1), RequestId(2))
        coord.from_workers(DrainRequested(timeout_s=3600.0))
        coord._drain_expired()  # what the drain timer calls at the deadline
        assert inference.poll(500), "the running request was not cancelled"
        assert decode(inference.recv()) == CancelGeneration(request_id=RequestId(1))
        (queued_reply,) = replies(500)
        assert isinstance(queued_reply, ErrorReported) and queued_reply.request_id == 2
        assert queued_reply.code == "shutting_down"
        assert list(coord.running) == [1], "forgotten while it runs"
        assert not supervisor.poll(50), "drained while a request still runs"
        coord.from_workers(GenerationFinished(
            request_id=RequestId(1), token_ids=[5, 6], text=None, prompt_tokens=3, ttft_ms=1.0, tpot_ms=1.0,
            stall_ms=0.0, expert_uses=0, expert_hits=0, finish_reason="cancelled"))
        (final,) = replies(500)
        assert isinstance(final, ErrorReported) and (final.code, final.request_id) == ("shutting_down", 1)
        assert not coord.running
        assert supervisor.poll(500) and isinstance(decode(supervisor.recv()), Drained)

    try:
        asyncio.run(scenario())
    finally:
        for sock in (inference, supervisor, client):
            sock.close(linger=0)


def test_the_coordinator_process_does_not_import_torch() -> None:
    """Its bookkeeping needs no tensors: importing torch would cost every runtime start seconds and ~200 MiB."""
    import subprocess
    import sys

    code = "import sys, coordinator.server; print(sorted(m for m in sys.modules if m == 'torch'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
