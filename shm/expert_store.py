"""The host expert store: one contiguous shared region, one buffer per expert, in the checkpoint's dtype (or a
converted one), or quantized (``shm.quantized``: a row of bytes per expert)."""

from __future__ import annotations

import torch

from protocol.ids import ExpertId
from shm import quantized
from shm.layout import ExpertLayout, torch_dtype
from shm.segment import Segment


class HostExpertStore:
    """``[n_experts, row_numel]`` of ``storage_dtype`` (quantized: bytes) over a shared segment."""

    def __init__(self, segment: Segment, layout: ExpertLayout) -> None:
        if segment.nbytes < self.nbytes_for(layout):
            raise ValueError(f"segment {segment.name} holds {segment.nbytes} bytes, store needs more")
        self.segment = segment
        self.layout = layout
        flat = torch.frombuffer(
            segment.buf, dtype=torch_dtype(layout.store_row_dtype), count=layout.n_experts * layout.row_numel
        )
        self.experts = flat.view(layout.n_experts, layout.row_numel)  # [n_experts, 3*I*H] (quantized: bytes)

    @staticmethod
    def nbytes_for(layout: ExpertLayout) -> int:
        return layout.n_experts * layout.expert_nbytes

    def expert(self, expert: ExpertId) -> torch.Tensor:
        return self.experts[expert]  # [3*I*H]

    def chunk(self, expert: ExpertId, chunk: int) -> torch.Tensor:
        lo, hi = self.layout.chunk_bounds(chunk)
        return self.experts[expert, lo:hi]

    def matrix(self, expert: ExpertId, which: str) -> torch.Tensor:
        """The flat buffer ``[I*H]`` of one of ``gate``/``up``/``down`` (row-major ``[out, in]``, as on disk);
        not for a quantized store, whose matrices are written with ``write_matrix``."""
        if self.layout.quantized:
            raise ValueError("a quantized expert has no matrix buffer in the storage dtype")
        size = self.layout.intermediate_size * self.layout.hidden_size
        offset = {"gate": 0, "up": size, "down": 2 * size}[which]
        return self.experts[expert, offset : offset + size]

    def populate(self, expert: ExpertId, which: str) -> None:
        """Map the pages of one matrix's buffer before writing it (see ``Segment.populate``); quantized: the whole
        expert's row, with its ``gate``."""
        if self.layout.quantized:
            if which == "gate":
                self.segment.populate(int(expert) * self.layout.expert_nbytes, self.layout.expert_nbytes)
            return
        size = self.layout.intermediate_size * self.layout.hidden_size * self.experts.element_size()
        offset = int(expert) * self.layout.expert_nbytes + ("gate", "up", "down").index(which) * size
        self.segment.populate(offset, size)

    def write_matrix(self, expert: ExpertId, which: str, tensor: torch.Tensor) -> None:
        """Copy one of ``gate``/``up``/``down`` (as stored on disk, ``[out, in]``) into the expert's buffer."""
        lay = self.layout
        expected = (lay.hidden_size, lay.intermediate_size) if which == "down" else (
            lay.intermediate_size, lay.hidden_size)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expert {expert} {which}: shape {tuple(tensor.shape)}, expected {expected}")
        if lay.quantized:
            quantized.write_matrix(self.experts[expert], lay, which, tensor)
            return
        self.matrix(expert, which).copy_(tensor.reshape(-1))

    def close(self) -> None:
        del self.experts
        self.segment.close()
