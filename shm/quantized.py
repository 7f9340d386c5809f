"""Group-wise symmetric weight-only quantization of the routed experts, and the dequantization the experts backend
computes with (a torch implementation: CPU and CUDA alike).

Format (``shm.layout``): a matrix ``W [out, in]`` is cut along ``in`` into groups of ``group_size`` weights; each
group has one float16 scale ``s = max|w| / qmax`` (``qmax`` 127 for int8, 7 for int4) and codes
``q = clamp(round(w / s), -qmax, qmax)``; the weight it stands for is ``q * s``. int8 codes are stored as int8,
int4 codes offset by 8 (1..15) two per byte: byte ``j`` of a row holds input index ``j`` in its low nibble and
``j + in / 2`` in its high nibble (unpacking is then two contiguous halves, which torch does fastest). A quantized
expert's row is ``[gate_up codes | gate_up scales | down codes | down scales]`` (bytes), ``gate_up`` being ``gate``
rows then ``up`` rows, as transformers' fused ``gate_up_proj[e]``.

``dequantize`` is the one function that turns codes into weights: the runtime (into a scratch buffer of the compute
dtype) and the test reference (into the model's parameters) both call it, so they compute with the same values.

On CUDA this is the same dequantize-into-scratch path: a library of weight-only kernels (torchao, HQQ,
bitsandbytes) is not installed here, and none is added as a dependency.
"""

from __future__ import annotations

import torch

from shm.layout import QUANT_BITS, ExpertLayout

SCALE_DTYPE = torch.float16


def qmax(bits: int) -> int:
    """The largest code magnitude of a symmetric ``bits``-bit quantization."""
    return (1 << (bits - 1)) - 1


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in * bits / 8], scales float16 [out, in / group_size])`` of ``weight [out, in]``."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"input dim {in_features} is not a multiple of the group size {group_size}")
    grouped = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    top = qmax(bits)
    scales = (grouped.abs().amax(dim=-1) / top).to(SCALE_DTYPE)  # [out, groups]
    safe = scales.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)[..., None]  # all-zero groups: q = 0
    codes = (grouped / safe).round_().clamp_(-top, top).to(torch.int8).reshape(out_features, in_features)
    return pack(codes, bits), scales


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[out, in]`` (in ``-qmax..qmax``) as stored bytes ``uint8 [out, in * bits / 8]``."""
    if bits == 8:
        return codes.to(torch.int8).view(torch.uint8)
    if bits == 4:
        offset = (codes + 8).to(torch.uint8)  # 1..15
        half = offset.shape[1] // 2
        return offset[:, :half] | (offset[:, half:] << 4)
    raise ValueError(f"{bits}-bit codes are not supported")


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed codes ``int8 [out, in]`` of stored bytes ``uint8 [out, in * bits / 8]``."""
    if bits == 8:
        return packed.view(torch.int8)
    if bits == 4:  # two contiguous halves, no interleaving: the cheapest unpacking torch offers on the CPU
        return torch.cat((packed & 0x0F, packed >> 4), dim=1).view(torch.int8).sub_(8)
    raise ValueError(f"{bits}-bit codes are not supported")


def dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The weights ``[out, in]`` in ``dtype`` that ``(packed, scales)`` stand for (``q * s``, computed in float32
    and rounded once to ``dtype``); written into ``out`` if given. Two passes over the weights on float32: a
    conversion of the codes, a multiplication in place."""
    codes = unpack(packed, bits)  # int8 [out, in]
    out_features, in_features = codes.shape
    target = out if out is not None else torch.empty(codes.shape, dtype=dtype, device=codes.device)
    wide = target if target.dtype == torch.float32 else torch.empty(codes.shape, dtype=torch.float32,
                                                                    device=codes.device)
    wide.copy_(codes)
    wide.view(out_features, in_features // group_size, group_size).mul_(scales.to(torch.float32)[..., None])
    if wide is not target:
        target.copy_(wide)
    return target


def section(row: torch.Tensor, layout: ExpertLayout, name: str) -> torch.Tensor:
    """One section (``shm.layout.ExpertLayout.quantized_sections``) of a quantized expert's byte row."""
    offset, nbytes = layout.quantized_sections()[name]
    return row[offset : offset + nbytes]


def write_matrix(row: torch.Tensor, layout: ExpertLayout, which: str, weight: torch.Tensor) -> None:
    """Quantize ``weight`` (``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``, as on disk) into an expert's byte
    row ``row [expert_nbytes]`` (uint8)."""
    bits, group = QUANT_BITS[layout.storage_dtype], layout.group_size
    i, h = layout.intermediate_size, layout.hidden_size
    codes, scales = quantize(weight, bits, group)
    if which == "down":
        section(row, layout, "down_codes").copy_(codes.reshape(-1))
        section(row, layout, "down_scales").view(SCALE_DTYPE).copy_(scales.reshape(-1))
        return
    first = ("gate", "up").index(which) * i  # gate rows, then up rows
    code_row, scale_row = h * bits // 8, h // group
    section(row, layout, "gate_up_codes").view(2 * i, code_row)[first : first + i].copy_(codes)
    section(row, layout, "gate_up_scales").view(SCALE_DTYPE).view(2 * i, scale_row)[first : first + i].copy_(scales)


def dequantize_matrix(row: torch.Tensor, layout: ExpertLayout, which: str, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``gate_up`` ``[2I, H]`` or ``down`` ``[H, I]`` of a quantized expert's byte row, dequantized to ``dtype``."""
    bits, group = QUANT_BITS[layout.storage_dtype], layout.group_size
    out_features, in_features = ((2 * layout.intermediate_size, layout.hidden_size) if which == "gate_up"
                                 else (layout.hidden_size, layout.intermediate_size))
    packed = section(row, layout, f"{which}_codes").view(out_features, in_features * bits // 8)
    scales = section(row, layout, f"{which}_scales").view(SCALE_DTYPE).view(out_features, in_features // group)
    return dequantize(packed, scales, bits, group, dtype, out)


def dequantized_expert(row: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up [2I, H], down [H, I])`` of a quantized expert's byte row, in ``dtype``: what the runtime computes
    with, and what a reference model's expert parameters are set to."""
    return dequantize_matrix(row, layout, "gate_up", dtype), dequantize_matrix(row, layout, "down", dtype)
