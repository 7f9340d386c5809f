"""The reference for quantized experts: a transformers model whose routed experts are replaced by exactly the
weights the runtime computes with (quantized as the host store is filled, then dequantized, ``shm.quantized``).

Used by the correctness oracle (the runtime must give this model's greedy tokens under every policy) and by
``bench/quality.py`` (perplexity of int8/int4 experts).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.skeleton import experts_modules
from shm import quantized
from shm.layout import ExpertLayout

log = logging.getLogger(__name__)


@torch.no_grad()
def use_dequantized_experts(model: nn.Module, layout: ExpertLayout) -> None:
    """Overwrite every routed expert's ``gate_up_proj``/``down_proj`` of ``model`` (eager experts, any float dtype)
    with its quantize-then-dequantize values under ``layout``'s format (``storage_dtype`` int8/int4)."""
    if not layout.quantized:
        raise ValueError(f"storage dtype {layout.storage_dtype} is not a quantized format")
    i = layout.intermediate_size
    row = torch.empty(layout.expert_nbytes, dtype=torch.uint8)
    for module in experts_modules(model, layout.moe_layers):
        gate_up: torch.Tensor = module.gate_up_proj  # type: ignore[assignment]  # [E, 2I, H]
        down: torch.Tensor = module.down_proj  # type: ignore[assignment]  # [E, H, I]
        for e in range(layout.experts_per_layer):
            quantized.write_matrix(row, layout, "gate", gate_up[e, :i])
            quantized.write_matrix(row, layout, "up", gate_up[e, i:])
            quantized.write_matrix(row, layout, "down", down[e])
            new_gate_up, new_down = quantized.dequantized_expert(row, layout, gate_up.dtype)
            gate_up[e].copy_(new_gate_up)
            down[e].copy_(new_down)
    log.info("experts of %d MoE layers replaced by their %s values (group size %d)", len(layout.moe_layers),
             layout.storage_dtype, layout.group_size)
