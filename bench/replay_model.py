"""A discrete-event model of one GPU serving decode steps, driven by the runtime's own cache code.

What is the runtime's own: the cache directory (``coordinator.cache.CacheDirectory``) with its policy
(``coordinator.policies``), over a real slot table (``shm.slot_table.SlotTable``), and the loader's chunk queue
(``workers.chunk_queue.ChunkQueue``) in its priority order, with early preemption and reordering as the coordinator
sends them. No policy is written a second time here.

What is modelled (``DeviceProfile``):
- per MoE layer of one token, ``compute_ms`` with every expert resident: the part before the gate
  (``gate_fraction``: attention, router), the routed experts (``routed_fraction``, an equal share per chosen
  expert), then the rest (the shared experts, which transformers' MoE blocks compute after the routed ones);
- a host-to-device link of ``link_gbps`` moving one chunk at a time, in the chunk queue's order; a chunk's readiness
  is published when its copy completes, exactly as the loader does (refused if the slot was reassigned meanwhile);
- the inference worker: at the gate it pins the chosen experts, computes those whose chunks have all landed, then
  each other one as soon as it lands (reordered inference), or in ascending order waiting for each (ablation);
  it unpins each expert once computed;
- predictions (``promoe``): the routing predictor works from gate decisions, so the prediction made at a layer (for
  the layer ``lookahead`` ahead) is known once that layer's gate has decided, and reaches the coordinator
  ``predictor_ms`` later; with it, the outlook made at the same gate: the probability of every expert of that layer
  at its gate one token on, which ranks what is resident for eviction and loads nothing.
- host compute (``--host-compute``, ``HostProfile``): a missing expert may be computed on the host CPU instead, one
  at a time on the host's own resource (in parallel with the link and the device), taking a per-call overhead plus
  the expert's bytes at the host's read bandwidth; the layer ends once its device experts and its host experts are
  done. Which misses go there is decided by ``coordinator.host_compute.HostComputeModel`` from what it has measured
  so far in this replay (every chunk's copy, every host computation, every device expert), as the runtime would.
  A host-computed expert counts as a use for the policy and is not loaded for its gate (a load of it in flight goes
  on; a later prediction or miss may load it).
Messages between processes take no time (a ZeroMQ one-way message is tens of microseconds against a 0.7 ms copy).

Every number is a function of the trace and the profile: the same input gives the same output, on any machine.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.cache import CacheDirectory
from coordinator.host_compute import Choice, CostModelSettings, HostComputeModel, Miss, link_queue
from coordinator.policies import make_policy
from protocol.ids import ExpertId, RequestId
from protocol.messages import LoadExpert, Message, Preempt, Reorder
from shm.layout import ExpertLayout
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers.chunk_queue import ChunkQueue, QueuedLoad

Predict = Callable[[int, int, int], tuple[Sequence[int], Sequence[float] | None]]
"""(token index in the trace, MoE layer, distance) -> local experts predicted for the target layer, and the
probability of each (None if the predictor gives none)."""
Outlook = Callable[[int, int], np.ndarray]
"""(token index in the trace, MoE layer) -> ``[E]`` probability of each expert of that layer at its gate one token
on (ranks what is resident; never loads)."""


@dataclass(frozen=True)
class HostProfile:
    """The host CPU computing experts from the host store: the replay's ground truth (the cost model never reads it;
    it measures it). Defaults: README, "Host compute"."""

    gbps: float = 40.0
    """Expert weights the host reads per second while computing one expert for a few tokens, GB/s."""
    overhead_ms: float = 0.05
    """Per call: handing the hidden states over, waking the threads, writing the output back, ms."""

    def expert_ms(self, nbytes: int) -> float:
        """One expert for one token."""
        return self.overhead_ms + nbytes / (self.gbps * 1e6)


@dataclass(frozen=True)
class DeviceProfile:
    """The machine the replay models."""

    link_gbps: float
    """Host-to-device bandwidth of pinned copies, GB/s."""
    compute_ms: float
    """One MoE layer of one decode token with every expert resident, ms."""
    expert_nbytes: int
    """Bytes of one expert as it crosses the link."""
    n_chunks: int = 3
    """Chunks per expert (the loader's unit of copying and preemption)."""
    gate_fraction: float = 0.3
    """Share of a layer's compute before its gate decides (attention, router)."""
    routed_fraction: float = 0.55
    """Share of the routed experts (equal per chosen expert); the rest (shared experts) follows them."""
    predictor_ms: float = 0.2
    """From a layer's gate decision to the prediction it allows reaching the coordinator, ms."""
    host: HostProfile = HostProfile()
    """The host CPU, for host compute."""

    @property
    def chunk_ms(self) -> float:
        return self.expert_nbytes / self.n_chunks / (self.link_gbps * 1e6)


@dataclass
class ReplayResult:
    tokens: int = 0
    uses: int = 0
    hits: int = 0
    """Uses whose every chunk had landed when the gate chose."""
    time_ms: float = 0.0
    stall_ms: float = 0.0
    link_bytes: int = 0
    """Bytes copied over the link, wasted chunks included."""
    predicted: int = 0
    predicted_chosen: int = 0
    predicted_ready: int = 0
    host_experts: int = 0
    """Misses computed on the host."""
    host_ms: float = 0.0
    """Their host time (each call's own duration)."""
    host_predicted_ms: float = 0.0
    """What the cost model expected them to take (decisions made before the host was measured count 0)."""


_PREDICT, _GATE, _CHUNK, _OUTLOOK = 0, 1, 2, 3


class ReplayModel:
    def __init__(self, policy: str, n_slots: int, n_layers: int, experts_per_layer: int, top_k: int,
                 profile: DeviceProfile, *, lookahead: int | tuple[int, ...] = 2, predict: Predict | None = None,
                 outlook: Outlook | None = None, host_compute: str = "never",
                 early_preemption: bool = True, reordered: bool = True) -> None:
        self.profile = profile
        self.n_layers = n_layers
        self.experts_per_layer = experts_per_layer
        self.lookahead = (lookahead,) if isinstance(lookahead, int) else tuple(lookahead)
        """Distances predicted at every gate (each a prediction of its own, farthest first)."""
        self.reordered = reordered
        self.layout = ExpertLayout(moe_layers=tuple(range(n_layers)), experts_per_layer=experts_per_layer,
                                   top_k=top_k, hidden_size=1, intermediate_size=profile.n_chunks,
                                   storage_dtype="bfloat16", compute_dtype="bfloat16", n_chunks=profile.n_chunks,
                                   n_slots=n_slots)
        n_experts = self.layout.n_experts
        self.segment = Segment.private(SlotTable.nbytes_for(n_slots, n_experts))
        self.table = SlotTable(self.segment, n_slots, n_experts, profile.n_chunks, init=True)
        self.cache = CacheDirectory(self.table, self.layout, make_policy(policy, self.layout), early_preemption)
        self.predict = predict if self.cache.policy.prefetches else None
        self.outlook = outlook if self.cache.policy.prefetches else None
        self.queue = ChunkQueue()
        self.result = ReplayResult()
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._now = 0.0
        self._link_busy = False
        self._unpins: list[tuple[float, ExpertId]] = []
        self._waiting_compute: dict[ExpertId, None] = {}
        """Chosen experts of the current layer not yet computed, in ascending order."""
        self._landed_waiting: set[ExpertId] = set()
        """... of which every chunk has landed."""
        self._busy_until = 0.0
        self._finished: float | None = None
        self.host_model = HostComputeModel(CostModelSettings(mode=host_compute)) if host_compute != "never" else None
        """The cost model (None: every miss crosses the link, as without host compute)."""
        self._host_free = 0.0
        """When the host finishes the work it was given."""
        self._host_done = 0.0
        """When the current layer's host experts are all done."""

    # ------------------------------------------------------------ the event queue
    def _at(self, time_ms: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time_ms, self._seq, kind, payload))

    def _run_until_layer_done(self) -> float:
        """Process events until the current layer's last expert is computed; returns that time."""
        self._finished = None
        events, unpins = self._events, self._unpins
        while self._finished is None:
            time_ms, _, kind, payload = heapq.heappop(events)
            self._now = time_ms
            if unpins and unpins[0][0] <= time_ms:
                self._apply_unpins()
            if kind == _CHUNK:
                self._chunk_done(payload)  # type: ignore[arg-type]
            elif kind == _PREDICT:
                step, layer, experts, probabilities = payload  # type: ignore[misc]
                self.cache.on_predicted(step, layer, experts, probabilities)
                self._send()
            elif kind == _OUTLOOK:
                step, layer, probabilities = payload  # type: ignore[misc]
                self.cache.on_outlook(step, layer, probabilities)
            else:
                self._gate(payload)  # type: ignore[arg-type]
        return self._finished

    # ------------------------------------------------------------ the loader
    def _send(self) -> None:
        """The coordinator's commands reach the loader (at once)."""
        if self.cache.outbox:
            for command in self.cache.drain():
                self._handle(command)
        if not self._link_busy:
            self._pump_link()

    def _handle(self, command: Message) -> None:
        if isinstance(command, LoadExpert):
            self.queue.push(QueuedLoad.from_message(command, self.profile.n_chunks))
        elif isinstance(command, Preempt):
            dropped = self.queue.preempt(command.load_ids)
            if dropped:
                self.cache.on_preempted([d[0] for d in dropped], [d[1] for d in dropped])
                for more in self.cache.drain():
                    self._handle(more)
        elif isinstance(command, Reorder):
            self.queue.reorder(command.load_ids)

    def _pump_link(self) -> None:
        """Start the next chunk if the link is free (as ``Loader.step``: never copy into a reassigned slot)."""
        while not self._link_busy:
            item = self.queue.pop_chunk()
            if item is None:
                return
            load, chunk = item
            if self.table.slot_seq[load.slot] != load.seq:
                self.queue.preempt([load.load_id])
                continue
            self._link_busy = True
            self._at(self._now + self.profile.chunk_ms, _CHUNK, (load, chunk))

    def _chunk_done(self, item: tuple[QueuedLoad, int]) -> None:
        load, chunk = item
        self._link_busy = False
        self.result.link_bytes += self.profile.expert_nbytes // self.profile.n_chunks
        if self.host_model is not None:  # the loader times every copy
            self.host_model.observe_link(self.profile.expert_nbytes // self.profile.n_chunks, self.profile.chunk_ms)
        published = self.table.publish_ready(load.slot, load.seq, chunk + 1)
        if published and chunk + 1 == load.n_chunks:
            self.cache.on_loaded(load.load_id, load.seq)
            self._landed(load.expert)
        self._send()

    # ------------------------------------------------------------ the inference worker
    def _apply_unpins(self) -> None:
        released = False
        while self._unpins and self._unpins[0][0] <= self._now:
            _, expert = heapq.heappop(self._unpins)
            self.table.unpin(expert)
            released = True
        if released and self.table.waiting_for_slot:
            self.cache.on_released()
            self._send()

    def _compute_ready(self) -> None:
        """Compute what the worker can compute now: every landed expert (reordered), or the next in ascending order
        if it has landed; each starts when the worker is free, and is unpinned when done."""
        while self._waiting_compute:
            if self.reordered:
                if not self._landed_waiting:
                    return
                expert = min(self._landed_waiting)
            else:
                expert = next(iter(self._waiting_compute))
                if expert not in self._landed_waiting:
                    return
            self._landed_waiting.discard(expert)
            del self._waiting_compute[expert]
            self._busy_until = max(self._now, self._busy_until) + self._expert_ms
            heapq.heappush(self._unpins, (self._busy_until, expert))
            if self.host_model is not None:
                self.host_model.observe_device(self._expert_ms)
        self._finished = max(self._busy_until, self._host_done) + self._after_ms

    def _landed(self, expert: ExpertId) -> None:
        if expert in self._waiting_compute:  # pinned since its gate: it stays landed until computed
            self._landed_waiting.add(expert)
            self._compute_ready()

    def _gate(self, payload: tuple[int, int, list[ExpertId]]) -> None:
        step, layer, experts = payload
        table = self.table
        landed = {e for e in experts if table.is_ready(table.lookup(e))}
        self.result.uses += len(experts)
        self.result.hits += len(landed)
        self._host_done = self._now
        host = self._host_compute([e for e in experts if e not in landed], len(landed))
        device = [e for e in experts if e not in host]
        table.pin(device)
        # no message delay: what the worker saw is what the table says
        self.cache.on_gate(step, layer, experts, host=host)
        self._waiting_compute = dict.fromkeys(sorted(device))
        self._landed_waiting = landed
        self._busy_until = self._now
        self._send()
        self._compute_ready()

    def _host_compute(self, missing: list[ExpertId], n_landed: int) -> set[ExpertId]:
        """The cost model's choice for this gate's misses; the host ones are started (one after another on the
        host) and measured. Returns them."""
        model = self.host_model
        if model is None or not missing:
            return set()
        nbytes = self.profile.expert_nbytes
        remaining, backlog_nbytes = link_queue(self.cache, missing, nbytes)
        misses = [Miss(e, nbytes, remaining.get(e)) for e in missing]
        decisions = model.decide(misses, link_backlog_nbytes=backlog_nbytes, device_backlog_experts=n_landed,
                                 host_backlog_ms=max(0.0, self._host_free - self._now))
        host = {ExpertId(d.expert) for d in decisions if d.choice is Choice.HOST}
        for d in sorted(decisions, key=lambda d: d.expert):
            if d.choice is Choice.HOST:
                duration_ms = self.profile.host.expert_ms(nbytes)
                self._host_free = max(self._now, self._host_free) + duration_ms
                self._host_done = max(self._host_done, self._host_free)
                model.observe_host(1, duration_ms)
                self.result.host_experts += 1
                self.result.host_ms += duration_ms
                self.result.host_predicted_ms += d.cost_ms or 0.0
        return host

    # ------------------------------------------------------------ driving
    def run(self, experts: np.ndarray, prompt_offsets: Sequence[int]) -> ReplayResult:
        """Replay ``experts [N, L, k]`` (local ids), prompt by prompt (a prompt is one request; its tokens are
        decode steps), on one cache that persists across prompts."""
        p = self.profile
        self._expert_ms = p.routed_fraction * p.compute_ms / experts.shape[2]
        self._after_ms = (1 - p.gate_fraction - p.routed_fraction) * p.compute_ms
        gate_ms = p.gate_fraction * p.compute_ms
        base = np.arange(self.n_layers, dtype=np.int64)[:, None] * self.experts_per_layer
        now = 0.0
        for request, (first, last) in enumerate(itertools.pairwise(prompt_offsets)):
            self.cache.begin_request(RequestId(request + 1))
            for t in range(first, last):
                chosen = (experts[t].astype(np.int64) + base).tolist()  # [L][k] global ids
                for layer in range(self.n_layers):
                    start = now
                    if self.predict is not None:  # made from this layer's gate decision: known at the gate
                        self._prediction(t, t - first, layer, start + gate_ms)
                    if self.outlook is not None:  # made at this gate for the same layer one token on
                        self._at(start + gate_ms + p.predictor_ms, _OUTLOOK,
                                 (t - first + 1, layer, self.outlook(t, layer)))
                    self._at(start + gate_ms, _GATE, (t - first, layer,
                                                      [ExpertId(e) for e in dict.fromkeys(chosen[layer])]))
                    now = self._run_until_layer_done()
                    self.result.stall_ms += (now - start) - p.compute_ms
                self.result.tokens += 1
            self.cache.end_request()
            self._send()
        counters = self.cache.counters
        self.result.time_ms = now
        self.result.predicted = counters.predicted
        self.result.predicted_chosen = counters.predicted_chosen
        self.result.predicted_ready = counters.predicted_ready
        self.table.close()
        return self.result

    def _prediction(self, t: int, step: int, layer: int, known_ms: float) -> None:
        assert self.predict is not None
        for distance in sorted(self.lookahead, reverse=True):  # a nearer prediction of a target comes later
            target = layer + distance
            target_step, target_layer = step + target // self.n_layers, target % self.n_layers
            local, probabilities = self.predict(t, layer, distance)
            experts = [self.layout.expert_id(target_layer, int(e)) for e in local]
            self._at(known_ms + self.profile.predictor_ms, _PREDICT,
                     (target_step, target_layer, experts, probabilities))
