"""The cache slots: ``n_slots`` expert buffers in the compute dtype, one row per slot (quantized experts: their
bytes as stored, dequantized into a scratch buffer of the compute dtype when computed with).

``SlotArray`` is what every user of the slots sees (chunk views for the loader, ``gate_up``/``down`` views for the
experts backend, a read fence for the inference worker). ``CacheSlots`` is the CPU path's storage, a shared
segment; on the CUDA path ``workers.gpu_slots.GpuSlots`` keeps the same rows in the inference worker's GPU memory.
The slot table is the same for both.
"""

from __future__ import annotations

import torch

from protocol.ids import SlotId
from shm import quantized
from shm.layout import ExpertLayout, torch_dtype
from shm.segment import Segment


class ReadFence:
    """Says when the computation that read a slot has finished reading it.

    On the CPU the computation is synchronous, so it has finished when ``forward`` returns: this fence is always
    done. The CUDA path overrides it with an event recorded on the compute stream.
    """

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        """Block until ``done()``."""


COMPLETED = ReadFence()


class SlotArray:
    """Views into ``slots`` (``[n_slots, row_numel]``, compute dtype or quantized bytes); subclasses own the memory.

    For quantized experts ``gate_up`` and ``down`` dequantize into scratch buffers of the compute dtype, one per
    matrix, reused by every expert (each result is consumed before the next expert's; on CUDA the kernels are
    ordered on the compute stream)."""

    slots: torch.Tensor
    layout: ExpertLayout
    _scratch: dict[str, torch.Tensor] | None = None
    _slot_views: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _dequantized(self, slot: SlotId, which: str) -> torch.Tensor:
        lay = self.layout
        if self._scratch is None:
            dtype, device = torch_dtype(lay.compute_dtype), self.slots.device
            i, h = lay.intermediate_size, lay.hidden_size
            self._scratch = {"gate_up": torch.empty(2 * i, h, dtype=dtype, device=device),
                             "down": torch.empty(h, i, dtype=dtype, device=device)}
        out = self._scratch[which]
        return quantized.dequantize_matrix(self.slots[slot], lay, which, out.dtype, out=out)

    def chunk(self, slot: SlotId, chunk: int) -> torch.Tensor:
        lo, hi = self.layout.chunk_bounds(chunk)
        return self.slots[slot, lo:hi]

    def gate_up(self, slot: SlotId) -> torch.Tensor:
        """transformers' fused ``gate_up_proj[e]``: ``[2I, H]``, gate rows first."""
        if self.layout.quantized:
            return self._dequantized(slot, "gate_up")
        return self._views()[slot][0]

    def down(self, slot: SlotId) -> torch.Tensor:
        """``down_proj[e]``: ``[H, I]``."""
        if self.layout.quantized:
            return self._dequantized(slot, "down")
        return self._views()[slot][1]

    def _views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every slot's ``(gate_up, down)`` views, made once (making two views per expert computed was a tenth of a
        batched decode step on the CPU)."""
        if self._slot_views is None:
            lay = self.layout
            i, h = lay.intermediate_size, lay.hidden_size
            self._slot_views = [(row[: 2 * i * h].view(2 * i, h), row[2 * i * h:].view(h, i)) for row in self.slots]
        return self._slot_views

    def read_fence(self) -> ReadFence:
        """A fence behind every computation issued so far on these slots (CPU: already done)."""
        return COMPLETED

    def close(self) -> None:
        del self.slots
        self._scratch = self._slot_views = None


class CacheSlots(SlotArray):
    """The CPU path's slots: a shared segment that the loader writes and the inference worker reads."""

    def __init__(self, segment: Segment, layout: ExpertLayout) -> None:
        if segment.nbytes < self.nbytes_for(layout):
            raise ValueError(f"segment {segment.name} holds {segment.nbytes} bytes, slots need more")
        self.segment = segment
        self.layout = layout
        flat = torch.frombuffer(
            segment.buf, dtype=torch_dtype(layout.slot_row_dtype), count=layout.n_slots * layout.row_numel
        )
        self.slots = flat.view(layout.n_slots, layout.row_numel)  # [n_slots, 3*I*H] (quantized: bytes)

    @staticmethod
    def nbytes_for(layout: ExpertLayout) -> int:
        return layout.n_slots * layout.slot_nbytes

    def close(self) -> None:
        super().close()
        self.segment.close()
