"""Resident experts ordered by an eviction key: the data structure every keeping policy ranks with.

A lazy min-heap: changing a key pushes a new entry and leaves the old one to be skipped when it surfaces, so a use
costs O(log n) and finding a victim costs O(log n) per entry looked at (entries that may not be evicted right now,
such as pinned experts, are looked at and put back). No scan over all slots.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any

from protocol.ids import ExpertId


class Ranking:
    def __init__(self) -> None:
        self._key: dict[ExpertId, Any] = {}
        """Current key of every ranked (resident) expert; smaller keys are evicted first."""
        self._heap: list[tuple[Any, ExpertId]] = []

    def __contains__(self, expert: object) -> bool:
        return expert in self._key

    def __len__(self) -> int:
        return len(self._key)

    def __iter__(self) -> Iterator[ExpertId]:
        return iter(list(self._key))

    def key(self, expert: ExpertId) -> Any:
        return self._key[expert]

    def set(self, expert: ExpertId, key: Any) -> None:
        """Rank ``expert`` (again) under ``key``. Keys must compare with each other."""
        if self._key.get(expert) == key:
            return
        self._key[expert] = key
        heapq.heappush(self._heap, (key, expert))
        if len(self._heap) > 4 * len(self._key) + 64:
            self._heap = [(k, e) for e, k in self._key.items()]
            heapq.heapify(self._heap)

    def discard(self, expert: ExpertId) -> None:
        self._key.pop(expert, None)

    def first(self, allowed: Callable[[ExpertId], bool]) -> ExpertId | None:
        """The ranked expert with the smallest key among those ``allowed``; None if there is none."""
        looked_at: list[tuple[Any, ExpertId]] = []
        found = None
        heap = self._heap
        while heap:
            key, expert = heap[0]
            if self._key.get(expert, _GONE) != key:
                heapq.heappop(heap)  # stale: re-keyed or no longer ranked
                continue
            entry = heapq.heappop(heap)
            if allowed(expert):
                found = expert
                heapq.heappush(heap, entry)  # still ranked until the caller evicts it
                break
            looked_at.append(entry)
        for entry in looked_at:
            heapq.heappush(heap, entry)
        return found


_GONE = object()
