"""The device cache slots of the CPU path: a shared region of ``n_slots`` expert buffers in the compute dtype.

On the CUDA path the slots live in the inference worker's GPU memory instead; the slot table is the same.
"""

from __future__ import annotations

import torch

from protocol.ids import SlotId
from shm.layout import DTYPES, ExpertLayout
from shm.segment import Segment


class CacheSlots:
    def __init__(self, segment: Segment, layout: ExpertLayout) -> None:
        if segment.nbytes < self.nbytes_for(layout):
            raise ValueError(f"segment {segment.name} holds {segment.nbytes} bytes, slots need more")
        self.segment = segment
        self.layout = layout
        flat = torch.frombuffer(
            segment.buf, dtype=DTYPES[layout.compute_dtype], count=layout.n_slots * layout.expert_numel
        )
        self.slots = flat.view(layout.n_slots, layout.expert_numel)  # [n_slots, 3*I*H]

    @staticmethod
    def nbytes_for(layout: ExpertLayout) -> int:
        return layout.n_slots * layout.slot_nbytes

    def chunk(self, slot: SlotId, chunk: int) -> torch.Tensor:
        lo, hi = self.layout.chunk_bounds(chunk)
        return self.slots[slot, lo:hi]

    def gate_up(self, slot: SlotId) -> torch.Tensor:
        """transformers' fused ``gate_up_proj[e]``: ``[2I, H]``, gate rows first."""
        lay = self.layout
        return self.slots[slot, : 2 * lay.intermediate_size * lay.hidden_size].view(
            2 * lay.intermediate_size, lay.hidden_size
        )

    def down(self, slot: SlotId) -> torch.Tensor:
        """``down_proj[e]``: ``[H, I]``."""
        lay = self.layout
        return self.slots[slot, 2 * lay.intermediate_size * lay.hidden_size :].view(
            lay.hidden_size, lay.intermediate_size
        )

    def close(self) -> None:
        del self.slots
        self.segment.close()
