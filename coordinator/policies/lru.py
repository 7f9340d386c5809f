"""``lru``: one global LRU over all cache slots (not per layer). A use is a gate choosing the expert; an expert loaded
without ever having been chosen counts as used when it lands. The least recently used evictable expert goes first."""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from coordinator.policies.ranking import Ranking
from protocol.ids import ExpertId
from shm.layout import ExpertLayout


class LruPolicy:
    name = "lru"
    keeps_experts = True
    prefetches = False

    def __init__(self, layout: ExpertLayout | None = None) -> None:
        self._clock = 0
        self._last_use: dict[ExpertId, int] = {}
        """Clock of each expert's last use, resident or not."""
        self._resident = Ranking()

    def _touch(self, expert: ExpertId) -> None:
        self._clock += 1
        self._last_use[expert] = self._clock
        if expert in self._resident:
            self._resident.set(expert, self._key(expert))

    def _key(self, expert: ExpertId) -> object:
        return self._last_use.get(expert, 0)

    def record_use(self, experts: list[ExpertId], position: tuple[int, int] = (0, 0),
                   host: Collection[ExpertId] = ()) -> None:
        for expert in experts:
            self._touch(expert)

    def record_load(self, expert: ExpertId) -> None:
        if expert not in self._last_use:
            self._touch(expert)
        self._resident.set(expert, self._key(expert))

    def record_outlook(self, target: tuple[int, int], probabilities: np.ndarray) -> None:
        pass  # ranks by the past only

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        pass

    def record_evict(self, expert: ExpertId) -> None:
        self._resident.discard(expert)

    def record_prediction(self, target: tuple[int, int], experts: list[ExpertId],
                          probabilities: list[float] | None) -> None:
        pass

    def admits(self, expert: ExpertId, target: tuple[int, int], loads_in_flight: int) -> bool:
        return False  # never asked: this policy does not prefetch

    def victim(self, allowed: Callable[[ExpertId], bool],
               incoming: tuple[ExpertId, tuple[int, int]] | None = None) -> ExpertId | None:
        return self._resident.first(allowed)
