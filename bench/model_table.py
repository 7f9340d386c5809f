"""The README's model table: expert count and size, and GPU memory at a given cache size, computed from each
model's published config (transformers builds the model on the meta device to count the non-expert parameters).

    python bench/model_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import MODEL_NAMES

BF16_NBYTES = 2
QWEN_VOCAB = 151936
CONFIGS = {  # the values of each repository's config.json
    "qwen-moe": Qwen2MoeConfig(vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=5632,
                               moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                               tie_word_embeddings=False),
    "qwen2-moe": Qwen2MoeConfig(vocab_size=QWEN_VOCAB, hidden_size=3584, intermediate_size=18944,
                                moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, num_experts=64,
                                num_experts_per_tok=8, tie_word_embeddings=False),
    "qwen3-moe": Qwen3MoeConfig(vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=6144,
                                moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                tie_word_embeddings=False),
    "mixtral": MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                             tie_word_embeddings=False),
}


def row(name: str) -> dict:
    config = CONFIGS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total_params = sum(p.numel() for p in model.parameters())
    n_layers = sum(1 for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    per_layer = model.model.layers[0].mlp.experts.gate_up_proj.shape[0]
    n_experts = n_layers * per_layer
    expert_nbytes = expert_params // n_experts * BF16_NBYTES
    rest_nbytes = (total_params - expert_params) * BF16_NBYTES
    return {"name": name, "repo": MODEL_NAMES[name].repos[0], "layers": n_layers, "per_layer": per_layer,
            "top_k": config.num_experts_per_tok, "expert_mb": expert_nbytes / 1e6,
            "experts_gb": n_experts * expert_nbytes / 1e9, "rest_gb": rest_nbytes / 1e9,
            "total_b": total_params / 1e9,
            "gpu_min_gb": (rest_nbytes + config.num_experts_per_tok * expert_nbytes) / 1e9,
            "gpu_25_gb": (rest_nbytes + n_experts // 4 * expert_nbytes) / 1e9}


def main() -> None:
    print("| `--model` | checkpoint (preferred) | params | MoE layers x experts (top-k) | one expert (bf16) "
          "| all experts | rest of the model | GPU: rest + top-k slots | GPU: rest + 25% of experts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        r = row(name)
        print(f"| `{r['name']}` | {r['repo']} | {r['total_b']:.1f} B | {r['layers']} x {r['per_layer']} "
              f"(top-{r['top_k']}) | {r['expert_mb']:.1f} MB | {r['experts_gb']:.1f} GB | {r['rest_gb']:.2f} GB | "
              f"{r['gpu_min_gb']:.1f} GB | {r['gpu_25_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
