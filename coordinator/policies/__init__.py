"""Cache replacement policies, one file each. A policy ranks the resident experts for eviction; the cache directory
(``coordinator.cache``) decides which of them may be evicted right now (not pinned, not loading, not protected by a
prediction) and asks the policy for the first of those.

- ``ondemand`` (``ondemand.py``): nothing is kept; every layer loads what its gate chose.
- ``lru`` (``lru.py``): one global LRU over all cache slots; a use is a gate choosing the expert.
- ``lfu`` (``lfu.py``): the least frequently chosen goes first (ties: least recently used), after seeds/003.
- ``promoe`` (``promoe.py``): LRU in which a prefetch counts as a use, plus prediction-driven prefetching (the only
  policy that prefetches); a prefetched expert that its layer's gate then did not choose goes first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from coordinator.policies.lfu import LfuPolicy
from coordinator.policies.lru import LruPolicy
from coordinator.policies.ondemand import OnDemandPolicy
from coordinator.policies.promoe import PromoePolicy
from protocol.ids import ExpertId

__all__ = ["POLICIES", "CachePolicy", "LfuPolicy", "LruPolicy", "OnDemandPolicy", "PromoePolicy", "make_policy"]


class CachePolicy(Protocol):
    name: str
    keeps_experts: bool
    """False for ``ondemand``: experts not chosen by the current gate are released at once."""
    prefetches: bool
    """True if predictions turn into speculative loads."""

    def record_use(self, experts: list[ExpertId]) -> None:
        """A gate chose ``experts`` (resident or not)."""

    def record_load(self, expert: ExpertId) -> None:
        """``expert`` became resident: its load completed."""

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        """The gate of the layer ``expert`` was prefetched for did not choose it."""

    def record_evict(self, expert: ExpertId) -> None:
        """``expert`` is no longer resident."""

    def victim(self, allowed: Callable[[ExpertId], bool]) -> ExpertId | None:
        """The resident expert to evict first among those ``allowed``; None if none is allowed."""


POLICIES: dict[str, type] = {"ondemand": OnDemandPolicy, "lru": LruPolicy, "lfu": LfuPolicy, "promoe": PromoePolicy}


def make_policy(name: str) -> CachePolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
    policy: CachePolicy = POLICIES[name]()
    return policy
