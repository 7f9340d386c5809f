"""Geometry of the expert store and the cache slots, shared by every process.

An expert is one contiguous buffer ``[gate (I x H) | up (I x H) | down (H x I)]``: ``gate`` and ``up`` back to back
are exactly transformers' fused ``gate_up_proj[e]`` of shape ``[2I, H]``. The expert is split into ``n_chunks``
equal element ranges (the last one takes the remainder); the chunk is the loader's unit of work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from protocol.ids import ExpertId

if TYPE_CHECKING:
    import torch

DTYPE_NBYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""The dtypes an expert may be stored or computed in, by torch's name, and the bytes of one element. Names, not
torch dtypes, so that a process that only does the bookkeeping (the coordinator) never imports torch."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (one of ``DTYPE_NBYTES``)."""
    if name not in DTYPE_NBYTES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPE_NBYTES)}")
    import torch  # only the processes that touch tensors pay for torch's import

    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


@dataclass(frozen=True)
class ExpertLayout:
    """Where every expert lives and how it is cut into chunks."""

    moe_layers: tuple[int, ...]
    """Decoder-layer index of each MoE layer, in order; ``ExpertId // experts_per_layer`` indexes this."""
    experts_per_layer: int
    """Routed experts per MoE layer (E)."""
    top_k: int
    """Experts the gate picks per token."""
    hidden_size: int
    """H."""
    intermediate_size: int
    """I, the FFN width of one routed expert."""
    storage_dtype: str
    """dtype of the host store (the checkpoint's)."""
    compute_dtype: str
    """dtype of the cache slots and of the computation."""
    n_chunks: int
    """Chunks per expert: the loader copies, and can be preempted, at this granularity."""
    n_slots: int
    """Cache slots, i.e. experts that fit on the device at once."""

    def __post_init__(self) -> None:
        if self.n_chunks < 1 or self.n_chunks > self.expert_numel:
            raise ValueError(f"chunks per expert must be in 1..{self.expert_numel}, got {self.n_chunks}")
        if self.storage_dtype not in DTYPE_NBYTES or self.compute_dtype not in DTYPE_NBYTES:
            raise ValueError(f"dtypes must be among {sorted(DTYPE_NBYTES)}")
        if not self.top_k <= self.n_slots <= self.n_experts:
            raise ValueError(
                f"cache of {self.n_slots} experts is outside {self.top_k} (one layer's top-k) .. "
                f"{self.n_experts} (all experts)"
            )

    @property
    def n_experts(self) -> int:
        return len(self.moe_layers) * self.experts_per_layer

    @property
    def expert_numel(self) -> int:
        return 3 * self.intermediate_size * self.hidden_size

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert in the host store; this is what crosses the link."""
        return self.expert_numel * DTYPE_NBYTES[self.storage_dtype]

    @property
    def slot_nbytes(self) -> int:
        return self.expert_numel * DTYPE_NBYTES[self.compute_dtype]

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Element range ``[lo, hi)`` of ``chunk`` within an expert."""
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        step = self.expert_numel // self.n_chunks
        lo = chunk * step
        hi = self.expert_numel if chunk == self.n_chunks - 1 else lo + step
        return lo, hi

    def expert_id(self, moe_layer: int, expert: int) -> ExpertId:
        return ExpertId(moe_layer * self.experts_per_layer + expert)

    def split(self, expert: ExpertId) -> tuple[int, int]:
        """``(moe_layer, expert within the layer)``."""
        return divmod(int(expert), self.experts_per_layer)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ExpertLayout:
        return cls(**{**data, "moe_layers": tuple(data["moe_layers"])})
