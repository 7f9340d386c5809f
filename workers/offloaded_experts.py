"""The experts backend of the inference worker: transformers' experts-implementation extension point, computing
every routed expert from the cache slots.

Per MoE layer and step: pin the experts the gate chose, report them to the coordinator (one-way), then compute each
as soon as the slot table says all its chunks have landed, in whatever order they become ready. Outputs are kept
per expert and summed in ascending expert order at the end, exactly as transformers' eager implementation adds
them, so that the order of computation never changes a single bit of the result.

An expert's computation is accepted (and the expert unpinned, so that its slot may be reused) only once the
computation has finished reading the slot and the slot's sequence number is still the one read before: on the CPU
that is at once, since the computation is synchronous; on the GPU kernels run later than Python issues them, so
each expert's kernels are followed by a read fence (a CUDA event on the compute stream) and the check waits for it.
Validating before the fence would let a slot be reassigned, and a copy land in it, while a queued kernel has yet
to read it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from protocol.ids import ExpertId, SlotId
from shm.cache_slots import ReadFence, SlotArray
from shm.layout import ExpertLayout
from shm.slot_table import SlotTable, SlotView
from workers.host_experts import HostOutputs
from workers.routes import Routes

log = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "promoe_offload"


class LoadTimedOut(RuntimeError):
    """The experts of a layer did not become ready within the load deadline (recoverable: the request fails)."""


@dataclass
class Reading:
    """An expert whose kernels were issued, waiting for its read fence before its result is accepted."""

    local: int
    expert: ExpertId
    view: SlotView
    result: tuple[torch.Tensor, torch.Tensor]
    fence: ReadFence


@dataclass
class LayerStats:
    """Counters of the current request, reset by ``OffloadedExperts.begin_request``."""

    uses: int = 0
    hits: int = 0
    stall_ns: int = 0
    retries: int = 0
    host_experts: int = 0
    """Uses served by an output computed on the host."""


class OffloadedExperts:
    """Computes the routed experts of every MoE layer from the cache slots."""

    def __init__(
        self,
        layout: ExpertLayout,
        table: SlotTable,
        slots: SlotArray,
        experts_modules: list[nn.Module],
        on_gate: Callable[[int, int, int, list[ExpertId], list[ExpertId]], None],
        on_released: Callable[[list[ExpertId]], None],
        load_timeout_s: float,
        on_hidden: Callable[[int, int, int, torch.Tensor], None] | None = None,
        reordered: bool = True,
        keep_alive: Callable[[], None] | None = None,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.layout = layout
        self.table = table
        self.slots = slots
        self.on_gate = on_gate
        self.on_released = on_released
        self.on_hidden = on_hidden
        self.reordered = reordered
        """False (ablation): compute in ascending expert order, waiting for each in turn."""
        self.load_timeout_s = load_timeout_s
        """The most a request may wait for experts in all (its layers' and tokens' waits added up)."""
        self.keep_alive = keep_alive
        """Called at every layer and while waiting, between computations: the worker answers pings from here."""
        self.clock_ns = clock_ns
        self.on_routing: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None
        """(MoE layer, step, ``top_k_index [T, k]``, the layer's input ``[T, H]``) at every gate: trace recording."""
        self.host: HostOutputs | None = None
        """``--host-compute``: publishes small steps' inputs for the host and takes the outputs it computed."""
        self._moe_layer_of = {id(m): i for i, m in enumerate(experts_modules)}
        self.request_id = 0
        self.request_ids: list[int] = []
        """The requests of the current forward pass (step loop), sent with each gate report; empty: ``request_id``."""
        self.real_tokens: torch.Tensor | None = None
        """``[T]`` bool, set by the step loop for a batched prefill: which tokens of the pass are not padding (None:
        all are). Padding goes to no expert (its routing becomes the skipped index E, so it is neither reported,
        loaded nor computed) and is not shown to the predictor."""
        self.step = -1
        self.stats = LayerStats()

    def begin_request(self, request_id: int) -> None:
        self.request_id = request_id
        self.step = -1
        self.stats = LayerStats()

    def register(self) -> None:
        """Make this object the ``promoe_offload`` experts implementation of transformers."""
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(IMPLEMENTATION_NAME, self.forward)

    def forward(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:
        if self.keep_alive is not None:
            self.keep_alive()
        moe_layer = self._moe_layer_of[id(module)]
        if moe_layer == 0:
            self.step += 1
        lay = self.layout
        real = self.real_tokens
        if real is not None:  # padding of a batched prefill: routed to no expert
            top_k_index = top_k_index.masked_fill(~real[:, None], lay.experts_per_layer)
        if self.on_hidden is not None:  # first, so that the predictor gets the most lead time
            shown = hidden_states if real is None else hidden_states[real]
            self.on_hidden(self.request_id, moe_layer, self.step, shown)
        # ascending local expert indices; index E (one past the last expert) is skipped, as transformers' eager
        # experts loop skips it (``if expert_idx == self.num_experts: continue``): a router may emit it for a
        # token/slot that goes to no expert (expert-parallel sentinels)
        routes = Routes(top_k_index, top_k_weights, lay.experts_per_layer)
        chosen = routes.chosen
        expert_ids = [lay.expert_id(moe_layer, e) for e in chosen]
        self.table.pin(expert_ids)
        if self.on_routing is not None:
            self.on_routing(moe_layer, self.step, top_k_index, hidden_states)
        # one reading of the layer's readiness for both the hits and the report (exact FetchRate): the coordinator
        # counts the same hits from it, live (``CacheDirectory.on_gate``)
        ready = self.table.ready_experts(lay.expert_id(moe_layer, 0), lay.experts_per_layer)
        self.stats.uses += len(expert_ids)
        self.stats.hits += len(set(expert_ids).intersection(ready))
        host = self.host
        if host is not None:  # before the gate report: the coordinator may send these experts to the host
            host.publish(moe_layer, self.request_id, self.step, hidden_states, top_k_index)
        self.on_gate(self.request_id, moe_layer, self.step, expert_ids, ready)

        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending = dict(zip(chosen, expert_ids, strict=True))
        reading: list[Reading] = []
        wait_started: int | None = None
        budget_ns = int(self.load_timeout_s * 1e9)
        backoff_s = 0.0
        while pending or reading:
            if self.keep_alive is not None:
                self.keep_alive()
            progressed = False
            candidates = list(pending.items()) if self.reordered else list(pending.items())[:1]
            for local, eid in candidates:
                view = self.table.lookup(eid)
                if view is None or not self.table.is_ready(view):
                    if host is not None and host.published:  # or computed on the host: whichever comes first
                        taken = host.take(moe_layer, chosen.index(local), self.request_id, self.step, eid, local,
                                          routes, hidden_states.dtype)
                        if taken is not None:
                            self._accept(local, eid, taken, pending, outputs)
                            self.stats.host_experts += 1
                            progressed = True
                    continue
                started_ns = self.clock_ns()
                result = self._compute(module, local, view.slot, hidden_states, routes)
                if host is not None:
                    host.timed(started_ns)
                del pending[local]
                reading.append(Reading(local, eid, view, result, self.slots.read_fence()))
                progressed |= self._retire(reading, pending, outputs, wait=False)
            if not progressed and reading:  # nothing else to do: let the GPU finish what it reads
                progressed = self._retire(reading, pending, outputs, wait=True)
            if pending and not progressed:
                now_ns = self.clock_ns()
                if wait_started is None:
                    wait_started = now_ns
                if self.stats.stall_ns + now_ns - wait_started > budget_ns:  # the whole request's waiting
                    self.table.expert_pin[list(pending.values())] = 0
                    raise LoadTimedOut(
                        f"layer {lay.moe_layers[moe_layer]} step {self.step}: experts {sorted(pending)} not ready; "
                        f"the request waited for experts {self.load_timeout_s:.1f} s in all"
                    )
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2 or 10e-6, 100e-6)
            elif wait_started is not None:
                self.stats.stall_ns += self.clock_ns() - wait_started
                wait_started = None
                backoff_s = 0.0
        if wait_started is not None:
            self.stats.stall_ns += self.clock_ns() - wait_started

        final = torch.zeros_like(hidden_states)  # [T, H]
        for local in chosen:  # ascending, as the eager loop adds
            token_idx, contribution = outputs[local]
            final.index_add_(0, token_idx, contribution.to(final.dtype))
        return final

    def _retire(self, reading: list[Reading], pending: dict[int, ExpertId],
                outputs: dict[int, tuple[torch.Tensor, torch.Tensor]], wait: bool) -> bool:
        """Accept the computations whose fence is done (``wait``: all of them, waiting); returns True if any was
        accepted. One whose slot was reassigned meanwhile goes back to ``pending`` and is computed again."""
        accepted = False
        while reading:
            entry = reading[0]
            if wait:
                entry.fence.wait()
            elif not entry.fence.done():
                break  # fences complete in issue order on one stream
            reading.pop(0)
            if not self.table.still_valid(entry.view):  # the slot was reassigned while the kernels read it
                self.stats.retries += 1
                pending[entry.local] = entry.expert
                continue
            self._accept(entry.local, entry.expert, entry.result, None, outputs)
            accepted = True
        if pending:
            ordered = sorted(pending.items())  # a retried expert keeps its place (ascending) for the ablation order
            pending.clear()
            pending.update(ordered)
        return accepted

    def _accept(self, local: int, expert: ExpertId, result: tuple[torch.Tensor, torch.Tensor],
                pending: dict[int, ExpertId] | None, outputs: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep an expert's output and unpin it (reported if the coordinator waits for a slot)."""
        outputs[local] = result
        if pending is not None:
            del pending[local]
        self.table.unpin(expert)
        if self.table.waiting_for_slot:
            self.on_released([expert])

    def _compute(
        self,
        module: nn.Module,
        local: int,
        slot: SlotId,
        hidden_states: torch.Tensor,  # [T, H]
        routes: Routes,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, token_idx = routes.rows(local)
        current_state = hidden_states.index_select(0, token_idx)  # [n, H], as hidden_states[token_idx] gathers
        gate, up = F.linear(current_state, self.slots.gate_up(slot)).chunk(2, dim=-1)  # [n, I] each
        current = module.act_fn(gate) * up  # type: ignore[operator]
        current = F.linear(current, self.slots.down(slot))  # [n, H]
        return token_idx, routes.weighted(local, current)
