"""Belady's optimal replacement (it knows the future): the fewest misses any cache of ``capacity`` experts can have on
a routing trace, and so the floor of DESIGN.md section 7 (``max(t_all_resident, B / W)``).

An access is one gate: the set of experts a layer needs at once. A miss evicts the resident expert whose next use is
farthest away, never one of the set being served. O(log n) per access (a lazy max-heap of next uses).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

NEVER = 1 << 62


def belady_misses(accesses: Sequence[Sequence[int]], capacity: int) -> int:
    """Misses of the optimal replacement over ``accesses`` (each the experts one gate chose) with ``capacity`` slots."""
    if capacity < max((len(set(a)) for a in accesses), default=0):
        raise ValueError(f"a cache of {capacity} experts cannot hold one gate's experts")
    next_use: list[list[int]] = [[] for _ in accesses]  # per access, the next use of each of its experts
    upcoming: dict[int, int] = {}
    for t in range(len(accesses) - 1, -1, -1):
        experts = list(dict.fromkeys(accesses[t]))
        next_use[t] = [upcoming.get(e, NEVER) for e in experts]
        for e in experts:
            upcoming[e] = t
    cached: dict[int, int] = {}  # expert -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, expert), lazy
    misses = 0
    for t, access in enumerate(accesses):
        experts = list(dict.fromkeys(access))
        now = set(experts)
        for e in experts:
            if e in cached:
                continue
            misses += 1
            if len(cached) >= capacity:
                kept = []
                while True:
                    neg, victim = heapq.heappop(heap)
                    if cached.get(victim) != -neg:
                        continue  # stale
                    if victim in now:
                        kept.append((neg, victim))
                        continue
                    del cached[victim]
                    break
                for entry in kept:
                    heapq.heappush(heap, entry)
            cached[e] = -1  # placeholder until its next use is set below
        for e, nxt in zip(experts, next_use[t], strict=True):
            cached[e] = nxt
            heapq.heappush(heap, (-nxt, e))
    return misses
