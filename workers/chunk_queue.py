"""The loader's queue: loads in two priority classes, served one chunk at a time.

The chunk is the unit of work: between two chunks the loader reads its inbox, so an urgent load waits at most one
chunk, ``Preempt`` drops the chunks of a load that have not been copied yet, and ``Reorder`` moves loads to the
front of the queue (making them precise).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from protocol.ids import ExpertId, LoadId, SlotId
from protocol.messages import PRIORITY_PRECISE, PRIORITY_SPECULATIVE, LoadExpert


@dataclass
class QueuedLoad:
    load_id: LoadId
    expert: ExpertId
    slot: SlotId
    seq: int
    priority: int
    next_chunk: int
    """Next chunk to copy; chunks before it have been handed out."""
    n_chunks: int

    @classmethod
    def from_message(cls, msg: LoadExpert, n_chunks: int) -> QueuedLoad:
        if msg.priority not in (PRIORITY_PRECISE, PRIORITY_SPECULATIVE):
            raise ValueError(f"load {msg.load_id}: unknown priority {msg.priority}")
        if not 0 <= msg.first_chunk < n_chunks:
            raise ValueError(f"load {msg.load_id}: first chunk {msg.first_chunk} outside 0..{n_chunks - 1}")
        return cls(msg.load_id, msg.expert, msg.slot, msg.seq, msg.priority, msg.first_chunk, n_chunks)


class ChunkQueue:
    def __init__(self) -> None:
        self._classes: dict[int, deque[QueuedLoad]] = {PRIORITY_PRECISE: deque(), PRIORITY_SPECULATIVE: deque()}
        self._queued: dict[LoadId, QueuedLoad] = {}

    def push(self, load: QueuedLoad) -> None:
        if load.load_id in self._queued:
            raise ValueError(f"load {load.load_id} is already queued")
        self._classes[load.priority].append(load)
        self._queued[load.load_id] = load

    def holds(self, load_id: LoadId) -> bool:
        return load_id in self._queued

    def pop_chunk(self) -> tuple[QueuedLoad, int] | None:
        """The next chunk to copy: the head load of the most urgent non-empty class."""
        for priority in (PRIORITY_PRECISE, PRIORITY_SPECULATIVE):
            loads = self._classes[priority]
            if loads:
                load = loads[0]
                chunk = load.next_chunk
                load.next_chunk += 1
                if load.next_chunk == load.n_chunks:
                    loads.popleft()
                    del self._queued[load.load_id]
                return load, chunk
        return None

    def preempt(self, load_ids: list[LoadId]) -> list[tuple[LoadId, int]]:
        """Drop the queued chunks of ``load_ids``; returns ``(load_id, chunks already handed out)`` per dropped load.

        Loads whose every chunk was already handed out (or that are unknown) are not in the result: they complete.
        """
        dropped = []
        for load_id in load_ids:
            load = self._queued.pop(load_id, None)
            if load is not None:
                self._classes[load.priority].remove(load)
                dropped.append((load_id, load.next_chunk))
        return dropped

    def reorder(self, load_ids: list[LoadId]) -> None:
        """Make the queued ``load_ids`` precise and move them to the very front, keeping the given order.

        This is how a speculative load that the gate has just confirmed becomes urgent (early preemption).
        """
        for load_id in reversed(load_ids):
            load = self._queued.get(load_id)
            if load is not None:
                self._classes[load.priority].remove(load)
                load.priority = PRIORITY_PRECISE
                self._classes[PRIORITY_PRECISE].appendleft(load)

    def queued_load_ids(self) -> list[LoadId]:
        """Queued loads in service order (for tests and stats)."""
        return [load.load_id for p in (PRIORITY_PRECISE, PRIORITY_SPECULATIVE) for load in self._classes[p]]

    def __len__(self) -> int:
        """Chunks still to copy."""
        return sum(load.n_chunks - load.next_chunk for load in self._queued.values())
