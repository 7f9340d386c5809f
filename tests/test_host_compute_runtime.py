"""Host compute at run time (``--host-compute``): the host path's output is bit for bit the slot path's, the experts
backend takes whichever is ready first, a stale job is dropped, a host expert's pin never makes a load, and the
runtime's greedy tokens stay transformers' with every miss (``always``) or the cost model's choice (``auto``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch

from coordinator.cache import CacheDirectory
from coordinator.host_dispatch import HostDispatch
from coordinator.policies import make_policy
from protocol.ids import ExpertId, LoadId, RequestId, SlotId
from protocol.messages import (
    ComputeExpert,
    ConfigureCache,
    ExpertComputed,
    ExpertLoaded,
    GateDecided,
    LoadExpert,
    Message,
    Preempt,
)
from shm import quantized
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.host_exchange import HostExchange
from shm.layout import ExpertLayout
from shm.segment import SHM_DIR, Segment, segment_name
from shm.slot_table import SlotTable
from tests.conftest import NEW_TOKENS, PROMPT_IDS, PROMPT_TEXT
from tests.test_offloaded_experts import N_EXPERTS, Rig, eager, model, routing
from workers.bootstrap import send
from workers.copy_engine import CpuCopyEngine
from workers.host_experts import HostExperts, HostOutputs
from workers.routes import Routes

__all__ = ["model"]  # the module-scoped model fixture of test_offloaded_experts

MAX_TOKENS = 4


class HostRig:
    """An experts-backend rig (test_offloaded_experts.Rig) plus a host exchange and the loader's host computations,
    run synchronously where the test says (as the loader's thread would, between the gate and the wait)."""

    def __init__(self, model: Any) -> None:
        self.rig = rig = Rig(model)
        lay = rig.layout
        self.exchange = HostExchange(rig._segment("host", HostExchange.nbytes_for(
            len(lay.moe_layers), lay.experts_per_layer, lay.top_k, lay.hidden_size, MAX_TOKENS)),
            len(lay.moe_layers), lay.experts_per_layer, lay.top_k, lay.hidden_size, MAX_TOKENS)
        self.reports: list[Message] = []
        self.host = HostExperts(lay, rig.store, self.exchange, rig.modules[0].act_fn, self.reports.append)
        self.outputs = HostOutputs(self.exchange)
        rig.backend.host = self.outputs

    def close(self) -> None:
        self.host.close()
        self.exchange.close()
        self.rig.close()


@pytest.fixture
def host_rig(model: Any) -> Any:
    rig = HostRig(model)
    try:
        yield rig
    finally:
        rig.close()


def job(rig: HostRig, moe_layer: int, step: int, local: int, chosen: list[int]) -> ComputeExpert:
    return ComputeExpert(request_id=RequestId(1), layer=moe_layer, step=step,
                         expert=rig.rig.layout.expert_id(moe_layer, local), index=chosen.index(local))


# ---------------------------------------------------------------- the host path equals the slot path
@pytest.mark.parametrize("tokens", [1, 3, MAX_TOKENS])
@pytest.mark.parametrize("moe_layer", [0, 1])
def test_host_output_is_bitwise_the_slot_paths(host_rig: HostRig, tokens: int, moe_layer: int) -> None:
    rig = host_rig.rig
    rig.place_all()
    hidden, index, weights = routing(tokens, seed=100 + tokens + moe_layer)
    module = rig.modules[moe_layer]
    host_rig.outputs.publish(moe_layer, 1, 1, hidden, index)
    assert host_rig.outputs.published
    routes = Routes(index, weights, N_EXPERTS)
    chosen = sorted(set(index.flatten().tolist()))
    assert routes.chosen == chosen
    for local in chosen:
        assert host_rig.host.run(job(host_rig, moe_layer, 1, local, chosen))
        eid = rig.layout.expert_id(moe_layer, local)
        taken = host_rig.outputs.take(moe_layer, chosen.index(local), 1, 1, eid, local, routes, hidden.dtype)
        assert taken is not None
        slot = SlotId(int(rig.table.expert_slot[eid]))
        token_idx, contribution = rig.backend._compute(module, local, slot, hidden, routes)
        assert torch.equal(taken[0], token_idx)
        assert torch.count_nonzero(contribution) > 0
        assert torch.equal(taken[1], contribution), f"expert {local}: host output differs from the slot path"
    reports = [r for r in host_rig.reports if isinstance(r, ExpertComputed)]
    assert len(reports) == len(chosen) and all(r.duration_ns > 0 and r.n_tokens >= 1 for r in reports)


def host_and_slot_weights(storage: str, fill: Callable[[HostExpertStore, ExpertLayout], None]) -> None:
    """A one-layer store of ``storage`` filled by ``fill(store, layout)``: the host's weights of expert 2 must equal,
    element for element, those of a slot the copy engine filled with it."""
    lay = ExpertLayout(moe_layers=(0,), experts_per_layer=4, top_k=2, hidden_size=16, intermediate_size=8,
                       storage_dtype=storage, compute_dtype="float32", n_chunks=3, n_slots=4, group_size=8)
    store = HostExpertStore(Segment.private(HostExpertStore.nbytes_for(lay)), lay)
    slots = CacheSlots(Segment.private(CacheSlots.nbytes_for(lay)), lay)
    fill(store, lay)
    engine = CpuCopyEngine(store, slots, link_gbps=None)
    for chunk in range(lay.n_chunks):
        engine.copy_chunk(ExpertId(2), SlotId(0), chunk)
    host = HostExperts(lay, store, None, torch.nn.functional.silu, lambda msg: None)  # type: ignore[arg-type]
    try:
        gate_up, down = host.weights(ExpertId(2))
        assert gate_up.shape == (16, 16) and down.shape == (16, 8)
        assert gate_up.dtype == down.dtype == torch.float32 and torch.count_nonzero(gate_up) > 0
        assert torch.equal(gate_up, slots.gate_up(SlotId(0))) and torch.equal(down, slots.down(SlotId(0)))
    finally:
        host.close()


def test_host_weights_are_converted_as_a_copy_into_a_slot_converts() -> None:
    """bf16 store, float32 compute."""
    def fill(store: HostExpertStore, lay: ExpertLayout) -> None:
        store.experts.copy_(torch.randn(store.experts.shape, generator=torch.Generator().manual_seed(3)))

    host_and_slot_weights("bfloat16", fill)


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_host_weights_of_quantized_experts_are_dequantized_as_a_slot_dequantizes(storage: str) -> None:
    """Quantized store (``--expert-dtype``): the host computes with exactly the weights a slot holding the copied
    bytes dequantizes to (not the raw bytes converted)."""
    def fill(store: HostExpertStore, lay: ExpertLayout) -> None:
        g = torch.Generator().manual_seed(4)
        for expert in range(lay.n_experts):
            row = store.expert(ExpertId(expert))
            for which, shape in (("gate", (8, 16)), ("up", (8, 16)), ("down", (16, 8))):
                quantized.write_matrix(row, lay, which, torch.randn(*shape, generator=g))

    host_and_slot_weights(storage, fill)


# ---------------------------------------------------------------- the backend takes whichever is ready first
@pytest.mark.parametrize("placed", [(), (0, 2)])
def test_backend_adds_host_outputs_in_ascending_order_bitwise_equal_to_eager(host_rig: HostRig, placed) -> None:
    """Nothing (or some) of the chosen experts in slots, the rest computed on the host as soon as the gate
    reports: equal to the eager loop bit for bit, every pin released."""
    rig = host_rig.rig
    moe_layer = 1
    hidden, index, weights = routing(MAX_TOKENS, seed=7)
    chosen = sorted(set(index.flatten().tolist()))
    from_slots = [chosen[i] for i in placed]
    for local in from_slots:
        rig.place(rig.layout.expert_id(moe_layer, local))
    rig.backend.step = 1  # a decode step (a forward of MoE layer 1 does not advance it)
    rig.backend.on_gate = lambda request, layer, step, experts, ready: [  # the coordinator and the loader
        host_rig.host.run(job(host_rig, layer, step, local, chosen)) for local in chosen if local not in from_slots]
    out = rig.forward(moe_layer, hidden, index, weights)
    assert torch.equal(out, eager(rig.modules[moe_layer], hidden, index, weights))
    assert rig.backend.stats.host_experts == len(chosen) - len(from_slots)
    assert int(rig.table.expert_pin.sum()) == 0, "every expert taken from the host is unpinned"


def test_prefill_and_large_steps_are_not_published(host_rig: HostRig) -> None:
    hidden, index, _ = routing(MAX_TOKENS, seed=1)
    host_rig.outputs.publish(0, 1, 0, hidden, index)
    assert not host_rig.outputs.published, "prefill never goes to the host"
    big, big_index, _ = routing(MAX_TOKENS + 1, seed=2)
    host_rig.outputs.publish(0, 1, 3, big, big_index)
    assert not host_rig.outputs.published
    assert host_rig.exchange.read_input(0, 1, 3) is None


def test_stale_job_is_dropped_without_writing(host_rig: HostRig) -> None:
    """The request moved on (another step's input is in the layer's record): the job reads nothing, writes
    nothing, reports nothing; the current job still runs."""
    hidden, index, _ = routing(2, seed=5)
    chosen = sorted(set(index.flatten().tolist()))
    host_rig.outputs.publish(0, 1, 4, hidden, index)
    stale = job(host_rig, 0, 3, chosen[0], chosen)
    assert not host_rig.host.run(stale)
    assert host_rig.host.dropped == 1 and host_rig.reports == []
    assert host_rig.exchange.read_output(0, stale.index, 1, 3, stale.expert) is None
    assert host_rig.exchange.read_output(0, stale.index, 1, 4, stale.expert) is None
    other_request = ComputeExpert(request_id=RequestId(2), layer=0, step=4, expert=stale.expert, index=stale.index)
    assert not host_rig.host.run(other_request)
    assert host_rig.host.run(job(host_rig, 0, 4, chosen[0], chosen))
    assert host_rig.exchange.read_output(0, stale.index, 1, 4, stale.expert) is not None


# ---------------------------------------------------------------- the coordinator: the pin trap, the decision
def cache_rig(policy: str, n_slots: int) -> tuple[CacheDirectory, SlotTable, Segment]:
    lay = ExpertLayout(moe_layers=(0, 1, 2), experts_per_layer=8, top_k=2, hidden_size=8, intermediate_size=4,
                       storage_dtype="float32", compute_dtype="float32", n_chunks=3, n_slots=n_slots)
    segment = Segment.create(segment_name(f"test_{uuid.uuid4().hex[:12]}", "table"),
                             SlotTable.nbytes_for(lay.n_slots, lay.n_experts))
    table = SlotTable(segment, lay.n_slots, lay.n_experts, lay.n_chunks, init=True)
    return CacheDirectory(table, lay, make_policy(policy, lay)), table, segment


def loads(commands: list[Message]) -> list[LoadExpert]:
    return [c for c in commands if isinstance(c, LoadExpert)]


@pytest.mark.parametrize("on_host", [True, False])
def test_a_host_experts_pin_never_queues_its_load_when_its_preemption_lands(on_host: bool) -> None:
    """A speculative load of X is being preempted when the gate chooses X; the worker pins X at its gate. If the
    coordinator sent X to the host, the preemption's answer must not queue a load of X for that pin (without host
    compute it must: the control case)."""
    cache, table, segment = cache_rig("promoe", n_slots=3)
    try:
        cache.begin_request(RequestId(1))
        X = ExpertId(2 * 8)  # expert 0 of MoE layer 2
        assert cache.on_predicted(1, 2, [X], [0.99]) is None
        (spec,) = loads(cache.drain())
        table.pin([ExpertId(0), ExpertId(1)])
        cache.on_gate(1, 0, [ExpertId(0), ExpertId(1)], [])
        for load in loads(cache.drain()):
            assert table.publish_ready(load.slot, load.seq, 3)
            cache.on_loaded(load.load_id, load.seq)
        table.pin([ExpertId(8)])
        cache.on_gate(1, 1, [ExpertId(8)], [])  # no free slot: X's speculation is preempted for expert 8
        assert any(isinstance(c, Preempt) and c.load_ids == [spec.load_id] for c in cache.drain())
        table.pin([X])  # the worker, at layer 2's gate, before the coordinator decides
        cache.on_gate(1, 2, [X], [], host={X} if on_host else ())
        cache.drain()
        cache.on_preempted([LoadId(spec.load_id)], [1])
        issued = [load.expert for load in loads(cache.drain())]
        assert ExpertId(8) in issued, "the freed slot serves the expert that waited"
        if on_host:
            assert X not in issued and X not in cache.waiting, "a host expert's pin made a load"
        else:
            assert X in issued or X in cache.waiting
    finally:
        table.close()
        segment.unlink()
    assert not (SHM_DIR / segment.name).exists()


def test_dispatch_sends_only_published_missing_experts_and_measures() -> None:
    cache, table, segment = cache_rig("lru", n_slots=3)
    try:
        dispatch = HostDispatch("always")
        dispatch.begin_request(RequestId(1))
        gate = GateDecided(request_id=RequestId(1), step=2, layer=1, experts=[ExpertId(8), ExpertId(9)],
                           ready_experts=[ExpertId(9)], sent_ns=0, n_tokens=1, host_input=True, device_ns=2_000_000,
                           device_experts=4)
        (only,) = dispatch.at_gate(cache, gate)
        assert (only.expert, only.index, only.step, only.layer) == (8, 0, 2, 1)
        assert dispatch.unreported() == [only]  # what a restarted loader would be sent again
        assert dispatch.model.device_ms_per_expert == pytest.approx(0.5)
        gate.host_input = False  # prefill or a large step: the input is not in the exchange
        assert dispatch.at_gate(cache, gate) == []
        dispatch.on_computed(ExpertComputed(request_id=RequestId(1), expert=ExpertId(8), n_tokens=1,
                                            duration_ns=3_000_000))
        assert dispatch.model.host_ms(1) == pytest.approx(3.0)
        assert dispatch.unreported() == []  # reported: not sent again
        assert dispatch.metrics(1)["host_ms"] == pytest.approx(3.0) and dispatch.metrics(1)["host_jobs"] == 1
        gate.host_input, gate.step = True, 3
        dispatch.at_gate(cache, gate)
        assert [j.step for j in dispatch.unreported()] == [3]
        dispatch.begin_request(RequestId(2))
        assert dispatch.unreported() == []  # the next request's loader owes nothing of the last one's
        gate.host_input = True
        assert HostDispatch("never").at_gate(cache, gate) == []
    finally:
        table.close()
        segment.unlink()


# ---------------------------------------------------------------- the runtime: the oracle, and host work done
RUNTIME_CASES = [("always", "lru"), ("always", "promoe"), ("auto", "lru"), ("auto", "promoe"), ("never", "promoe")]
CACHE_EXPERTS = 24  # of 192


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("mode", "policy"), RUNTIME_CASES)
def test_runtime_with_host_compute_matches_transformers(runtime_keeper, checkpoint, reference, mode, policy):
    """One runtime started with host compute on; each case sets its mode and policy at run time."""
    flags = ("--policy", "lru", "--cache-experts", str(CACHE_EXPERTS), "--link-gbps", "20", "--host-compute", "auto")
    rt = runtime_keeper.serving(checkpoint, flags, policy, CACHE_EXPERTS)
    with rt.client() as client:
        assert client.configure_cache(host_compute=mode).host_compute == mode
        by_ids = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        if (mode, policy) == RUNTIME_CASES[0]:  # the text prompt once: the oracle module covers it per policy
            assert client.generate(prompt=PROMPT_TEXT, max_new_tokens=NEW_TOKENS).token_ids == reference["text"]
    assert by_ids.token_ids == reference["ids"]
    metrics = by_ids.metrics
    assert metrics["host_predicted_jobs"] <= metrics["host_jobs"]
    if mode == "never":  # switched off at run time: the worker stops publishing, the coordinator sends nothing
        assert metrics["host_jobs"] == metrics["host_experts"] == 0
    if mode == "always":
        assert metrics["host_jobs"] >= 1 and metrics["host_ms"] > 0
        assert metrics["host_experts"] > 0, "no expert was taken from the host"
        assert metrics["host_experts"] <= metrics["host_jobs"]


def test_configure_cache_switches_host_compute_only_where_the_runtime_started_with_it() -> None:
    from coordinator.configure import CacheSettings
    from launch import build_parser, check_serving_flags

    args = build_parser().parse_args(["--host-max-tokens", "0"])
    assert "--host-max-tokens must be >= 1" in (check_serving_flags(args, "ipc:///x") or "")
    assert check_serving_flags(build_parser().parse_args(["--host-max-tokens", "8"]), "ipc:///x") is None

    start = CacheSettings("lru", 24, True, True, True, True, host_compute="auto")
    assert start.updated(ConfigureCache(host_compute="always"), 4, 24).reply(24).host_compute == "always"
    with pytest.raises(ValueError, match="host_compute"):
        start.updated(ConfigureCache(host_compute="sometimes"), 4, 24)
    # the worker publishes its inputs only while some host compute is on (on a GPU: a copy to the host per layer)
    assert start.for_inference().host_inputs
    assert not start.updated(ConfigureCache(host_compute="never"), 4, 24).for_inference().host_inputs


def test_loader_reports_each_loads_copy_time_and_bytes_for_the_link_model(tmp_path) -> None:
    """``ExpertLoaded`` carries the time the load's chunks spent on the (emulated) link and their bytes: at least
    what the pacing makes them take, and the whole expert."""
    from tests.test_loader import LAYOUT
    from tests.test_loader import Rig as LoaderRig

    link_gbps = 0.01  # 384 bytes per expert: 38.4 us on this link
    rig = LoaderRig(tmp_path, link_gbps=link_gbps)
    try:
        rig.load(1, slot=0, expert=3)
        rig.deliver()
        rig.run_until_idle()
        (loaded,) = rig.events(ExpertLoaded)
        assert loaded.copied_nbytes == LAYOUT.expert_nbytes
        assert loaded.copy_ns >= LAYOUT.expert_nbytes / link_gbps
        send(rig.to_loader, ComputeExpert(request_id=RequestId(1), layer=0, step=1, expert=ExpertId(3), index=0))
        rig.deliver()  # host compute off: refused in the log, the loader goes on
        assert rig.events(ExpertComputed) == []
    finally:
        rig.close()


def test_configure_cache_refuses_host_compute_on_a_runtime_started_without_it(tmp_path) -> None:
    from coordinator.configure import CacheConfigurator
    from protocol.config import RuntimeConfig
    from protocol.messages import ErrorReported

    cache, table, segment = cache_rig("lru", n_slots=3)
    try:
        cfg = RuntimeConfig(run_id="x", run_dir=str(tmp_path), checkpoint="", layout=cache.layout, policy="lru",
                            device="cpu", bind="", link_gbps=None, lookahead=1, predictor_path=None,
                            load_timeout_s=1.0, supervisor_pid=0)  # host_compute: never
        replies: list[Message] = []
        configurator = CacheConfigurator(cfg, cache, {}, lambda envelope, msg: replies.append(msg) or True,
                                         lambda: None)
        configurator.request([b"client"], ConfigureCache(host_compute="auto"), busy=None)
        (reply,) = replies
        assert isinstance(reply, ErrorReported) and reply.code == "bad_request" and "--host-compute" in reply.message
        assert configurator.pending is None and configurator.settings.host_compute == "never"
    finally:
        table.close()
        segment.unlink()
