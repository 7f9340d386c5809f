"""``lfu``: the least frequently chosen evictable expert goes first, ties by least recent use (after seeds/003).
Frequencies count every gate choice since start, resident or not; a load is not a use."""

from __future__ import annotations

from collections.abc import Collection

from coordinator.policies.lru import LruPolicy
from protocol.ids import ExpertId
from shm.layout import ExpertLayout


class LfuPolicy(LruPolicy):
    name = "lfu"

    def __init__(self, layout: ExpertLayout | None = None) -> None:
        super().__init__(layout)
        self._uses: dict[ExpertId, int] = {}

    def record_use(self, experts: list[ExpertId], position: tuple[int, int] = (0, 0),
                   host: Collection[ExpertId] = ()) -> None:
        for expert in experts:
            self._uses[expert] = self._uses.get(expert, 0) + 1
        super().record_use(experts, position, host)

    def _key(self, expert: ExpertId) -> object:
        return (self._uses.get(expert, 0), self._last_use.get(expert, 0))
