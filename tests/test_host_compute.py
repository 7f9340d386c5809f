"""``coordinator/host_compute.py``: the cost model that sends a missed expert to the host, the link or its load in
flight, from measured estimates only."""

from __future__ import annotations

import pytest

from coordinator.cache import CacheDirectory
from coordinator.host_compute import Choice, CostModelSettings, HostComputeModel, Miss, link_queue
from coordinator.policies import make_policy
from protocol.ids import ExpertId, RequestId
from protocol.messages import LoadExpert
from shm.layout import ExpertLayout
from shm.segment import Segment
from shm.slot_table import SlotTable

EXPERT_NBYTES = 17_300_000
CHUNK_NBYTES = EXPERT_NBYTES // 3
LINK_GBPS = 25.0
LOAD_MS = EXPERT_NBYTES / (LINK_GBPS * 1e6)  # 0.692


def measured(host_ms: float = 0.48, device_ms: float = 0.046, link_gbps: float = LINK_GBPS,
             mode: str = "auto") -> HostComputeModel:
    model = HostComputeModel(CostModelSettings(mode=mode))
    model.observe_link(CHUNK_NBYTES, CHUNK_NBYTES / (link_gbps * 1e6))
    model.observe_host(1, host_ms)
    model.observe_device(device_ms)
    return model


def choices(model: HostComputeModel, misses: list[Miss], **state: float) -> list[Choice]:
    return [d.choice for d in model.decide(misses, **state)]  # type: ignore[arg-type]


def test_before_any_measurement_the_first_miss_measures_the_host_and_the_rest_the_link() -> None:
    model = HostComputeModel()
    misses = [Miss(3, EXPERT_NBYTES), Miss(5, EXPERT_NBYTES), Miss(9, EXPERT_NBYTES, CHUNK_NBYTES)]
    assert choices(model, misses) == [Choice.HOST, Choice.LOAD, Choice.WAIT]
    assert all(d.cost_ms is None for d in model.decide(misses))


def test_a_host_faster_than_the_copy_computes_a_lone_miss_and_a_slow_one_does_not() -> None:
    miss = [Miss(7, EXPERT_NBYTES)]
    assert choices(measured(host_ms=0.48), miss) == [Choice.HOST]  # 0.48 ms against 0.69 + 0.05
    assert choices(measured(host_ms=0.9), miss) == [Choice.LOAD]
    # a queue on the link makes even a slow host worth it
    assert choices(measured(host_ms=0.9), miss, link_backlog_nbytes=2 * EXPERT_NBYTES) == [Choice.HOST]
    decision = measured(host_ms=0.48).decide(miss)[0]
    assert decision.cost_ms == pytest.approx(0.48) and decision.ready_in_ms == pytest.approx(0.48)


def test_a_load_nearly_landed_is_waited_for_and_one_barely_started_is_not() -> None:
    model = measured(host_ms=0.48)
    assert choices(model, [Miss(1, EXPERT_NBYTES, CHUNK_NBYTES)]) == [Choice.WAIT]  # 0.23 ms left
    assert choices(model, [Miss(1, EXPERT_NBYTES, EXPERT_NBYTES)]) == [Choice.HOST]  # 0.69 ms left


def test_misses_of_one_gate_are_shared_between_the_host_and_the_link() -> None:
    """List scheduling: host 0.48 ms each, link 0.69 + 0.046 ms: host, link, host, link."""
    misses = [Miss(e, EXPERT_NBYTES) for e in (2, 4, 6, 8)]
    decisions = measured().decide(misses)
    assert [d.choice for d in decisions] == [Choice.HOST, Choice.LOAD, Choice.HOST, Choice.LOAD]
    assert [d.ready_in_ms for d in decisions] == pytest.approx(
        [0.48, LOAD_MS + 0.046, 0.96, 2 * LOAD_MS + 0.046])
    # in-flight loads are served first (fewest bytes left first); the result follows the order given
    mixed = [Miss(2, EXPERT_NBYTES), Miss(4, EXPERT_NBYTES, CHUNK_NBYTES)]
    assert choices(measured(), mixed) == [Choice.HOST, Choice.WAIT]


def test_resident_experts_on_the_device_delay_a_load_and_not_the_host() -> None:
    model = measured(host_ms=0.8, device_ms=0.1)
    miss = [Miss(1, EXPERT_NBYTES)]
    assert choices(model, miss) == [Choice.LOAD]  # 0.79 against 0.8
    assert choices(model, miss, device_backlog_experts=8) == [Choice.HOST]  # the device is busy until 0.8
    assert choices(model, miss, host_backlog_ms=1.0) == [Choice.LOAD]


def test_many_tokens_per_expert_load_once_the_host_slope_is_measured() -> None:
    """Prefill: the host's time grows with the tokens, the copy's does not."""
    model = measured(host_ms=0.48)
    for _ in range(5):
        model.observe_host(64, 0.48 + 63 * 0.01)
        model.observe_host(1, 0.48)
    assert model.host_ms(512) == pytest.approx(0.48 + 511 * 0.01)
    assert choices(model, [Miss(1, EXPERT_NBYTES)], tokens=1) == [Choice.HOST]
    assert choices(model, [Miss(1, EXPERT_NBYTES)], tokens=512) == [Choice.LOAD]


def test_never_and_always_do_not_ask_the_estimates() -> None:
    misses = [Miss(1, EXPERT_NBYTES), Miss(2, EXPERT_NBYTES, CHUNK_NBYTES)]
    assert choices(measured(mode="never", host_ms=0.01), misses) == [Choice.LOAD, Choice.WAIT]
    assert choices(measured(mode="always", host_ms=100.0), misses) == [Choice.HOST, Choice.HOST]
    with pytest.raises(ValueError):
        CostModelSettings(mode="sometimes")


def test_the_estimates_follow_the_measurements() -> None:
    model = HostComputeModel(CostModelSettings(smoothing=0.2))
    assert model.link_gbps is None and model.host_ms(1) is None and model.device_ms_per_expert is None
    model.observe_link(5_000_000, 0.2)  # 25 GB/s
    assert model.link_gbps == pytest.approx(25.0)
    assert model.link_ms(EXPERT_NBYTES) == pytest.approx(LOAD_MS)
    for _ in range(60):  # the link slows to 10 GB/s: the estimate moves there
        model.observe_link(5_000_000, 0.5)
    assert model.link_gbps == pytest.approx(10.0, rel=1e-3)
    model.observe_host(1, 0.5)
    assert model.host_ms(1) == pytest.approx(0.5)
    assert model.host_ms(8) == pytest.approx(0.5)  # one token count seen: the prior slope (0)
    for _ in range(60):
        model.observe_host(1, 0.3)
    assert model.host_ms(1) == pytest.approx(0.3, rel=1e-3)
    for _ in range(60):  # two token counts: a line through them
        model.observe_host(1, 0.3)
        model.observe_host(9, 1.1)
    assert model.host_ms(5) == pytest.approx(0.7, rel=1e-3)
    assert model.host_ms(17) == pytest.approx(1.9, rel=1e-3)
    for ms in (0.1, 0.2):
        model.observe_device(ms)
    assert 0.1 < (model.device_ms_per_expert or 0) < 0.2


def test_the_link_queue_as_the_coordinator_sees_it_and_a_host_expert_at_the_gate() -> None:
    """``on_gate(host=...)`` loads the device experts only; ``link_queue`` reads what is left to copy from the loads
    in flight and the chunks the slot table shows landed."""
    lay = ExpertLayout(moe_layers=(0, 1), experts_per_layer=8, top_k=2, hidden_size=8, intermediate_size=3,
                       storage_dtype="bfloat16", compute_dtype="float32", n_chunks=3, n_slots=4)
    table = SlotTable(Segment.private(SlotTable.nbytes_for(4, lay.n_experts)), 4, lay.n_experts, 3, init=True)
    try:
        cache = CacheDirectory(table, lay, make_policy("lru", lay))
        cache.begin_request(RequestId(1))
        table.pin([ExpertId(1)])
        cache.on_gate(0, 0, [ExpertId(1), ExpertId(2)], host=[ExpertId(2)])
        loads = [m for m in cache.drain() if isinstance(m, LoadExpert)]
        assert [m.expert for m in loads] == [1]  # the host expert is not loaded
        assert table.publish_ready(loads[0].slot, loads[0].seq, 1)  # one chunk of three landed
        assert link_queue(cache, [ExpertId(1)], 300) == ({1: 200}, 0)
        assert link_queue(cache, [ExpertId(9)], 300) == ({}, 200)  # another gate: a precise load ahead of it
    finally:
        table.close()
