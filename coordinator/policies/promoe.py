"""``promoe``: prediction-driven prefetching (the only policy that prefetches) with prediction-aware eviction, an
approximation of Belady's optimal replacement.

Belady evicts the expert whose next use is farthest away. This policy estimates, for every resident expert, when it
will next be used, in MoE-layer steps on a clock that advances by one at every gate (``L`` per token):

    eta = next_gate + (1 - p_next) * L / p_later

where ``next_gate`` is the clock at the next gate of the expert's layer, ``p_next`` the probability that this gate
chooses it (the predictor's, if it predicted that position, as a top-k prediction or as an outlook over every expert
of the layer; else the reuse model's, ``coordinator.policies.reuse``)
and ``p_later`` the reuse model's probability per later token (a geometric wait). The expert with the largest
``eta`` goes first. An expert's ``eta`` changes only when its layer's gate passes, when it is predicted, and when
the reuse model's view of it changes at a token boundary; it is recomputed then (vectorised), and finding a victim
is an argmax over the resident experts' estimates.

A prediction becomes a speculative load only if the predicted expert is expected sooner than the expert it would
evict: speculation never pushes out something worth more than the guess, so a wrong guess costs at most link time
the precise loads did not need. Without probabilities from the predictor, a prediction counts with the measured
share of predictions the gates confirmed.

While the host computes misses (host compute, ``coordinator/host_compute.py``), a miss no longer has to wait for
the link, so a right guess saves less and a wrong one takes the link from the misses the cost model sent there:
guesses then only fill a link that is nearly idle (``admits``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from coordinator.policies.reuse import WINDOW_TOKENS, ReuseModel
from protocol.ids import ExpertId
from shm.layout import ExpertLayout

Position = tuple[int, int]
MIN_PROBABILITY = 1e-4


class PromoePolicy:
    name = "promoe"
    keeps_experts = True
    prefetches = True

    def __init__(self, layout: ExpertLayout) -> None:
        self.n_layers = len(layout.moe_layers)
        self.experts_per_layer = layout.experts_per_layer
        self.top_k = layout.top_k
        self.reuse = ReuseModel(layout.n_experts, layout.experts_per_layer, layout.top_k)
        self.position: Position = (-1, -1)
        self.layer = -1
        """MoE layer of the last gate (within the current token)."""
        self._resident = np.zeros(layout.n_experts, dtype=bool)  # [n_experts]
        self._eta = np.full(layout.n_experts, -np.inf)  # [n_experts]
        """Expected next use of each resident expert (gate clock); -inf for the others. The largest goes first."""
        self._predicted: dict[Position, dict[ExpertId, float]] = {}
        self._outlook = np.zeros(layout.n_experts)  # [n_experts]
        self._outlook_step = np.full(self.n_layers, -1)  # [L] the step each layer's outlook is about
        self._confirmed = 1.0
        self._judged = 2.0
        """Predictions whose gate reported, and how many of them it chose (prior: one in two)."""
        self._host_clock = -np.inf
        """Gate clock of the last gate that had a miss computed on the host."""

    @property
    def precision(self) -> float:
        """Share of predicted experts that their gate chose, so far."""
        return self._confirmed / self._judged

    # ------------------------------------------------------------ events
    def record_use(self, experts: list[ExpertId], position: Position, host: Collection[ExpertId] = ()) -> None:
        new_token = position[0] != self.position[0] or position < self.position
        if position < self.position:  # a new request: what was predicted for the last one is void
            self._predicted.clear()
            self._outlook_step[:] = -1
        if new_token:
            self.reuse.next_token()
        self.position, self.layer = position, position[1]
        if host:
            self._host_clock = self._clock(self.reuse.token, self.layer)
        predicted = self._predicted.pop(position, None)
        for target in [p for p in self._predicted if p < position]:
            del self._predicted[target]
        if predicted:
            self._judged += len(predicted)
            self._confirmed += len(predicted.keys() & set(experts))
        self.reuse.observe(position[1], list(experts))
        if new_token and self.reuse.token % WINDOW_TOKENS == 0:
            self._rerank(np.flatnonzero(self._resident))  # the reuse model has learned: refresh every estimate
        else:  # this layer's experts now wait for the next token; recent counts moved at a token boundary
            first = position[1] * self.experts_per_layer
            layer = np.arange(first, first + self.experts_per_layer)
            changed = self.reuse.changed_recent if new_token else np.empty(0, dtype=np.int64)
            self._rerank(np.union1d(layer, changed))

    def record_prediction(self, target: Position, experts: list[ExpertId], probabilities: list[float] | None) -> None:
        if probabilities is None:
            probabilities = [self.precision] * len(experts)
        self._predicted[target] = dict(zip(experts, probabilities, strict=True))
        self._rerank(np.unique(np.array(experts, dtype=np.int64)))

    def record_outlook(self, target: Position, probabilities: np.ndarray) -> None:
        step, layer = target
        first = layer * self.experts_per_layer
        self._outlook[first: first + self.experts_per_layer] = probabilities
        self._outlook_step[layer] = step
        self._rerank(np.arange(first, first + self.experts_per_layer))

    def record_load(self, expert: ExpertId) -> None:
        self._resident[expert] = True
        self._rerank(np.array([expert], dtype=np.int64))

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        pass  # never used since: the reuse model already ranks it by its last real use

    def record_evict(self, expert: ExpertId) -> None:
        self._resident[expert] = False
        self._eta[expert] = -np.inf

    # ------------------------------------------------------------ decisions
    def admits(self, expert: ExpertId, target: Position, loads_in_flight: int) -> bool:
        """A guess is worth link time only if it is likely enough for how busy the link is: with ``n`` loads in
        flight it must be right with probability at least ``n / (n + top_k / 2)`` (0 on an idle link, 1/2 with
        half a gate's worth of loads queued), since a wrong one takes link time from loads that are needed. (The
        constant is measured, not derived: on the DeepSeek trace a stricter rule helps when the link dominates and
        hurts when compute does; ``bench/replay.py``.)

        While the host computes misses (one did within the last token's gates), a guess is loaded only onto a
        nearly idle link: fewer than ``top_k / 3`` loads in flight (measured on the same trace, README "Host compute
        in replay": on the link-bound profile any speculation beyond that costs more than it hides; on the balanced
        one it hides as much as unthrottled speculation)."""
        n = loads_in_flight
        if self._clock(self.reuse.token, self.layer) - self._host_clock <= self.n_layers and n >= self.top_k / 3:
            return False
        q = self._predicted.get(target, {}).get(expert, self.precision)
        return q >= n / (n + self.top_k / 2)

    def victim(self, allowed: Callable[[ExpertId], bool],
               incoming: tuple[ExpertId, Position] | None = None) -> ExpertId | None:
        """The allowed resident expert expected to be used last; with ``incoming`` (a speculative load of that
        expert for that position), only one expected later than the incoming expert."""
        found, eta = self._first(allowed)
        if found is None or incoming is None:
            return found
        expert, target = incoming
        q = self._predicted.get(target, {}).get(expert, self.precision)
        at_token = np.array([self.reuse.token + target[0] - self.position[0]])
        p_later = max(float(self.reuse.probability(np.array([expert]), at_token + 1)[0]), MIN_PROBABILITY)
        incoming_eta = self._clock(at_token[0], target[1]) + (1.0 - q) * self.n_layers / p_later
        return found if eta > incoming_eta else None

    def _first(self, allowed: Callable[[ExpertId], bool]) -> tuple[ExpertId | None, float]:
        """The allowed resident expert with the largest ``eta`` (ties: the lowest id), and its ``eta``."""
        eta = self._eta
        skipped: list[tuple[int, float]] = []
        found: tuple[ExpertId | None, float] = (None, -np.inf)
        while True:
            i = int(eta.argmax())
            value = float(eta[i])
            if value == -np.inf:
                break
            if allowed(ExpertId(i)):
                found = (ExpertId(i), value)
                break
            skipped.append((i, value))  # pinned, loading or protected: look further, then put it back
            eta[i] = -np.inf
        for i, value in skipped:
            eta[i] = value
        return found

    # ------------------------------------------------------------ estimates
    def _clock(self, token: int, layer: int) -> float:
        return float(token * self.n_layers + layer)

    def _rerank(self, experts: np.ndarray) -> None:
        """Recompute ``eta`` of the resident ones among ``experts`` (sorted, unique)."""
        experts = experts[self._resident[experts]]
        if not len(experts):
            return
        target_layer = experts // self.experts_per_layer  # [R]
        later = target_layer > self.layer
        at_token = self.reuse.token + (~later)  # [R] the token of the next gate of each one's layer
        p_next = self.reuse.probability(experts, at_token)
        p_later = np.maximum(self.reuse.probability(experts, at_token + 1), MIN_PROBABILITY)
        next_step = self.position[0] + (~later)  # [R] the step of that gate
        told = self._outlook_step[target_layer] == next_step  # the predictor's outlook is about that gate
        p_next[told] = self._outlook[experts[told]]
        for (step, layer), predicted in self._predicted.items():  # the predictor's word for a gate it predicted
            wanted = self.position[0] + int(layer <= self.layer)
            if step != wanted:
                continue  # not the next gate of that layer
            ids = np.fromiter(predicted, dtype=np.int64, count=len(predicted))
            where = np.minimum(np.searchsorted(experts, ids), len(experts) - 1)
            hit = experts[where] == ids
            p_next[where[hit]] = np.fromiter(predicted.values(), dtype=np.float64, count=len(predicted))[hit]
        self._eta[experts] = at_token * self.n_layers + target_layer + (1.0 - p_next) * self.n_layers / p_later
