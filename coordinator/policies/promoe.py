"""``promoe``: LRU in which a prefetch counts as a use (as in the ProMoE paper), plus prediction-driven prefetching
(the only policy that prefetches). The cache directory never evicts an expert predicted for the window. A prefetched
expert that the gate of its layer then did not choose loses its recency: it goes first, so that wrong guesses do not
push out experts that were really used."""

from __future__ import annotations

from coordinator.policies.lru import LruPolicy
from protocol.ids import ExpertId


class PromoePolicy(LruPolicy):
    name = "promoe"
    prefetches = True

    def record_load(self, expert: ExpertId) -> None:
        self._touch(expert)  # a prefetch counts as a use
        self._resident.set(expert, self._key(expert))

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        self._last_use[expert] = 0  # a wrong guess, never used: first to go
        if expert in self._resident:
            self._resident.set(expert, self._key(expert))
