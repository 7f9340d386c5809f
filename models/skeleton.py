"""The transformers model without its routed experts: built on the meta device, non-expert weights assigned.

The experts modules keep their class (and so transformers' ``use_experts_implementation`` dispatch) but hold
empty parameters: the runtime's experts backend computes them from the cache slots instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from models.checkpoint import Checkpoint, CheckpointError, load_non_expert_state

log = logging.getLogger(__name__)

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def experts_modules(model: nn.Module, moe_layers: tuple[int, ...]) -> list[nn.Module]:
    """The routed-experts module of each MoE decoder layer, in ``moe_layers`` order."""
    layers: Any = model.model.layers  # type: ignore[union-attr]
    return [layers[layer].mlp.experts for layer in moe_layers]


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype, moe_layers: tuple[int, ...]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for experts in experts_modules(model, moe_layers):
        for name in EXPERT_PARAMS:
            setattr(experts, name, nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))

    state = load_non_expert_state(ckpt, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: tensors the model does not have: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in missing if not k.endswith(EXPERT_PARAMS)]
    _rebuild_meta_buffers(model)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{ckpt.path}: checkpoint lacks {still_meta[:5]} (missing keys: {missing[:5]})")
    try:
        model.generation_config = GenerationConfig.from_pretrained(ckpt.path)
    except OSError:
        log.info("%s has no generation_config.json; using transformers' defaults", ckpt.path)
    model.requires_grad_(False)
    return model.eval()


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are computed at construction: construct those modules again."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and not any(
                True for _ in child.parameters(recurse=False)
            ):
                setattr(parent, child_name, type(child)(config=model.config))
