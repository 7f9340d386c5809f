"""``ondemand``: nothing is kept. When a layer's gate reports, the cache directory releases every resident expert the
gate did not choose and that is not in use, so each layer loads what it needs."""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from coordinator.policies.ranking import Ranking
from protocol.ids import ExpertId
from shm.layout import ExpertLayout


class OnDemandPolicy:
    name = "ondemand"
    keeps_experts = False
    prefetches = False

    def __init__(self, layout: ExpertLayout | None = None) -> None:
        self._order = 0
        self._resident = Ranking()
        """Key: arrival order (a victim is only needed within one prefill layer)."""

    def record_use(self, experts: list[ExpertId], position: tuple[int, int] = (0, 0),
                   host: Collection[ExpertId] = ()) -> None:
        pass

    def record_load(self, expert: ExpertId) -> None:
        self._order += 1
        self._resident.set(expert, self._order)

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
