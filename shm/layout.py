"""Geometry of the expert store and the cache slots, shared by every process.

An expert is one contiguous buffer ``[gate (I x H) | up (I x H) | down (H x I)]``: ``gate`` and ``up`` back to back
are exactly transformers' fused ``gate_up_proj[e]`` of shape ``[2I, H]``. The expert is split into ``n_chunks``
equal element ranges (the last one takes the remainder); the chunk is the loader's unit of work.

A quantized expert (``storage_dtype`` int8 or int4, ``shm.quantized``) is a row of bytes instead:
``[gate_up codes | gate_up scales | down codes | down scales]``, codes ``[out, in]`` at ``bits`` per weight (int4:
two per byte, low nibble first), one float16 scale per ``group_size`` weights along the input dim (symmetric).
The store and the slots then hold the same bytes, and chunks are byte ranges of that row.
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


QUANT_BITS: dict[str, int] = {"int8": 8, "int4": 4}
"""Quantized storage formats of the routed experts (group-wise, symmetric, weight-only) and their bits per weight."""
SCALE_NBYTES = 2
"""One float16 scale per group."""
ROW_DTYPE_QUANTIZED = "uint8"
"""dtype of a store row and a slot row that hold a quantized expert."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (one of ``DTYPE_NBYTES``)."""
    if name not in DTYPE_NBYTES and name != ROW_DTYPE_QUANTIZED:
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
    """dtype of the experts in the host store (the checkpoint's, unless converted), or a quantized format of
    ``QUANT_BITS`` (the store, the slots and the link then carry the quantized bytes)."""
    compute_dtype: str
    """dtype of the computation, and of the cache slots unless the experts are quantized."""
    n_chunks: int
    """Chunks per expert: the loader copies, and can be preempted, at this granularity."""
    n_slots: int
    """Cache slots, i.e. experts that fit on the device at once."""
    group_size: int = 64
    """Weights per quantization scale, along the input dim (quantized ``storage_dtype`` only)."""

    def __post_init__(self) -> None:
        if self.n_chunks < 1 or self.n_chunks > self.row_numel:
            raise ValueError(f"chunks per expert must be in 1..{self.row_numel}, got {self.n_chunks}")
        if self.storage_dtype not in {*DTYPE_NBYTES, *QUANT_BITS} or self.compute_dtype not in DTYPE_NBYTES:
            raise ValueError(f"storage dtype must be among {sorted({*DTYPE_NBYTES, *QUANT_BITS})}, compute dtype "
                             f"among {sorted(DTYPE_NBYTES)}")
        if self.quantized and (self.group_size < 2 or self.group_size % 2 or self.hidden_size % self.group_size
                               or self.intermediate_size % self.group_size):
            raise ValueError(f"group size {self.group_size} must be even and divide hidden size {self.hidden_size} "
                             f"and intermediate size {self.intermediate_size}")
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
    def quantized(self) -> bool:
        return self.storage_dtype in QUANT_BITS

    def matrix_nbytes(self, out_features: int, in_features: int) -> tuple[int, int]:
        """``(codes, scales)`` bytes of one quantized ``[out, in]`` matrix."""
        bits = QUANT_BITS[self.storage_dtype]
        return out_features * in_features * bits // 8, out_features * (in_features // self.group_size) * SCALE_NBYTES

    def quantized_sections(self) -> dict[str, tuple[int, int]]:
        """Byte ``(offset, nbytes)`` of ``gate_up_codes``, ``gate_up_scales``, ``down_codes``, ``down_scales`` in a
        quantized expert's row."""
        i, h = self.intermediate_size, self.hidden_size
        sizes = dict(zip(("gate_up_codes", "gate_up_scales"), self.matrix_nbytes(2 * i, h), strict=True))
        sizes.update(zip(("down_codes", "down_scales"), self.matrix_nbytes(h, i), strict=True))
        out, offset = {}, 0
        for name, nbytes in sizes.items():
            out[name] = (offset, nbytes)
            offset += nbytes
        return out

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert in the host store (codes and scales if quantized); this is what crosses the link."""
        if self.quantized:
            return sum(nbytes for _, nbytes in self.quantized_sections().values())
        return self.expert_numel * DTYPE_NBYTES[self.storage_dtype]

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one cache slot: the quantized expert as stored, or the expert in the compute dtype."""
        if self.quantized:
            return self.expert_nbytes
        return self.expert_numel * DTYPE_NBYTES[self.compute_dtype]

    @property
    def row_numel(self) -> int:
        """Elements of an expert's row in the store and in a slot: its weights, or its bytes if quantized."""
        return self.expert_nbytes if self.quantized else self.expert_numel

    @property
    def store_row_dtype(self) -> str:
        return ROW_DTYPE_QUANTIZED if self.quantized else self.storage_dtype

    @property
    def slot_row_dtype(self) -> str:
        return ROW_DTYPE_QUANTIZED if self.quantized else self.compute_dtype

    @property
    def store_itemsize(self) -> int:
        """Bytes of one element of a store row."""
        return 1 if self.quantized else DTYPE_NBYTES[self.storage_dtype]

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Range ``[lo, hi)`` of ``chunk`` within an expert's row (elements; bytes if quantized)."""
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        step = self.row_numel // self.n_chunks
        lo = chunk * step
        hi = self.row_numel if chunk == self.n_chunks - 1 else lo + step
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
