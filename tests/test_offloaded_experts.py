"""The experts backend against transformers' eager experts: bitwise equal, whatever the order experts become ready."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from protocol.ids import ExpertId, SlotId
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.layout import ExpertLayout
from shm.segment import SHM_DIR, Segment, leftover_segments, segment_name
from shm.slot_table import SlotTable
from workers.loader import CpuCopyEngine
from workers.offloaded_experts import LoadTimedOut, OffloadedExperts

HIDDEN, INTER, N_EXPERTS, TOP_K = 32, 16, 8, 4  # top-4: with 3+ terms per token, summation order shows
MOE_LAYERS = (1, 2)  # decoder layer 0 is dense, so a MoE layer's index differs from its decoder layer's


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=INTER,
        shared_expert_intermediate_size=16, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, mlp_only_layers=[0],
    )
    torch.manual_seed(1234)
    model = Qwen2MoeForCausalLM(config).eval().requires_grad_(False)
    model.set_experts_implementation("eager")
    return model


def experts_modules(model: Any) -> list[torch.nn.Module]:
    return [model.model.layers[layer].mlp.experts for layer in MOE_LAYERS]


def eager(module: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    assert module.config._experts_implementation == "eager"
    with torch.no_grad():
        return module(hidden, index, weights)


def routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    scores = torch.randn(tokens, N_EXPERTS, generator=generator).softmax(dim=-1)
    weights, index = torch.topk(scores, TOP_K, dim=-1)
    return hidden, index, weights / weights.sum(dim=-1, keepdim=True)


class Rig:
    """Store, slots and table filled from the model's experts; expert ``e`` lives in slot ``e``."""

    def __init__(self, model: Any, load_timeout_s: float = 5.0, reordered: bool = True) -> None:
        self.layout = ExpertLayout(moe_layers=MOE_LAYERS, experts_per_layer=N_EXPERTS, top_k=TOP_K,
                                   hidden_size=HIDDEN, intermediate_size=INTER, storage_dtype="float32",
                                   compute_dtype="float32", n_chunks=3, n_slots=len(MOE_LAYERS) * N_EXPERTS)
        lay = self.layout
        self.run_id = f"test_{uuid.uuid4().hex[:12]}"
        self.segments: list[Segment] = []
        self.store = HostExpertStore(self._segment("store", HostExpertStore.nbytes_for(lay)), lay)
        self.slots = CacheSlots(self._segment("slots", CacheSlots.nbytes_for(lay)), lay)
        self.table = SlotTable(self._segment("table", SlotTable.nbytes_for(lay.n_slots, lay.n_experts)),
                               lay.n_slots, lay.n_experts, lay.n_chunks, init=True)
        self.engine = CpuCopyEngine(self.store, self.slots, link_gbps=None)
        self.modules = experts_modules(model)
        for moe_layer, module in enumerate(self.modules):
            for e in range(N_EXPERTS):
                eid = lay.expert_id(moe_layer, e)
                gate_up, down = module.gate_up_proj[e], module.down_proj[e]  # [2I, H] gate rows first, [H, I]
                self.store.write_matrix(eid, "gate", gate_up[:INTER])
                self.store.write_matrix(eid, "up", gate_up[INTER:])
                self.store.write_matrix(eid, "down", down)
        self.slots.slots.fill_(float("nan"))
        self.seq: dict[int, int] = {}
        self.gates: list[tuple[int, int, int, list[int]]] = []
        self.reported_ready: list[list[int]] = []
        """``ready_experts`` of each gate report (the coordinator counts the live hit rate from them)."""
        self.released: list[list[int]] = []
        self.backend = OffloadedExperts(
            lay, self.table, self.slots, self.modules,
            on_gate=self._on_gate,
            on_released=lambda experts: self.released.append(list(experts)),
            load_timeout_s=load_timeout_s,
            reordered=reordered,
        )
        self.backend.begin_request(1)

    def _on_gate(self, request: int, layer: int, step: int, experts: list[int], ready: list[int]) -> None:
        self.gates.append((request, layer, step, list(experts)))
        self.reported_ready.append([int(e) for e in ready])

    def _segment(self, what: str, nbytes: int) -> Segment:
        segment = Segment.create(segment_name(self.run_id, what), nbytes)
        self.segments.append(segment)
        return segment

    def place(self, eid: int, slot: int | None = None, ready: bool = True) -> int:
        """Do what coordinator and loader do: assign, copy every chunk, publish readiness (if ``ready``)."""
        slot = eid if slot is None else slot
        seq = self.table.assign(SlotId(slot), ExpertId(eid))
        for chunk in range(self.layout.n_chunks):
            self.engine.copy_chunk(ExpertId(eid), SlotId(slot), chunk)
        self.seq[eid] = seq
        if ready:
            self.publish(eid)
        return seq

    def publish(self, eid: int, chunks: int | None = None) -> None:
        slot = int(self.table.expert_slot[eid])
        chunks = self.layout.n_chunks if chunks is None else chunks
        assert self.table.publish_ready(SlotId(slot), self.seq[eid], chunks)

    def place_all(self) -> None:
        for eid in range(self.layout.n_experts):
            self.place(eid)

    def forward(self, moe_layer: int, hidden: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backend.forward(self.modules[moe_layer], hidden, index, weights)

    def record_computes(self) -> list[int]:
        """Record the local expert index of every computation, in order."""
        order: list[int] = []
        original = self.backend._compute

        def compute(module: Any, local: int, *rest: Any) -> Any:
            order.append(local)
            return original(module, local, *rest)

        self.backend._compute = compute  # type: ignore[method-assign]
        return order

    def close(self) -> None:
        self.store.close()
        self.slots.close()
        self.table.close()
        for segment in self.segments:
            segment.unlink()
            assert not (SHM_DIR / segment.name).exists()
        assert leftover_segments(self.run_id) == []


@pytest.fixture
def make_rig(model: Any) -> Iterator:
    rigs: list[Rig] = []

    def make(**kwargs: Any) -> Rig:
        rig = Rig(model, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def chosen(index: torch.Tensor) -> list[int]:
    return sorted(set(index.flatten().tolist()))


# ---------------------------------------------------------------- equal to eager
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tokens", [1, 7, 32])
@pytest.mark.parametrize("moe_layer", [0, 1])
def test_bitwise_equal_to_eager(make_rig, tokens: int, moe_layer: int) -> None:
    rig = make_rig()
    rig.place_all()
    hidden, index, weights = routing(tokens, seed=tokens + 10 * moe_layer)
    out = rig.forward(moe_layer, hidden, index, weights)
    reference = eager(rig.modules[moe_layer], hidden, index, weights)
    assert out.shape == reference.shape == (tokens, HIDDEN)
    assert torch.count_nonzero(reference) > 0
    assert torch.equal(out, reference)
    experts = chosen(index)
    assert rig.backend.stats.uses == len(experts)
    assert rig.backend.stats.hits == len(experts)
    assert rig.backend.stats.stall_ns == 0 and rig.backend.stats.retries == 0
    ((request, layer, _step, gated),) = rig.gates
    assert (request, layer, gated) == (1, moe_layer, [moe_layer * N_EXPERTS + e for e in experts])
    assert int(rig.table.expert_pin.sum()) == 0, "every computed expert is unpinned"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moe_layer", [0, 1])
def test_expert_index_e_is_skipped_as_the_eager_loop_skips_it(make_rig, moe_layer: int) -> None:
    """A router may emit index E (one past the last expert: no expert); eager skips it, so must the backend: no
    pin, no report, no computation (layer 0's E would otherwise be layer 1's expert 0; the last layer's, no expert)."""
    rig = make_rig()
    rig.place_all()
    hidden, index, weights = routing(7, seed=51)
    index = index.clone()
    index[::2, -1] = N_EXPERTS  # the last choice of every other token goes nowhere
    out = rig.forward(moe_layer, hidden, index, weights)
    assert torch.equal(out, eager(rig.modules[moe_layer], hidden, index, weights))
    experts = [e for e in chosen(index) if e != N_EXPERTS]
    ((_request, _layer, _step, gated),) = rig.gates
    assert gated == [moe_layer * N_EXPERTS + e for e in experts]
    assert rig.backend.stats.uses == len(experts)
    assert int(rig.table.expert_pin.sum()) == 0


@pytest.mark.parametrize("tokens", [0, 1, 5, 64])
def test_routes_give_each_expert_the_eager_loops_rows_in_its_order(tokens: int) -> None:
    """``Routes`` (one sort per gate) names, for every expert, the (position, token) pairs that ``torch.where`` on
    the eager loop's one-hot mask names, in the same order, with their weights; the skipped index E is chosen by
    no one."""
    from workers.routes import Routes

    _, index, weights = routing(tokens, seed=tokens)
    if tokens:
        index[0, 1] = N_EXPERTS  # a slot routed to no expert
    routes = Routes(index, weights, N_EXPERTS)
    mask = torch.nn.functional.one_hot(index, num_classes=N_EXPERTS + 1).permute(2, 1, 0)  # [E+1, k, T]
    assert routes.chosen == [e for e in range(N_EXPERTS) if mask[e].any()]
    for local in range(N_EXPERTS):
        top_k_pos, token_idx = torch.where(mask[local])
        got_pos, got_idx = routes.rows(local)
        assert torch.equal(got_pos, top_k_pos) and torch.equal(got_idx, token_idx), f"expert {local}"
        rows = torch.randn(len(token_idx), HIDDEN)
        assert torch.equal(routes.weighted(local, rows), rows * weights[token_idx, top_k_pos, None])


@pytest.mark.timeout(60)
def test_padding_of_a_batched_prefill_goes_to_no_expert(make_rig) -> None:
    """``real_tokens`` (the step loop's batched prefill): the padding's experts are neither reported nor computed,
    the real tokens' outputs are eager's bit for bit, and the predictor is shown the real tokens only."""
    rig = make_rig()
    rig.place_all()
    hidden, index, weights = routing(6, seed=77)
    index = index.clone()
    index[4:] = torch.tensor([N_EXPERTS - 1, N_EXPERTS - 2, N_EXPERTS - 3, N_EXPERTS - 4])  # only the padding's
    index[:4] = index[:4] % (N_EXPERTS - 4)
    real = torch.tensor([True, True, True, True, False, False])
    shown: list[int] = []
    rig.backend.on_hidden = lambda request, layer, step, rows: shown.append(rows.shape[0])
    rig.backend.real_tokens = real
    out = rig.forward(0, hidden, index, weights)
    assert torch.equal(out[real], eager(rig.modules[0], hidden[real], index[real], weights[real]))
    assert torch.count_nonzero(out[~real]) == 0
    ((_request, _layer, _step, gated),) = rig.gates
    assert gated == chosen(index[real]) and max(gated) < N_EXPERTS - 4
    assert shown == [4] and rig.backend.stats.uses == len(gated)


@pytest.mark.timeout(60)
def test_the_slot_not_the_model_is_what_is_computed(make_rig) -> None:
    """The backend must read the cache slots: a slot holding another expert changes the result."""
    rig = make_rig()
    rig.place_all()
    hidden, index, weights = routing(5, seed=3)
    target = chosen(index)[0]
    impostor = N_EXPERTS + target  # the same expert index in the other layer
    rig.place(target, slot=target)  # reload the target slot ...
    for chunk in range(rig.layout.n_chunks):  # ... with the bytes of another expert
        rig.engine.copy_chunk(ExpertId(impostor), SlotId(target), chunk)
    out = rig.forward(0, hidden, index, weights)
    assert not torch.equal(out, eager(rig.modules[0], hidden, index, weights))


@pytest.mark.timeout(60)
def test_step_counts_from_the_first_moe_layer(make_rig) -> None:
    rig = make_rig()
    rig.place_all()
    hidden, index, weights = routing(2, seed=4)
    for _ in range(2):
        for moe_layer in (0, 1):
            rig.forward(moe_layer, hidden, index, weights)
    assert [(g[1], g[2]) for g in rig.gates] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(g[3] == [moe_layer * N_EXPERTS + e for e in chosen(index)]
               for g, moe_layer in zip(rig.gates, (0, 1, 0, 1), strict=True))
    rig.backend.begin_request(2)
    rig.forward(0, hidden, index, weights)
    assert rig.gates[-1][:3] == (2, 0, 0)
    assert rig.backend.stats.uses == len(chosen(index))  # counters reset per request


# ---------------------------------------------------------------- experts that become ready later
@pytest.mark.timeout(60)
@pytest.mark.parametrize("moe_layer", [0, 1])
def test_late_experts_in_reverse_order_give_the_same_bits(make_rig, moe_layer: int) -> None:
    rig = make_rig()
    hidden, index, weights = routing(7, seed=21)
    experts = chosen(index)
    assert len(experts) >= 4, "the routing should choose several experts"
    ids = [moe_layer * N_EXPERTS + e for e in experts]
    ready_now, late = ids[:1], ids[1:]
    for eid in ids:
        rig.place(eid, ready=eid in ready_now)
    rig.publish(late[0], chunks=rig.layout.n_chunks - 1)  # all but one chunk: not ready either
    order = rig.record_computes()
    to_publish = list(reversed(late))  # the highest expert first
    polls_without_news = 0

    def loader() -> None:
        """Runs between the backend's polls: once a poll has found nothing new, the next expert lands."""
        nonlocal polls_without_news
        polls_without_news = polls_without_news + 1 if len(order) == len(late) - len(to_publish) + 1 else 0
        if polls_without_news >= 2 and to_publish:
            rig.publish(to_publish.pop(0))
            polls_without_news = 0

    rig.backend.keep_alive = loader
    out = rig.forward(moe_layer, hidden, index, weights)
    assert not to_publish
    assert torch.equal(out, eager(rig.modules[moe_layer], hidden, index, weights))
    assert order == [experts[0], *reversed(experts[1:])], "experts were not computed as they became ready"
    stats = rig.backend.stats
    assert stats.stall_ns > 0
    assert stats.hits == len(ready_now)
    assert stats.uses == len(ids)
    # what the coordinator counts live from the report (``CacheDirectory.on_gate``) is the worker's final figure
    assert len(set(ids).intersection(rig.reported_ready[0])) == stats.hits
    ((request, layer, _step, gated),) = rig.gates
    assert (request, layer, gated) == (1, moe_layer, ids)
    assert int(rig.table.expert_pin.sum()) == 0


@pytest.mark.timeout(60)
def test_chosen_experts_are_pinned_until_computed(make_rig) -> None:
    rig = make_rig()
    hidden, index, weights = routing(7, seed=22)
    ids = chosen(index)
    for eid in ids:
        rig.place(eid, ready=eid != ids[-1])
    pins_seen: list[list[int]] = []
    order = rig.record_computes()

    def loader() -> None:
        """Between polls, once every other expert is computed: look at the pins, then the last expert lands."""
        if len(order) == len(ids) - 1 and not pins_seen:
            pins_seen.append([int(p) for p in rig.table.expert_pin[ids]])
            rig.publish(ids[-1])

    rig.backend.keep_alive = loader
    rig.forward(0, hidden, index, weights)
    assert pins_seen == [[0] * (len(ids) - 1) + [1]]  # computed ones unpinned, the waited-for one still pinned
    assert int(rig.table.expert_pin.sum()) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("waiting", [False, True])
def test_released_experts_are_reported_only_while_the_coordinator_waits(make_rig, waiting: bool) -> None:
    rig = make_rig()
    rig.place_all()
    rig.table.waiting_for_slot = waiting
    hidden, index, weights = routing(7, seed=23)
    rig.forward(1, hidden, index, weights)
    if waiting:
        assert sorted(e for call in rig.released for e in call) == [N_EXPERTS + e for e in chosen(index)]
        assert all(len(call) == 1 for call in rig.released)
    else:
        assert rig.released == []


# ---------------------------------------------------------------- seqlock
@pytest.mark.timeout(60)
def test_a_slot_reassigned_during_the_computation_is_not_used(make_rig) -> None:
    rig = make_rig()
    rig.place_all()
    moe_layer = 1
    hidden, index, weights = routing(7, seed=31)
    experts = chosen(index)
    target_local = experts[len(experts) // 2]
    target = moe_layer * N_EXPERTS + target_local
    intruder = 0  # an expert of the other layer, not used by this call
    computes: list[int] = []
    torn: list[int] = []  # the slot taken from the target, until the target is back in it
    polls = 0
    original = rig.backend._compute

    def compute(module: Any, local: int, slot: SlotId, *rest: Any) -> Any:
        computes.append(local)
        if local == target_local and computes.count(local) == 1:
            # between the lookup and the validity check, the coordinator gives the slot to another expert and the
            # loader starts filling it: what this computation reads is not the target expert any more
            rig.place(intruder, slot=int(slot), ready=False)
            torn.append(int(slot))
        return original(module, local, slot, *rest)

    def back() -> None:  # between polls, the second after the tear: the right expert is loaded again (same slot)
        nonlocal polls
        polls += bool(torn)
        if polls == 2:
            rig.place(target, slot=torn[0])

    rig.backend._compute = compute  # type: ignore[method-assign]
    rig.backend.keep_alive = back
    out = rig.forward(moe_layer, hidden, index, weights)
    assert torn and polls >= 2, "the target expert was never computed, or never waited for"
    assert computes.count(target_local) == 2, "the torn computation was not retried"
    assert rig.backend.stats.retries == 1
    assert rig.backend.stats.stall_ns > 0
    assert torch.equal(out, eager(rig.modules[moe_layer], hidden, index, weights))
    assert int(rig.table.expert_pin.sum()) == 0


@pytest.mark.timeout(60)
def test_a_slot_reassigned_before_the_lookup_is_waited_for(make_rig) -> None:
    """Reassigned after the gate (in ``on_gate``, before any lookup): the backend waits for the expert to return."""
    rig = make_rig()
    rig.place_all()
    hidden, index, weights = routing(7, seed=32)
    target = chosen(index)[0]
    spare = N_EXPERTS + chosen(index)[0]  # layer-1 twin; its slot is reused for the target later
    record = rig.backend.on_gate
    order = rig.record_computes()
    polls = 0

    def on_gate(*args: Any) -> None:
        record(*args)
        rig.place(spare, slot=target, ready=True)  # the target's slot now holds another expert

    def back() -> None:  # between polls, the second with only the target left: it is loaded again, elsewhere
        nonlocal polls
        polls += len(order) == len(chosen(index)) - 1
        if polls == 2:
            rig.place(target, slot=spare)

    rig.backend.on_gate = on_gate
    rig.backend.keep_alive = back
    out = rig.forward(0, hidden, index, weights)
    assert polls >= 2
    assert torch.equal(out, eager(rig.modules[0], hidden, index, weights))
    assert rig.backend.stats.hits == len(chosen(index))  # all were ready when the gate decided
    assert rig.backend.stats.stall_ns > 0


# ---------------------------------------------------------------- timeout
@pytest.mark.timeout(60)
def test_load_timeout_names_the_layer_and_clears_the_pins(make_rig) -> None:
    rig = make_rig(load_timeout_s=0.2)
    rig.place_all()
    hidden, index, weights = routing(7, seed=41)
    experts = chosen(index)
    never, partial = experts[1], experts[-1]
    rig.table.release(SlotId(never))  # no slot at all
    rig.place(partial, ready=False)
    rig.publish(partial, chunks=rig.layout.n_chunks - 1)  # one chunk short, forever
    started = time.monotonic()
    with pytest.raises(LoadTimedOut) as info:
        rig.forward(0, hidden, index, weights)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert f"layer {MOE_LAYERS[0]} " in message  # the decoder layer, not the MoE layer index
    assert str(sorted([never, partial])) in message
    assert elapsed >= 0.2
    assert int(rig.table.expert_pin.sum()) == 0
    assert rig.gates and rig.gates[0][3] == experts
    # the backend is usable again once the experts are there
    rig.place(never)
    rig.publish(partial)
    out = rig.forward(0, hidden, index, weights)
    assert torch.equal(out, eager(rig.modules[0], hidden, index, weights))


class FakeClock:
    """Nanoseconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


@pytest.mark.timeout(60)
def test_the_load_deadline_bounds_the_whole_requests_waiting_and_pings_are_answered_meanwhile(make_rig) -> None:
    """Two layers each wait 0.7 s (fake clock) under a 1 s load deadline: each is under it, together they are not,
    so the second fails. While waiting, the backend keeps calling ``keep_alive`` (how the worker answers pings)."""
    clock = FakeClock()
    rig = make_rig(load_timeout_s=1.0)
    rig.backend.clock_ns = clock
    rig.place_all()
    hidden, index, weights = routing(7, seed=42)
    late = chosen(index)[0]
    calls: list[int] = []
    release_at_ns = [700_000_000]

    def keep_alive() -> None:  # each call while waiting lets 50 ms pass; at release_at_ns the expert lands
        calls.append(clock.now_ns)
        if rig.table.is_pinned(ExpertId(waiting[0])) and not rig.table.is_ready(rig.table.lookup(waiting[0])):
            clock.now_ns += 50_000_000
            if clock.now_ns >= release_at_ns[0]:
                rig.publish(waiting[0])

    rig.backend.keep_alive = keep_alive
    waiting = [late]
    rig.place(late, ready=False)
    out = rig.forward(0, hidden, index, weights)
    assert torch.equal(out, eager(rig.modules[0], hidden, index, weights))
    assert 500_000_000 <= rig.backend.stats.stall_ns < 1_000_000_000  # under the budget: served
    assert len(calls) >= 12, "keep_alive was not called while waiting"
    waiting[0] = N_EXPERTS + late  # the next layer waits as long again: past the request's budget
    rig.place(waiting[0], ready=False)
    release_at_ns[0] = clock.now_ns + 700_000_000
    with pytest.raises(LoadTimedOut) as info:
        rig.forward(1, hidden, index, weights)
    assert f"layer {MOE_LAYERS[1]} " in str(info.value) and "in all" in str(info.value)
    assert clock.now_ns < release_at_ns[0], "it waited out the layer instead of the request's budget"
    assert int(rig.table.expert_pin.sum()) == 0


@pytest.mark.timeout(60)
def test_without_reordered_inference_experts_are_computed_in_ascending_order(make_rig) -> None:
    """The ablation switch: the lowest expert is waited for even when higher ones are ready."""
    rig = make_rig(reordered=False)
    hidden, index, weights = routing(7, seed=21)
    experts = chosen(index)
    ids = list(experts)  # MoE layer 0
    for eid in ids:
        rig.place(eid, ready=eid != ids[0])
    order = rig.record_computes()
    polls = 0

    def loader() -> None:  # between polls: the lowest expert lands at the fifth, while the others are ready
        nonlocal polls
        polls += 1
        if polls == 5:
            rig.publish(ids[0])

    rig.backend.keep_alive = loader
    out = rig.forward(0, hidden, index, weights)
    assert polls >= 5 and order == experts, "without reordering the computation must follow ascending expert order"
    assert torch.equal(out, eager(rig.modules[0], hidden, index, weights))
    assert rig.backend.stats.stall_ns > 0
