"""The slot table: which expert is in which cache slot and how many of its chunks have landed.

It is how readiness reaches the inference worker with no round trip. Every word has one writer:

- the coordinator writes ``slot_expert``, ``slot_seq`` and ``expert_slot`` (it owns the cache directory) and
  ``waiting_for_slot``; whether a slot is free, loading or resident is the coordinator's alone and stays in its
  process (``coordinator.cache``);
- the loader writes ``slot_loaded`` after a chunk's copy has completed: the sequence number of the load it serves
  and that load's landed chunk count, packed in one 64-bit word (``pack_loaded``) and written in one store;
- the inference worker writes ``expert_pin`` (set when its gate chose the expert, cleared once computed; all
  cleared when a request ends, before its result is sent, and when a worker starts, before it reports ready, so that
  a predecessor that died mid-request leaves none behind). The coordinator only reads the pins.

A slot's ready count is the count in ``slot_loaded`` if the sequence number packed with it is the slot's current
``slot_seq``, else 0. So readiness cannot be published into a slot's next owner: a load that the coordinator
reassigned between the loader's check and its store publishes a count tagged with the old sequence number, which no
reader takes for the new load's (a check-then-store of a bare count could, and a restarted loader was then re-issued
the new load from a wrong first chunk). The coordinator never writes ``slot_loaded`` and needs no reset on reassign.

Reading an expert is optimistic (a seqlock): read ``slot_seq``, check the expert and that every chunk is ready,
compute, then read ``slot_seq`` again; a slot is reassigned (and its sequence bumped) before any copy into it
starts, so an unchanged sequence proves the computation read a whole, stable expert. All fields are 8-byte
aligned int64, so single stores are atomic. There are no fences: ordering relies on x86-64 (stores seen in
program order, loads done in program order), see ``shm/ordering.py``; the runtime refuses to start on other CPUs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from protocol.ids import ExpertId, SlotId
from shm.segment import Segment

_MAGIC = 0x70726F6D6F65  # "promoe"
_HEADER = 8

READY_BITS = 16
"""Low bits of a ``slot_loaded`` word: the chunk count (at most 65535 chunks per expert)."""
_READY_MASK = (1 << READY_BITS) - 1
SEQ_MASK = (1 << (63 - READY_BITS)) - 1
"""The sequence number is packed modulo 2**47 (the word stays a non-negative int64)."""


def pack_loaded(seq: int, chunks_ready: int) -> int:
    """One ``slot_loaded`` word: ``chunks_ready`` chunks of the load with sequence number ``seq`` have landed."""
    return ((seq & SEQ_MASK) << READY_BITS) | chunks_ready


def unpack_loaded(word: int) -> tuple[int, int]:
    """``(seq modulo 2**47, chunks_ready)`` of a ``slot_loaded`` word."""
    return word >> READY_BITS, word & _READY_MASK


def ready_for(word: int, seq: int) -> int:
    """Chunks ready for the load with sequence number ``seq``, given the slot's ``slot_loaded`` word."""
    tag, chunks = unpack_loaded(word)
    return chunks if tag == seq & SEQ_MASK else 0


class SlotView(NamedTuple):
    slot: SlotId
    seq: int
    chunks_ready: int


class SlotTable:
    def __init__(self, segment: Segment, n_slots: int, n_experts: int, n_chunks: int, *, init: bool) -> None:
        if not 0 < n_chunks <= _READY_MASK:
            raise ValueError(f"{n_chunks} chunks per expert do not fit the {READY_BITS}-bit ready count")
        need = self.nbytes_for(n_slots, n_experts)
        if segment.nbytes < need:
            raise ValueError(f"segment {segment.name} holds {segment.nbytes} bytes, table needs {need}")
        self.segment = segment
        self.n_slots = n_slots
        self.n_experts = n_experts
        self.n_chunks = n_chunks
        words = np.frombuffer(segment.buf, dtype=np.int64, count=need // 8)
        self._header = words[:_HEADER]
        cursor = _HEADER
        self.slot_expert = words[cursor : cursor + n_slots]
        cursor += n_slots
        self.slot_seq = words[cursor : cursor + n_slots]
        cursor += n_slots
        self.slot_loaded = words[cursor : cursor + n_slots]
        """The loader's word per slot: ``pack_loaded(seq, chunks_ready)`` of the last load it published."""
        cursor += n_slots
        self.expert_slot = words[cursor : cursor + n_experts]
        cursor += n_experts
        self.expert_pin = words[cursor : cursor + n_experts]
        if init:
            words[:] = 0
            self.slot_expert[:] = -1
            self.expert_slot[:] = -1
            self._header[1] = n_slots
            self._header[2] = n_experts
            self._header[0] = _MAGIC
        elif self._header[0] != _MAGIC or self._header[1] != n_slots or self._header[2] != n_experts:
            raise ValueError(f"segment {segment.name} is not a slot table of {n_slots} slots / {n_experts} experts")

    @staticmethod
    def nbytes_for(n_slots: int, n_experts: int) -> int:
        return 8 * (_HEADER + 3 * n_slots + 2 * n_experts)

    # ------------------------------------------------------------ coordinator side
    def assign(self, slot: SlotId, expert: ExpertId) -> int:
        """Give ``slot`` to ``expert`` (no chunk ready); returns the new sequence number."""
        self._invalidate(slot, expert)
        self.expert_slot[expert] = slot
        return int(self.slot_seq[slot])

    def _invalidate(self, slot: SlotId, expert: int) -> None:
        """Change the owner, then bump the sequence number, in that order: a reader that saw the old number fails
        validation; one that sees the new number also sees the new owner, and no ready chunk (``slot_loaded`` is
        tagged with an older number until the loader publishes for the new load).
        x86 ordering relied on: these stores become visible in this order (no fence; shm/ordering.py)."""
        old = int(self.slot_expert[slot])
        if old >= 0 and self.expert_slot[old] == slot:
            self.expert_slot[old] = -1
        self.slot_expert[slot] = expert
        self.slot_seq[slot] += 1

    def release(self, slot: SlotId) -> None:
        """Empty ``slot`` (its expert is no longer cached)."""
        self._invalidate(slot, -1)

    def is_current(self, slot: SlotId, seq: int) -> bool:
        """Whether ``seq`` is still the sequence number of ``slot``'s load (not reassigned since)."""
        return int(self.slot_seq[slot]) == seq

    def chunks_ready(self, slot: SlotId, seq: int | None = None) -> int:
        """Chunks that have landed of the load with ``seq`` in ``slot`` (default: the slot's current load)."""
        if seq is None:
            seq = int(self.slot_seq[slot])
        return ready_for(int(self.slot_loaded[slot]), seq)

    def is_pinned(self, expert: ExpertId) -> bool:
        return bool(self.expert_pin[expert])

    @property
    def waiting_for_slot(self) -> bool:
        """Set by the coordinator while a load waits for a slot that only a release can free."""
        return bool(self._header[3])

    @waiting_for_slot.setter
    def waiting_for_slot(self, value: bool) -> None:
        self._header[3] = int(value)

    @property
    def store_filled(self) -> bool:
        """Set by the loader once the host store holds every expert: a restarted loader does not read it again."""
        return bool(self._header[4])

    @store_filled.setter
    def store_filled(self, value: bool) -> None:
        self._header[4] = int(value)

    # ------------------------------------------------------------ loader side
    def publish_ready(self, slot: SlotId, seq: int, chunks_ready: int) -> bool:
        """Record that ``chunks_ready`` chunks of the load with ``seq`` are in ``slot``; False if reassigned.

        The count and ``seq`` go out in one store, so the check before it only spares a store that no reader would
        take: if the slot is reassigned between the two, the count still belongs to ``seq`` alone. The loader alone
        calls this, in the order its copies complete (one stream), so a load's count never overwrites that of a
        later load of the same slot. x86 ordering relied on: the chunk's bytes, stored (and completed) before,
        are visible before this word."""
        if not 0 <= chunks_ready <= self.n_chunks:
            raise ValueError(f"{chunks_ready} chunks ready of {self.n_chunks}")
        if self.slot_seq[slot] != seq:
            return False
        self.slot_loaded[slot] = pack_loaded(seq, chunks_ready)
        return True

    # ------------------------------------------------------------ inference side
    def lookup(self, expert: ExpertId) -> SlotView | None:
        """Where ``expert`` is and how many chunks are ready, or None if it has no slot. x86 ordering relied on:
        ``slot_seq`` is loaded before the owner and the readiness, and those before the slot's bytes."""
        slot = int(self.expert_slot[expert])
        if slot < 0:
            return None
        seq = int(self.slot_seq[slot])
        if self.slot_expert[slot] != expert:
            return None
        return SlotView(SlotId(slot), seq, ready_for(int(self.slot_loaded[slot]), seq))

    def is_ready(self, view: SlotView | None) -> bool:
        return view is not None and view.chunks_ready >= self.n_chunks

    def ready_experts(self, first: ExpertId, count: int) -> list[ExpertId]:
        """The experts ``first .. first+count-1`` that are in a slot with every chunk landed (one vectorised read)."""
        experts = np.arange(first, first + count)
        slots = self.expert_slot[first : first + count]  # [count]
        placed = slots >= 0
        ready = np.zeros(count, dtype=bool)
        held = slots[placed]
        seqs = self.slot_seq[held] & SEQ_MASK  # read before the loaded words, as in ``lookup``
        loaded = self.slot_loaded[held]
        ready[placed] = (((loaded >> READY_BITS) == seqs) & ((loaded & _READY_MASK) >= self.n_chunks)
                         & (self.slot_expert[held] == experts[placed]))
        return [ExpertId(int(e)) for e in experts[ready]]

    def still_valid(self, view: SlotView) -> bool:
        """True if the slot was not reassigned since ``view`` was read."""
        return int(self.slot_seq[view.slot]) == view.seq

    def pin(self, experts: list[ExpertId] | np.ndarray) -> None:
        self.expert_pin[experts] = 1

    def unpin(self, expert: ExpertId) -> None:
        self.expert_pin[expert] = 0

    def clear_pins(self) -> None:
        """Unpin every expert (a request has ended, or a worker starts)."""
        self.expert_pin[:] = 0

    def close(self) -> None:
        del self._header, self.slot_expert, self.slot_seq, self.slot_loaded
        del self.expert_slot, self.expert_pin
        self.segment.close()
