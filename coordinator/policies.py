"""Cache replacement policies. A policy ranks eviction candidates; the cache directory decides what may be evicted.

- ``ondemand``: nothing is kept: when a layer's gate reports, every other expert that is resident and not in use
  is released, so each layer loads what it needs.
- ``lru``: one global LRU over all cache slots (not per layer): a use is a gate choosing the expert; the least
  recently used candidate is evicted.
"""

from __future__ import annotations

from typing import Protocol

from protocol.ids import ExpertId


class CachePolicy(Protocol):
    name: str
    keeps_experts: bool
    """False for ``ondemand``: experts not chosen by the current gate are released at once."""

    def record_use(self, experts: list[ExpertId]) -> None: ...

    def record_load(self, expert: ExpertId) -> None: ...

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId: ...


class OnDemandPolicy:
    name = "ondemand"
    keeps_experts = False

    def record_use(self, experts: list[ExpertId]) -> None:
        pass

    def record_load(self, expert: ExpertId) -> None:
        pass

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId:
        return candidates[0]


class LruPolicy:
    name = "lru"
    keeps_experts = True

    def __init__(self) -> None:
        self._clock = 0
        self._last_use: dict[ExpertId, int] = {}

    def _touch(self, expert: ExpertId) -> None:
        self._clock += 1
        self._last_use[expert] = self._clock

    def record_use(self, experts: list[ExpertId]) -> None:
        for expert in experts:
            self._touch(expert)

    def record_load(self, expert: ExpertId) -> None:
        if expert not in self._last_use:
            self._touch(expert)

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId:
        return min(candidates, key=lambda e: self._last_use.get(e, 0))


def make_policy(name: str) -> CachePolicy:
    policies: dict[str, type] = {"ondemand": OnDemandPolicy, "lru": LruPolicy}
    if name not in policies:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(policies)})")
    policy: CachePolicy = policies[name]()
    return policy
