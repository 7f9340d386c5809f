"""Tiny checkpoints of every supported architecture, written with ``save_pretrained`` and sharded into several
files, plus a byte-level tokenizer with a chat template: what the architecture and bad-checkpoint tests load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.default_model import write_byte_tokenizer

ARCHITECTURES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
COMMON: dict[str, Any] = dict(vocab_size=257, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08,
                              tie_word_embeddings=False, eos_token_id=256, bos_token_id=None, pad_token_id=None)
SHARD_SIZE = "60KB"
"""Small enough that every tiny checkpoint is cut into several shards with an index."""


def tiny_config(arch: str) -> Any:
    from transformers import DeepseekV2Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if arch == "qwen2_moe":  # layer 1 dense: MoE layers are 0 and 2 (ExpertId numbering skips the dense one)
        return Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                              mlp_only_layers=[1], norm_topk_prob=False)
    if arch == "qwen3_moe":  # decoder_sparse_step 1, layer 0 dense
        return Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                              num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True, head_dim=16)
    if arch == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if arch == "deepseek_v2":
        common = {**COMMON, "num_key_value_heads": 4}
        return DeepseekV2Config(**common, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                                q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                                topk_group=1)
    raise ValueError(arch)


def write_tiny_checkpoint(arch: str, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 7) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.save_pretrained(out, max_shard_size=SHARD_SIZE)
    write_byte_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out
