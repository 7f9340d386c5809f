"""Cache replacement policies, one file each. A policy ranks the resident experts for eviction; the cache directory
(``coordinator.cache``) decides which of them may be evicted right now (not pinned, not loading, not protected by a
prediction) and asks the policy for the first of those.

- ``ondemand`` (``ondemand.py``): nothing is kept; every layer loads what its gate chose.
- ``lru`` (``lru.py``): one global LRU over all cache slots; a use is a gate choosing the expert.
- ``lfu`` (``lfu.py``): the least frequently chosen goes first (ties: least recently used), after seeds/003.
- ``promoe`` (``promoe.py``): prediction-driven prefetching (the only policy that prefetches) and prediction-aware
  eviction: the expert expected to be used last goes first (an approximation of Belady's optimum), and a guess is
  loaded only if it is expected sooner than what it would evict.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import numpy as np

from coordinator.policies.lfu import LfuPolicy
from coordinator.policies.lru import LruPolicy
from coordinator.policies.ondemand import OnDemandPolicy
from coordinator.policies.promoe import PromoePolicy
from protocol.ids import ExpertId
from shm.layout import ExpertLayout

__all__ = ["POLICIES", "CachePolicy", "LfuPolicy", "LruPolicy", "OnDemandPolicy", "PromoePolicy", "make_policy"]


class CachePolicy(Protocol):
    name: str
    keeps_experts: bool
    """False for ``ondemand``: experts not chosen by the current gate are released at once."""
    prefetches: bool
    """True if predictions turn into speculative loads."""

    def record_use(self, experts: list[ExpertId], position: tuple[int, int],
                   host: Collection[ExpertId] = ()) -> None:
        """The gate at ``position`` (step, MoE layer) chose ``experts`` (resident or not); ``host``: those of them
        computed on the host instead of loaded (host compute)."""

    def record_prediction(self, target: tuple[int, int], experts: list[ExpertId],
                          probabilities: list[float] | None) -> None:
        """The predictor expects ``experts`` at ``target`` (with these probabilities, if it gave them)."""

    def record_outlook(self, target: tuple[int, int], probabilities: np.ndarray) -> None:
        """The predictor's ``probabilities [E]`` that the gate at ``target`` chooses each expert of its layer (every
        expert, not a top-k: an eviction estimate, never a reason to load)."""

    def record_load(self, expert: ExpertId) -> None:
        """``expert`` became resident: its load completed."""

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        """The gate of the layer ``expert`` was prefetched for did not choose it."""

    def record_evict(self, expert: ExpertId) -> None:
        """``expert`` is no longer resident."""

    def admits(self, expert: ExpertId, target: tuple[int, int], loads_in_flight: int) -> bool:
        """Whether a speculative load of ``expert`` for ``target`` is worth link time, with ``loads_in_flight`` loads
        issued and not yet landed (prefetching policies only)."""

    def victim(self, allowed: Callable[[ExpertId], bool],
               incoming: tuple[ExpertId, tuple[int, int]] | None = None) -> ExpertId | None:
        """The resident expert to evict first among those ``allowed``; None if none is allowed. With ``incoming``
        (a speculative load of that expert for that position), None also if nothing allowed is worth less."""


POLICIES: dict[str, type] = {"ondemand": OnDemandPolicy, "lru": LruPolicy, "lfu": LfuPolicy, "promoe": PromoePolicy}


def make_policy(name: str, layout: ExpertLayout) -> CachePolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
    policy: CachePolicy = POLICIES[name](layout)
    return policy
